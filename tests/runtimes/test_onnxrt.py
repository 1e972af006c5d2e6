"""The ``onnxruntime`` backend: a LoRA model against eager torch, input checking, errors, options, saving."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from flora_graph.errors import FloraGraphError, RuntimeInputError
from flora_graph.frontend import capture
from flora_graph.ir import Graph, Op, verify
from flora_graph.models import build_demo_model, demo_inputs
from flora_graph.runtimes import onnx_writer, run
from flora_graph.runtimes.executable import BACKENDS, compile
from flora_graph.runtimes.onnxrt import OnnxRuntimeError, OnnxRuntimeExecutable

ATOL = RTOL = 1e-5
SPINNING = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def build(graph: Graph, **options: Any) -> OnnxRuntimeExecutable:
    """``compile(graph, "onnxruntime")``; straight from the registry if another backend module fails to import."""
    try:
        exe = compile(graph, "onnxruntime", **options)
    except ImportError:  # a sibling backend mid-edit must not hide this one
        exe = BACKENDS["onnxruntime"](verify(graph), **options)
    assert isinstance(exe, OnnxRuntimeExecutable)
    return exe


def small_graph() -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("small")
    x = g.input("x", ("batch", 6))
    m = g.input("mask", ("batch", 4))
    h = g.add(Op.LINEAR, [x, g.const("w", rng.standard_normal((4, 6)).astype(np.float32))], name="h")
    y = g.add(Op.RESHAPE, [g.add(Op.MUL, [h, m], name="masked")], {"shape": (0, 2, 2)}, name="y")
    g.set_output("y", y)
    g.set_output("h", h)
    return verify(g)


def small_feeds(batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"x": rng.standard_normal((batch, 6)).astype(np.float32), "mask": np.ones((batch, 4), np.float32)}


@pytest.fixture(scope="module")
def small() -> OnnxRuntimeExecutable:
    return build(small_graph())


def test_registered_and_compiles(small: OnnxRuntimeExecutable) -> None:
    assert "onnxruntime" in BACKENDS and small.backend == "onnxruntime"
    assert isinstance(small.model, onnx.ModelProto) and isinstance(small.session, ort.InferenceSession)
    assert small.input_names == ["x", "mask"] and small.output_names == ["y", "h"]


def test_runs_like_reference(small: OnnxRuntimeExecutable) -> None:
    for batch in (1, 4):
        feeds = small_feeds(batch)
        got, want = small(feeds), run(small.graph, feeds)
        assert list(got) == ["y", "h"]
        for k in want:
            assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
            np.testing.assert_allclose(got[k], want[k], atol=ATOL, rtol=RTOL)
    torch_feeds = {k: torch.from_numpy(v) for k, v in small_feeds(2).items()}
    np.testing.assert_allclose(small(**torch_feeds)["h"], run(small.graph, small_feeds(2))["h"], atol=ATOL, rtol=RTOL)


def test_lora_demo_model_matches_eager_torch() -> None:
    model = build_demo_model()
    exe = build(capture(model, demo_inputs(2), {"image": {0: "batch"}}))
    dims = exe.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    for batch in (1, 5):
        inputs = demo_inputs(batch, seed=batch)
        with torch.no_grad():
            want = model(**inputs).numpy()
        got = exe(inputs)["output"]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- bad inputs
class _Untouchable:
    """Stands in for the session: validation must fail before anything reaches onnxruntime."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the session was called with invalid inputs")


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"x": np.ones((2, 6), np.float32)}, "missing input"),
        ({**small_feeds(2), "extra": np.ones(1)}, "unknown input"),
        ({**small_feeds(2), "x": np.ones((2, 5), np.float32)}, "dim 1 has size 5"),
        ({**small_feeds(2), "x": np.ones((2, 6, 1), np.float32)}, "rank 3"),
        ({**small_feeds(2), "x": np.ones((3, 6), np.float32)}, "binds dim 'batch'"),
        ({**small_feeds(2), "x": np.array([["a"] * 6] * 2)}, "cannot be cast"),
        ({**small_feeds(2), "x": np.ones((2, 6), dtype=bool)}, "cannot be cast"),
        ({**small_feeds(2), "x": object()}, "x"),
    ],
)
def test_bad_inputs_raise_runtime_input_error(
    small: OnnxRuntimeExecutable, monkeypatch: pytest.MonkeyPatch, feeds: dict[str, Any], message: str
) -> None:
    monkeypatch.setattr(small, "session", _Untouchable())
    with pytest.raises(RuntimeInputError, match=message):
        small(feeds)


