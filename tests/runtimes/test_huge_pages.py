"""Huge pages under ONNX Runtime's sessions and the package's own step arrays (runtimes.huge_pages).

Where the kernel can collapse pages (Linux 6.1+, transparent huge pages not ``never``: read from ``uname`` and
sysfs here, independently of the module), the tests check the kernel's own account (``/proc/self/smaps``);
elsewhere they check that nothing was collapsed and the reason says why. Either way the memory keeps its
contents and a session its outputs.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flora_graph.runtimes import huge_pages as hp

MB = 1 << 20


def _kernel_collapses() -> bool:
    """Whether this kernel has MADV_COLLAPSE and transparent huge pages are not off."""
    if not sys.platform.startswith("linux"):
        return False
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return (major, minor) >= (6, 1) and thp.is_file() and "[never]" not in thp.read_text()


COLLAPSES = _kernel_collapses()


def _smaps_of(address: int) -> dict[str, int]:
    """The ``/proc/self/smaps`` counters (kB) of the mapping holding ``address``."""
    text = Path("/proc/self/smaps").read_text()
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) [^\n]*\n((?:[A-Z][^\n]*\n)+)", text, re.M):
        if int(m.group(1), 16) <= address < int(m.group(2), 16):
            return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", m.group(3), re.M)}
    raise AssertionError(f"no mapping holds {address:#x}")


def _mapped(size: int) -> np.ndarray:
    """``size`` bytes of a private anonymous mapping (which the array holds), between two inaccessible pages, so the
    kernel does not merge it with a neighbour and its ``/proc/self/smaps`` entry counts its own pages alone."""
    page = mmap.PAGESIZE
    raw = np.frombuffer(mmap.mmap(-1, size + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for at in (raw.ctypes.data, raw.ctypes.data + page + size):
            assert libc.mprotect(at, page, 0) == 0, os.strerror(ctypes.get_errno())  # PROT_NONE
    return raw[page:page + size]


def test_new_spans_are_the_aligned_huge_pages_of_new_or_grown_memory():
    H = hp.HUGE_PAGE
    before = [(10 * H, 14 * H + 4096), (40 * H, 44 * H)]
    after = [(10 * H, 20 * H), (30 * H + 4096, 34 * H + 8192), (40 * H, 44 * H)]  # the first grew; one new; one as it was
    # grown: from the huge page holding the old end (its first page is old memory) to the mapping's end;
    # new: the aligned pages inside it (its unaligned head and tail stay small)
    assert hp._new_spans(before, after) == [k * H for k in (14, 15, 16, 17, 18, 19, 31, 32, 33)]
    assert hp._new_spans(before, before) == []
    assert hp._new_spans([], [(H + 4096, 3 * H - 4096)]) == []  # no whole huge page inside


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_memory_filled_in_the_block_is_collapsed_and_keeps_its_contents():
    with hp.huge_pages() as done:
        raw = _mapped(8 * MB)
        raw[:] = np.arange(raw.size) % 251  # every page resident
    assert np.array_equal(raw, np.arange(raw.size) % 251)
    huge = _smaps_of(raw.ctypes.data)["AnonHugePages"]
    if COLLAPSES:
        assert done.reason is None and done.bytes >= 6 * MB  # 8 MB mapped: at least 3 whole aligned huge pages
        assert huge * 1024 >= 6 * MB, f"smaps shows {huge} kB of huge pages"
    else:
        assert done.bytes == 0 and done.reason
        assert huge == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_sparse_memory_is_left_in_small_pages():
    with hp.huge_pages() as done:
        raw = _mapped(8 * MB)
        raw[::64 * 1024] = 1  # one page in 16: a stack or a reserved arena, mostly never touched
    counters = _smaps_of(raw.ctypes.data)
    assert counters["AnonHugePages"] == 0
    assert counters["Rss"] <= 1024, f"resident {counters['Rss']} kB: collapsing it would have filled it"
    if COLLAPSES:
        assert done.sparse >= 6 * MB
    assert raw.sum() == raw[::64 * 1024].size


def test_disabled_or_raising_blocks_do_nothing():
    with hp.huge_pages(enabled=False) as done:
        raw = _mapped(4 * MB)
        raw[:] = 1
    assert done.bytes == 0 and done.reason == "not asked for"
    with pytest.raises(RuntimeError, match="inside"), hp.huge_pages() as done:
        raise RuntimeError("inside")
    assert done.bytes == 0


def _owner(a: np.ndarray) -> object:
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def test_zeros_are_zeroed_contiguous_aligned_and_separate():
    specs = {"a": ((600, 1000), np.float32), "b": ((7,), np.int64), "c": ((2, 3, 5), np.float16)}
    out = hp.zeros(specs)
    if sys.platform.startswith("linux"):  # 2.4 MB together: one mapping
        assert all(isinstance(_owner(out[k]), mmap.mmap) and _owner(out[k]) is _owner(out["a"]) for k in "abc")
    for k, (shape, dtype) in specs.items():
        a = out[k]
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0 and not a.any()
    out["a"][:] = 1
    out["c"][:] = 2
    assert not out["b"].any() and out["a"].sum() == 600_000 and out["c"].sum() == 60
    small = hp.zeros({"x": ((10,), np.float32), "y": ((10,), np.float32)})  # under a huge page: numpy arrays of their own
    assert all(a.base is None and not a.any() for a in small.values())
    assert hp.zeros({"x": ((1 << 20,), np.float32)}, enabled=False)["x"].base is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_big_zeros_ask_for_huge_pages():
    out = hp.zeros({"w": ((3 * MB,), np.float32)})  # 12 MB
    out["w"][:] = 1
    huge = _smaps_of(out["w"].ctypes.data)["AnonHugePages"]
    if COLLAPSES:
        assert huge * 1024 >= 8 * MB
    assert out["w"].sum() == 3 * MB


def _wide_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """y = x @ W, W 1024 x 4096 float32 (16 MB) in external data: the weights a session loads."""
    w = np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4096])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "wide.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="wide.onnx.data")
    return path, w


_SERVE = """
import json, sys
import numpy as np
from flora_graph.serving.session import OrtModel
x = np.random.default_rng(1).standard_normal((3, 1024)).astype(np.float32)
out = {}
for huge in (False, True):
    model = OrtModel(sys.argv[1], intra_op_threads=1, huge_pages=huge)
    y = model.run({"x": x}, None, lambda: "test")["y"]
    out[str(huge)] = [model.huge_pages.bytes, model.huge_pages.reason, y.tolist()]
