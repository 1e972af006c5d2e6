"""Bad adapters and bad requests: a clear ServingError naming the adapter, and the session keeps serving."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.errors import FloraGraphError
from flora_graph.models import build_mlp_stack
from flora_graph.serving import (
    AdapterFileError,
    AdapterIndexError,
    AdapterSession,
    MixedAdapterSession,
    ServingError,
    UnknownAdapterError,
    adapter_params,
    export_swappable,
    write_adapter,
)

from .conftest import ATOL


@pytest.fixture()
def session(served):
    s = AdapterSession(served.swappable, intra_op_threads=1)
    s.load_adapter("a", served.files["a"])
    return s


@pytest.fixture()
def mixed(served):
    return MixedAdapterSession(served.mixed, {"a": served.files["a"], "b": served.files["b"]}, intra_op_threads=1)


def still_serves(served, session, images):
    np.testing.assert_allclose(session.run({"image": images}, "a")["output"], served.reference("a", images), atol=ATOL)


def test_errors_are_flora_graph_errors():
    for cls in (AdapterFileError, AdapterIndexError, UnknownAdapterError):
        assert issubclass(cls, ServingError) and issubclass(cls, FloraGraphError)


def test_adapter_of_another_model_by_names(served, session, images, tmp_path):
    other = write_adapter(tmp_path / "mlp.onnx_adapter", adapter_params(build_mlp_stack(1, 32, 64, rank=2)))
    with pytest.raises(AdapterFileError, match=r"adapter 'mlp'.*does not take.*another model"):
        session.load_adapter("mlp", other)
    assert session.adapters == ["a"]
    still_serves(served, session, images)


def test_adapter_of_another_model_by_shapes(served, session, mixed, images, tmp_path):
    bad = dict(served.params["b"])
    bad["fc_in.lora_A"] = np.zeros((4, 512), np.float32)  # a model whose fc_in takes 512 features
    path = write_adapter(tmp_path / "narrow.onnx_adapter", bad)
    with pytest.raises(AdapterFileError, match=r"adapter 'narrow'.*'fc_in.lora_A'.*\[4, 512\].*\['fc_in.rank', 1024\]"):
        session.load_adapter("narrow", path)
    with pytest.raises(AdapterFileError, match="adapter 'narrow'"):
        mixed.set_adapters({"narrow": path})
    assert mixed.adapter_names == ["a", "b"]
    still_serves(served, session, images)


def test_mismatched_ranks_and_half_modules(served, session):
    bad = dict(served.params["b"])
    bad["head.lora_B"] = np.zeros((10, 3), np.float32)
    with pytest.raises(AdapterFileError, match=r"adapter 'r'.*'head.lora_B' has head.rank = 3.*'head.lora_A' has 4"):
        session.load_adapter("r", bad)
    half = {k: v for k, v in served.params["b"].items() if k != "conv1.lora_B"}
    with pytest.raises(AdapterFileError, match=r"adapter 'h' sets 'conv1.lora_A' but not 'conv1.lora_B'"):
        session.load_adapter("h", half)
    with pytest.raises(AdapterFileError, match=r"adapter 'x' holds no parameters"):
        session.load_adapter("x", {})


def test_writing_a_bad_adapter_against_the_model_is_refused(served, tmp_path):
    bad = dict(served.params["b"])
    bad["head.lora_A"] = np.zeros((4, 65), np.float32)
    with pytest.raises(AdapterFileError, match="adapter 'bad'"):
        write_adapter(tmp_path / "bad.onnx_adapter", bad, model=served.swappable)
    assert not (tmp_path / "bad.onnx_adapter").exists()


@pytest.mark.parametrize("cut", [0.5, 0.1])
def test_truncated_adapter_file(served, session, mixed, images, tmp_path, cut):
    data = served.files["b"].read_bytes()
    path = tmp_path / "cut.onnx_adapter"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(AdapterFileError, match=r"adapter 'cut'.*not a readable .onnx_adapter file"):
        session.load_adapter("cut", path)
    with pytest.raises(AdapterFileError, match=r"adapter 'cut'"):
        mixed.set_adapters({"a": served.files["a"], "cut": path})
    with pytest.raises(AdapterFileError, match=r"adapter 'gone': no file"):
        session.load_adapter("gone", tmp_path / "missing.onnx_adapter")
    still_serves(served, session, images)
    assert mixed.adapter_names == ["a", "b"]


def test_unknown_adapter_name(served, session, mixed, images):
    with pytest.raises(UnknownAdapterError, match=r"adapter 'zeta' is not loaded; loaded: \['a'\]"):
        session.run({"image": images}, "zeta")
    with pytest.raises(UnknownAdapterError, match=r"adapter 'zeta' is not loaded"):
        session.unload_adapter("zeta")
    with pytest.raises(UnknownAdapterError, match=r"row 1: adapter 'zeta' is not in this session's set \['a', 'b'\]"):
        mixed.run({"image": images[:3]}, ["a", "zeta", None])
    with pytest.raises(ServingError, match="already loaded"):
        session.load_adapter("a", served.files["b"])
    still_serves(served, session, images)
    out = mixed.run({"image": images[:2]}, ["b", None])["output"]
    np.testing.assert_allclose(out[0], served.reference("b", images[:1])[0], atol=ATOL)


def test_out_of_range_adapter_index(served, mixed, images):
    for idx in ([0, 2, -1], [0, -2, 1]):
        with pytest.raises(AdapterIndexError, match=rf"row 1: adapter index {idx[1]} is out of range.*\['a', 'b'\]"):
            mixed.run({"image": images[:3]}, adapter_index=np.array(idx))
    with pytest.raises(AdapterIndexError, match="must be 3 ints"):
        mixed.run({"image": images[:3]}, adapter_index=np.array([0, 1]))
    with pytest.raises(ServingError, match="2 adapter names for a batch of 3 rows"):
        mixed.run({"image": images[:3]}, ["a", "b"])
    out = mixed.run({"image": images[:3]}, adapter_index=np.array([1, -1, 0]))["output"]
    np.testing.assert_allclose(out[2], served.reference("a", images[2:3])[0], atol=ATOL)


def test_bad_inputs_name_the_adapter(served, session, images):
    with pytest.raises(ServingError, match=r"missing \['image'\]"):
        session.run({"img": images}, "a")
    with pytest.raises(ServingError, match="loaded with load_adapter"):
        session.run({"image": images, "head.lora_A": np.zeros((1, 64), np.float32)}, "a")
    with pytest.raises(ServingError, match=r"adapter 'a': onnxruntime failed"):
        session.run({"image": images[:, :, :8]}, "a")
    still_serves(served, session, images)


def test_graph_without_lora_and_model_without_slots(served):
    from flora_graph.frontend import capture
    from flora_graph.models import demo_inputs

    g = capture(served.base, demo_inputs(2), {"image": {0: "batch"}})
    with pytest.raises(ServingError, match="has no LoRA branch"):
        export_swappable(g)
    with pytest.raises(ServingError, match="not a mixed one"):
        MixedAdapterSession(served.swappable)
    with pytest.raises(ServingError, match="cannot load"):
        AdapterSession(b"not an onnx model")