def test_runtime_failure_is_a_flora_error(small: OnnxRuntimeExecutable, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = onnx.ModelProto()
    broken.CopyFrom(small.model)
    (shape,) = [t for t in broken.graph.initializer if t.name.endswith("/shape")]
    shape.CopyFrom(onnx.numpy_helper.from_array(np.array([7, -1], np.int64), shape.name))  # fails for any batch
    monkeypatch.setattr(small, "session", ort.InferenceSession(broken.SerializeToString()))
    with pytest.raises(OnnxRuntimeError, match="onnxruntime failed running graph 'small'") as err:
        small(small_feeds(2))
    assert isinstance(err.value, FloraGraphError)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "\n" not in str(err.value)


def test_session_creation_failure_is_a_flora_error() -> None:
    g = Graph("conv64")  # onnxruntime's CPU provider has no float64 Conv kernel
    x = g.input("x", ("batch", 2, 5, 5), dtype="float64")
    g.set_output("y", g.add(Op.CONV2D, [x, g.const("k", np.ones((3, 2, 3, 3)))]))
    with pytest.raises(OnnxRuntimeError, match="cannot load graph 'conv64'"):
        build(g)


def test_bfloat16_inputs_and_outputs() -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    g = Graph("bf16")
    x = g.input("x", ("batch", 4), dtype="bfloat16")
    w = g.const("w", np.linspace(-1, 1, 12).reshape(3, 4).astype(bf16))
    g.set_output("y", g.add(Op.GELU, [g.add(Op.LINEAR, [x, w])]))
    g.set_output("x_again", x)
    exe = build(verify(g))
    assert exe.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(bf16)}
    got, want = exe(feeds), run(g, feeds)
    for k in want:
        assert got[k].dtype == bf16
        np.testing.assert_allclose(got[k].astype(np.float32), want[k].astype(np.float32), atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------- options
def test_session_options_default_no_spinning(small: OnnxRuntimeExecutable) -> None:
    for key in SPINNING:
        assert small.session_options.get_session_config_entry(key) == "0"
        assert small.session.get_session_options().get_session_config_entry(key) == "0"


def test_session_options_honoured() -> None:
    exe = build(small_graph(), intra_op_threads=2, inter_op_threads=1, graph_optimization_level="basic",
                allow_spinning=True, providers=["CPUExecutionProvider"])
    for opts in (exe.session_options, exe.session.get_session_options()):
        assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert [opts.get_session_config_entry(k) for k in SPINNING] == ["1", "1"]
    assert exe.session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_allclose(exe(small_feeds())["y"], run(exe.graph, small_feeds())["y"], atol=ATOL, rtol=RTOL)
    disabled = build(small_graph(), graph_optimization_level="disable")
    assert disabled.session_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"graph_optimization_level": "max"}, "graph_optimization_level"),
        ({"intra_op_threads": -1}, "intra_op_threads"),
        ({"inter_op_threads": 1.5}, "inter_op_threads"),
        ({"allow_spinning": "no"}, "allow_spinning"),
        ({"providers": ["NoSuchExecutionProvider"]}, "NoSuchExecutionProvider"),
        ({"threads": 2}, "no option"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FloraGraphError, match=message):
        build(small_graph(), **options)


# --------------------------------------------------------------------------- saving
def test_save_returns_path_and_reloads(small: OnnxRuntimeExecutable, tmp_path: Path) -> None:
    path = small.save(tmp_path / "out" / "small.onnx")
    assert path == tmp_path / "out" / "small.onnx" and sorted(p.name for p in path.parent.iterdir()) == ["small.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, _h = sess.run(None, small_feeds())
    np.testing.assert_allclose(y, small(small_feeds())["y"], atol=0, rtol=0)


def test_save_failure_names_path(small: OnnxRuntimeExecutable, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "small.onnx"
    with pytest.raises(FloraGraphError, match=re.escape(str(target))):
        small.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_large_model_goes_through_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    g = Graph("wide")
    x = g.input("x", ("batch", 64))
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)  # 16 KiB: past the threshold
    g.set_output("y", g.add(Op.TANH, [g.add(Op.LINEAR, [x, g.const("w", w)])]))
    exe = build(g)
    assert exe._tmpdir is not None  # the session was loaded from a file with external data
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}
    np.testing.assert_allclose(exe(feeds)["y"], run(g, feeds)["y"], atol=ATOL, rtol=RTOL)
    path = exe.save(tmp_path / "wide.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.onnx", "wide.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feeds)[0], exe(feeds)["y"], atol=0, rtol=0)