print(json.dumps(out))
"""


def test_a_session_loads_its_weights_into_huge_pages(tmp_path):
    """In a process of its own, as a server loads its model: memory the test process freed before (and the
    session would reuse, staying in small pages) plays no part."""
    path, w = _wide_model(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 1024)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    done = subprocess.run([sys.executable, "-c", _SERVE, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    for huge in ("False", "True"):
        np.testing.assert_allclose(np.array(out[huge][2]), want, rtol=1e-4, atol=1e-3)
    assert out["False"][:2] == [0, "not asked for"]
    if COLLAPSES:
        assert out["True"][0] >= 8 * MB, out["True"][:2]  # the 16 MB of weights and their packed copy
    else:
        assert out["True"][0] == 0 and out["True"][1]


def test_unreadable_maps_leave_memory_as_it_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A sandbox without /proc: the block runs, nothing is collapsed, the reason says why, and a session still loads."""
    from flora_graph.serving.session import OrtModel

    def denied() -> list[tuple[int, int]]:
        raise PermissionError("denied")

    monkeypatch.setattr(hp, "private_anonymous", denied)
    with hp.huge_pages() as done:
        raw = _mapped(4 * MB)
        raw[:] = 3
    assert done.bytes == 0 and done.reason
    assert done.reason.startswith("cannot read /proc/self/maps") or not COLLAPSES
    assert raw.sum() == 12 * MB
    path, w = _wide_model(tmp_path)
    model = OrtModel(path, intra_op_threads=1)
    assert model.huge_pages.bytes == 0 and model.huge_pages.reason
    x = np.ones((1, 1024), np.float32)
    np.testing.assert_allclose(model.run({"x": x}, None, lambda: "test")["y"], x @ w, rtol=1e-4, atol=1e-3)


class _FakeLibc:
    """``mincore`` / ``madvise`` of a pretend kernel: ``resident[span]`` pages of each span are resident, a span in
    ``refuse`` cannot be collapsed (errno ``refuse[span]``); ``calls`` records each collapse asked for."""

    def __init__(self, resident: dict[int, int], refuse: dict[int, int]) -> None:
        self.resident, self.refuse, self.calls = resident, refuse, []

    def mincore(self, start: int, length: int, vec: int) -> int:
        view = (ctypes.c_ubyte * (length // 4096)).from_address(vec)
        for k in range(len(view)):
            view[k] = int(k < self.resident.get(start, 0))
        return 0

    def madvise(self, start: int, length: int, advice: int) -> int:
        self.calls.append((start, length))
        bad = [s for s in range(start, start + length, hp.HUGE_PAGE) if s in self.refuse]
        if bad:
            ctypes.set_errno(self.refuse[bad[0]])
            return -1
        return 0


def test_collapse_runs_adjacent_spans_together_and_counts_what_failed():
    import errno

    H, full = hp.HUGE_PAGE, hp.HUGE_PAGE // 4096
    spans = [k * H for k in (1, 2, 3, 5, 6, 9)]
    libc = _FakeLibc({1 * H: full, 2 * H: full, 3 * H: full, 5 * H: full, 6 * H: full, 9 * H: full // 2},
                     {5 * H: errno.EAGAIN})
    done = hp.Collapsed()
    hp._collapse(libc, spans, done)
    # 1-3 in one call; 5-6 refused as a run, then span by span (5 fails, 6 is done); 9 is half empty
    assert libc.calls == [(1 * H, 3 * H), (5 * H, 2 * H), (5 * H, H), (6 * H, H)]
    assert (done.bytes, done.failed, done.sparse, done.reason) == (4 * H, H, H, None)
    libc = _FakeLibc({k * H: full for k in (1, 2, 4)}, {1 * H: errno.ENOMEM})
    done = hp.Collapsed()
    hp._collapse(libc, [1 * H, 2 * H, 4 * H], done)  # no huge page free: nothing more is tried
    assert libc.calls == [(1 * H, 2 * H)] and done.bytes == 0 and done.failed == 2 * H and "ENOMEM" in done.reason


def test_the_benchmark_loads_both_ways_and_prints_the_ratios(capsys: pytest.CaptureFixture):
    """``benchmarks/huge_pages.py`` on a 24 MB chain: each load in a process of its own, both ways."""
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(bench_dir))
        import importlib

        bench = importlib.import_module("huge_pages")
        assert bench.main(["--mb", "24", "--layers", "6", "--rounds", "1", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(":")[0].strip(): ln for ln in out.splitlines()}
    assert "collapsed 0 MiB (not asked for)" in lines["huge_pages=False"]
    collapsed = float(re.search(r"collapsed (\d+) MiB", lines["huge_pages=True"]).group(1))
    assert collapsed >= 16 if COLLAPSES else collapsed == 0
    assert re.search(r"step small / huge pages \d+\.\d\dx; load [+-]\d+\.\d\d ms per MB", out)
