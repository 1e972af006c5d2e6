"""``.onnx_adapter`` files in a running server: loaded adapters no longer depend on the file,
a checksum beside each file is verified on load, and fuzzed bytes give a typed error or success."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flora_graph.serving import (
    AdapterChecksumWarning,
    AdapterFileError,
    AdapterSession,
    MixedAdapterSession,
    read_adapter,
    write_adapter,
)
from flora_graph.serving.adapter_file import checksum_path, decode_adapter
from flora_graph.storage import atomic_write_bytes
from tests.serving.conftest import images, served  # the demo model, its exports and adapters (session-scoped)

__all__ = ["images", "served"]  # fixtures, used by name

RNG = np.random.default_rng(0)
A = {"fc.lora_A": RNG.standard_normal((2, 4)).astype(np.float32),
     "fc.lora_B": RNG.standard_normal((4, 2)).astype(np.float32)}
B = {k: v * 3 + 1 for k, v in A.items()}  # same shapes, so the files have the same size


@pytest.fixture()
def pair(served, tmp_path):
    """Two adapters of one model: loaded from ``a`` (a copy of the fixture's file), ``b`` the replacement bytes."""
    a = write_adapter(tmp_path / "live.onnx_adapter", served.params["b"], model=served.swappable)
    other = write_adapter(tmp_path / "other.onnx_adapter", served.params["c"], model=served.swappable)
    return a, other


def _outputs(session, images, name="live"):
    return session.run({"image": images}, name)["output"]


@pytest.mark.parametrize("change", ["truncate", "zero", "rewrite", "delete"])
def test_a_loaded_adapter_survives_its_file_changing_in_place(served, pair, images, change):
    live, other = pair
    session = AdapterSession(served.swappable, intra_op_threads=1)
    mixed = MixedAdapterSession(served.mixed, {"live": live}, intra_op_threads=1)
    session.load_adapter("live", live)
    want = _outputs(session, images)
    np.testing.assert_allclose(want, served.reference("b", images), atol=2e-5)
    size = live.stat().st_size
    with open(live, "r+b") as f:  # same inode: what a mapping of the file would see
        if change == "truncate":
            f.truncate(size // 3)
        elif change == "zero":
            f.write(b"\0" * size)
        elif change == "rewrite":
            data = other.read_bytes()
            f.write(data)
            f.truncate(len(data))
    if change == "delete":
        live.unlink()
    for _ in range(2):  # no SIGBUS, no other weights: what was loaded keeps serving
        np.testing.assert_array_equal(_outputs(session, images), want)
        np.testing.assert_allclose(mixed.run({"image": images}, "live")["output"], want, atol=2e-5)
    if change != "delete":  # loading the changed file again fails its checksum
        with pytest.raises(AdapterFileError, match=r"adapter 'again'.*live\.onnx_adapter.*does not match its checksum"):
            session.load_adapter("again", live)
    assert session.adapters == ["live"]


def test_an_adapter_from_arrays_needs_no_file(served, images):
    session = AdapterSession(served.swappable, intra_op_threads=1)
    session.load_adapter("arrays", served.params["a"])
    np.testing.assert_allclose(session.run({"image": images}, "arrays")["output"], served.reference("a", images), atol=2e-5)


def test_write_adapter_writes_a_sha256sum_checksum(tmp_path):
    path = write_adapter(tmp_path / "x.onnx_adapter", A)
    sums = checksum_path(path)
    assert sums.name == "x.onnx_adapter.sha256"
    assert sums.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  x.onnx_adapter\n"
    write_adapter(path, B)  # a rewrite leaves one digest, the new one
    assert sums.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  x.onnx_adapter\n"
    np.testing.assert_array_equal(read_adapter(path).params["fc.lora_B"], B["fc.lora_B"])


def test_a_write_between_its_steps_still_verifies(tmp_path):
    """The checksum file lists the new digest and the old one until the adapter is in place."""
    path = write_adapter(tmp_path / "x.onnx_adapter", A)
    old = path.read_bytes()
    new = tmp_path / "new.onnx_adapter"
    write_adapter(new, B)
    both = (checksum_path(new).read_text() + checksum_path(path).read_text()).replace("new.onnx", "x.onnx")
    atomic_write_bytes(checksum_path(path), both.encode())  # step 1 done, killed before step 2
    np.testing.assert_array_equal(read_adapter(path).params["fc.lora_A"], A["fc.lora_A"])
    atomic_write_bytes(path, new.read_bytes())  # step 2 done, killed before step 3
    np.testing.assert_array_equal(read_adapter(path).params["fc.lora_A"], B["fc.lora_A"])
    assert old != path.read_bytes()


def test_a_writer_killed_at_any_boundary_leaves_a_pair_that_verifies(tmp_path):
    from tests.faults._harness import boundaries, kill_at

    def prepare(root):
        return write_adapter(root / "k.onnx_adapter", A)

    probe = prepare(tmp_path / "probe")
    labels = boundaries(lambda: write_adapter(probe, B))
    assert labels.count("file:committed") == 3  # checksum (both digests), adapter, checksum (new digest)
    for index in range(len(labels)):
        path = prepare(tmp_path / f"kill{index}")
        kill_at(lambda path=path: write_adapter(path, B), index)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = read_adapter(path).params["fc.lora_A"]
        assert np.array_equal(got, A["fc.lora_A"]) or np.array_equal(got, B["fc.lora_A"]), labels[index]


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path, where):
    path = write_adapter(tmp_path / "flip.onnx_adapter", A)
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match=r"adapter 'flip'.*flip\.onnx_adapter.*does not match its checksum"):
        read_adapter(path)


def test_missing_or_malformed_checksums(tmp_path):
    path = write_adapter(tmp_path / "old.onnx_adapter", A)
    checksum_path(path).unlink()  # a file written before checksums existed
    with pytest.warns(AdapterChecksumWarning, match=r"adapter 'old'.*no checksum file 'old\.onnx_adapter\.sha256'"):
        got = read_adapter(path)
    np.testing.assert_array_equal(got.params["fc.lora_A"], A["fc.lora_A"])
    with pytest.raises(AdapterFileError, match=r"adapter 'old'.*no checksum file.*require_checksum=True"):
        read_adapter(path, require_checksum=True)
    for text in (b"", b"not a digest\n", b"\xff\xfe", b"a" * 5000):
        checksum_path(path).write_bytes(text)
        with pytest.raises(AdapterFileError, match=r"adapter 'old': checksum file .*old\.onnx_adapter\.sha256.* malformed"):
            read_adapter(path)
    write_adapter(path, B)  # over a malformed checksum file: a fresh pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_adapter(path).params["fc.lora_A"], B["fc.lora_A"])


def test_sessions_can_require_checksums(served, tmp_path):
    path = write_adapter(tmp_path / "nosum.onnx_adapter", served.params["a"], model=served.swappable)
    checksum_path(path).unlink()
    with pytest.raises(AdapterFileError, match="require_checksum"):
        AdapterSession(served.swappable, require_checksum=True).load_adapter("n", path)
    with pytest.raises(AdapterFileError, match="require_checksum"):
        MixedAdapterSession(served.mixed, {"n": path}, require_checksum=True)
    with pytest.warns(AdapterChecksumWarning):
        AdapterSession(served.swappable).load_adapter("n", path)


def test_a_directory_or_fifo_is_refused_without_blocking(tmp_path):
    (tmp_path / "dir.onnx_adapter").mkdir()
    with pytest.raises(AdapterFileError, match=r"adapter 'dir': cannot read"):
        read_adapter(tmp_path / "dir.onnx_adapter")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.onnx_adapter")
        with pytest.raises(AdapterFileError, match=r"adapter 'fifo': cannot read.*not a regular file"):
            read_adapter(tmp_path / "fifo.onnx_adapter")


_GOOD = None


def _good_bytes(tmp_path_factory) -> bytes:
    global _GOOD
    if _GOOD is None:
        _GOOD = write_adapter(tmp_path_factory.mktemp("fuzz") / "g.onnx_adapter", A).read_bytes()
    return _GOOD


@st.composite
def _mutations(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "cut", "splice", "random", "int32"]))
    b = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
    elif kind == "cut":
        b = b[: draw(st.integers(0, len(b) - 1))]
    elif kind == "splice":
        at = draw(st.integers(0, len(b)))
        b[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "int32":  # lengths, offsets and dims of the flatbuffer: the fields a parser trusts
        at = draw(st.integers(0, len(b) - 4))
        b[at:at + 4] = draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0, 1 << 20])).to_bytes(4, "little")
    else:
        b = bytearray(draw(st.binary(max_size=600)))
    return bytes(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_adapter_bytes_give_a_typed_error_or_an_adapter(tmp_path_factory, data):
    good = _good_bytes(tmp_path_factory)
    blob = data.draw(_mutations(good))
    try:  # the decoder without the checksum: what a file written by another tool goes through
        got = decode_adapter(blob, name="fuzz")
    except AdapterFileError as exc:
        assert "adapter 'fuzz'" in str(exc)
    else:
        assert all(isinstance(v, np.ndarray) for v in got.params.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_adapter_files_never_load_other_weights(tmp_path_factory, data):
    good = _good_bytes(tmp_path_factory)
    blob = data.draw(_mutations(good))
    folder = tmp_path_factory.mktemp("files")
    path = folder / "f.onnx_adapter"
    path.write_bytes(good)
    checksum_path(path).write_text(f"{hashlib.sha256(good).hexdigest()}  f.onnx_adapter\n")
    path.write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if blob == good:
            read_adapter(path)
        else:
            with pytest.raises(AdapterFileError, match="adapter 'f'"):
                read_adapter(path)
