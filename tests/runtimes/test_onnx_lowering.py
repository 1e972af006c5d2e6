"""ONNX lowering: the model's form (node types, attributes, initializers), opsets, saving.

Every op on onnxruntime (and the other backends) against the numpy reference is the family
tables of ``tests/ops/test_<family>.py``; the one-node graphs of :data:`CASES` here are the
subjects of the structure tests. Each builds a graph whose inputs declare dim 0 as
``"batch"``, lowers it once and runs the same ONNX model at batch sizes 2 and 5. Tolerances are
fp32: atol = rtol = 1e-5 everywhere (GELU and LayerNorm pass at 1e-5 as well: onnxruntime's
erf/tanh and its normalisation differ from the float64 reference by a few float32 ulps).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import uses_external_data

from flora_graph.errors import FloraGraphError, UnsupportedOpError
from flora_graph.ir import Graph, Op, OpGroup, verify
from flora_graph.ops import OPS
from flora_graph.runtimes import onnx_lowering, onnx_writer, run
from flora_graph.runtimes.onnx_lowering import DEFAULT_OPSET, OnnxExportError, to_onnx
from flora_graph.runtimes.onnx_writer import save_onnx

from ..ir.helpers import rich_graph

ATOL = RTOL = 1e-5
BATCHES = (2, 5)
OTHER_DIMS = {"h": 5, "w": 6}  # sizes of named dims other than "batch"


def ort_run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (a proto or a file) in a fresh CPU session; outputs by name."""
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def one_op(op: Op, args: Sequence[tuple | np.ndarray], attrs: dict[str, Any] | None = None) -> Graph:
    """``y = op(*args)``: a tuple is an input ``x<k>`` of that declared shape, an array a Const ``p<k>``."""
    g = Graph(f"one_{op.value.lower()}")
    nodes = [
        g.input(f"x{k}", a) if isinstance(a, tuple) else g.const(f"p{k}", a) for k, a in enumerate(args)
    ]
    g.set_output("y", g.add(op, nodes, attrs or {}, name="node"))
    return verify(g)


def feeds_for(g: Graph, batch: int, rng: np.random.Generator, *, positive: bool = False) -> dict[str, np.ndarray]:
    """Seeded float32 inputs with ``"batch"`` bound to ``batch``."""
    out = {}
    for n in g.inputs:
        shape = [batch if d == "batch" else OTHER_DIMS.get(d, d) for d in n.shape]
        v = rng.standard_normal(shape).astype(np.float32)
        out[n.name] = np.abs(v) + 0.5 if positive else v
    return out


def assert_matches_reference(g: Graph, opset: int = DEFAULT_OPSET, *, atol: float = ATOL, rtol: float = RTOL,
                             positive: bool = False) -> onnx.ModelProto:
    model = to_onnx(g, opset)
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        feeds = feeds_for(g, batch, rng, positive=positive)
        want, got = run(g, feeds), ort_run(model, feeds)
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=rtol, err_msg=f"{g.name} batch={batch} {k}")
    return model


def w(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CONV_X = ("batch", 4, 9, 9)
CASES: dict[str, tuple[Op, list[Any], dict[str, Any]]] = {  # the structure tests' graphs; op numbers: tests/ops
    "linear_2d_bias": (Op.LINEAR, [("batch", 6), w(4, 6), w(4)], {}),
    "linear_3d_bias": (Op.LINEAR, [("batch", 3, 6), w(4, 6), w(4)], {}),
    "linear_1d_weight_input": (Op.LINEAR, [("batch", 3, 6), (4, 6)], {}),
    "conv_all": (Op.CONV2D, [CONV_X, w(6, 2, 3, 3), w(6)],
                 {"stride": (2, 3), "padding": (1, 2), "dilation": (1, 2), "groups": 2}),
    "gelu_exact": (Op.GELU, [("batch", 3, 7)], {}),
    "gelu_tanh": (Op.GELU, [("batch", 3, 7)], {"approximate": "tanh"}),
    "silu": (Op.SILU, [("batch", 7)], {}),
    "layernorm_plain": (Op.LAYER_NORM, [("batch", 3, 8)], {}),
    "layernorm_dynamic_plain": (Op.LAYER_NORM, [("batch", 3)], {"axis": 0}),
    "reshape_copy_infer": (Op.RESHAPE, [("batch", 2, 6)], {"shape": (0, -1)}),
}


def test_every_op_has_a_lowering() -> None:
    assert set(OPS) == set(Op) - OpGroup.Leaf


@pytest.mark.parametrize("case", ["gelu_exact", "gelu_tanh", "linear_3d_bias", "layernorm_plain", "conv_all"])
def test_op_matches_reference_at_opset_18(case: str) -> None:
    op, args, attrs = CASES[case]
    model = assert_matches_reference(one_op(op, args, attrs), 18)
    assert model.opset_import[0].version == 18


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_form_by_opset(approximate: str) -> None:
    g = one_op(Op.GELU, [("batch", 3)], {"approximate": approximate})
    (native,) = to_onnx(g, 20).graph.node
    assert native.op_type == "Gelu" and native.attribute[0].s.decode() == approximate
    formula = {n.op_type for n in to_onnx(g, 18).graph.node}
    assert "Gelu" not in formula and ("Erf" if approximate == "none" else "Tanh") in formula


@pytest.mark.parametrize(
    ("case", "op_types"),
    [
        ("linear_2d_bias", ["Gemm"]),
        ("linear_3d_bias", ["MatMul", "Add"]),
        ("linear_1d_weight_input", ["Transpose", "MatMul"]),
        ("silu", ["Sigmoid", "Mul"]),
        ("layernorm_plain", ["LayerNormalization"]),
        ("layernorm_dynamic_plain", ["Shape", "ConstantOfShape", "LayerNormalization"]),
        ("conv_all", ["Conv"]),
        ("reshape_copy_infer", ["Reshape"]),
    ],
)
def test_structure(case: str, op_types: list[str]) -> None:
    op, args, attrs = CASES[case]
    model = to_onnx(one_op(op, args, attrs))
    assert [n.op_type for n in model.graph.node] == op_types


def test_linear_weight_is_pretransposed_initializer() -> None:
    op, args, attrs = CASES["linear_3d_bias"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in to_onnx(one_op(op, args, attrs)).graph.initializer}
    np.testing.assert_array_equal(inits["p1.T"], args[1].T)
    assert set(inits) == {"p1.T", "p2"}


def test_conv_attributes() -> None:
    op, args, attrs = CASES["conv_all"]
    (conv,) = to_onnx(one_op(op, args, attrs)).graph.node
    got = {a.name: list(a.ints) if a.ints else a.i for a in conv.attribute}
    assert got == {"kernel_shape": [3, 3], "strides": [2, 3], "pads": [1, 2, 1, 2], "dilations": [1, 2], "group": 2}


# --------------------------------------------------------------------------- Split grouping
def split_graph(indices: Sequence[int], *, duplicate: bool = False) -> Graph:
    g = Graph("split")
    x = g.input("x", ("batch", 10))
    for i in indices:
        g.set_output(f"piece{i}", g.add(Op.SPLIT, [x], {"axis": -1, "sizes": (3, 3, 4), "index": i}, name=f"s{i}"))
    if duplicate:  # same group spelled with a positive axis, and a second copy of piece 0
        g.set_output("again", g.add(Op.SPLIT, [x], {"axis": 1, "sizes": (3, 3, 4), "index": 0}, name="again"))
    g.set_output("other", g.add(Op.SPLIT, [x], {"axis": 1, "sizes": (5, 5), "index": 1}, name="other"))
    return verify(g)


@pytest.mark.parametrize(("indices", "duplicate"), [((0, 1, 2), False), ((2, 0, 1), True), ((1,), False)])
def test_split_groups_into_one_onnx_split(indices: tuple[int, ...], duplicate: bool) -> None:
    g = split_graph(indices, duplicate=duplicate)
    model = assert_matches_reference(g)
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == 2  # one per (input, axis, sizes)
    assert [len(s.output) for s in splits] == [3, 2]
    assert [f"piece{i}" for i in sorted(indices)] == [o for o in splits[0].output if o in g.outputs]
    assert [n.op_type for n in model.graph.node].count("Identity") == int(duplicate)


# --------------------------------------------------------------------------- the exported model
def lora_graph() -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("lora")
    x = g.input("tokens", ("batch", "seq", 8))
    base = g.add(Op.LINEAR, [x, g.const("w", rng.standard_normal((8, 8)).astype(np.float32)),
                             g.const("b", rng.standard_normal(8).astype(np.float32))], name="base")
    down = g.add(Op.LINEAR, [x, g.const("lora_A", rng.standard_normal((2, 8)).astype(np.float32))], name="down")
    up = g.add(Op.LINEAR, [down, g.const("lora_B", rng.standard_normal((8, 2)).astype(np.float32))], name="up")
    y = g.add(Op.ADD, [base, g.add(Op.MUL, [up, g.const("scale", np.array(0.5, np.float32))])], name="y")
    flat = g.add(Op.RESHAPE, [y], {"shape": (-1, 8)}, name="flat")
    g.set_output("hidden", y)
    g.set_output("flat", flat)
    return verify(g)


def test_exported_model_form() -> None:
    g = lora_graph()
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].domain == "" and model.opset_import[0].version >= 18
    assert [i.name for i in model.graph.input] == ["tokens"]
    assert [o.name for o in model.graph.output] == ["hidden", "flat"]
    dims = [(d.dim_param or d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 8]
    out_dims = [[(d.dim_param or d.dim_value) for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    assert out_dims == [["batch", "seq", 8], ["batch*seq", 8]]
    inits = {t.name for t in model.graph.initializer}
    assert {"w.T", "b", "lora_A.T", "lora_B.T", "scale"} <= inits
    assert "Constant" not in {n.op_type for n in model.graph.node}
    rng = np.random.default_rng(1)
    for b, s in ((1, 3), (4, 2)):
        feeds = {"tokens": rng.standard_normal((b, s, 8)).astype(np.float32)}
        got, want = ort_run(model, feeds), run(g, feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=ATOL, rtol=RTOL)


def test_outputs_that_are_leaves_or_repeat_a_node() -> None:
    g = Graph("odd_outputs")
    x = g.input("x", ("batch", 3))
    r = g.add(Op.RELU, [x], name="out")  # a node named like an output it is not
    g.set_output("x", x)  # an input passed through under its own name
    g.set_output("r1", r)
    g.set_output("r2", r)
    g.set_output("out_alias", r)
    g.set_output("w", g.const("w", np.arange(3, dtype=np.int64)))
    g.set_output("out", g.add(Op.NEG, [r], name="neg"))
    assert_matches_reference(verify(g))


def test_missing_lowering_names_op_and_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(OPS, Op.GELU)
    g = one_op(Op.GELU, [("batch", 3)])
    with pytest.raises(UnsupportedOpError, match=r"Gelu.*'node'") as err:
        to_onnx(g)
    assert err.value.ops == {"Gelu": ["node"]}


@pytest.mark.parametrize("opset", [17, 10_000])
def test_bad_opset(opset: int) -> None:
    with pytest.raises(OnnxExportError, match=f"opset {opset}"):
        to_onnx(lora_graph(), opset)


def test_widened_float16_matches_reference() -> None:
    g = Graph("half")
    x = g.input("x", ("batch", 4), dtype="float16")
    wt = g.const("w", w(3, 4).astype(np.float16))
    h = g.add(Op.GELU, [g.add(Op.LINEAR, [x, wt])])
    g.set_output("y", g.add(Op.SOFTMAX, [g.add(Op.TRANSPOSE, [h], {"perm": (1, 0)})], {"axis": 0}))
    model = to_onnx(verify(g))
    assert "Cast" in {n.op_type for n in model.graph.node}
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 4)).astype(np.float16)}
    got, want = ort_run(model, feeds)["y"], run(g, feeds)["y"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- saving
def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_save_round_trip(tmp_path: Path) -> None:
    g = lora_graph()
    path = save_onnx(g, tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx" and listing(tmp_path) == ["m.onnx"]
    save_onnx(to_onnx(g), path)  # overwriting in place
    onnx.checker.check_model(str(path), full_check=True)
    feeds = {"tokens": np.ones((2, 3, 8), np.float32)}
    np.testing.assert_allclose(ort_run(path, feeds)["flat"], run(g, feeds)["flat"], atol=ATOL, rtol=RTOL)


def test_save_under_a_file_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "sub" / "m.onnx"
    with pytest.raises(OnnxExportError, match=re.escape(str(target))) as err:
        save_onnx(lora_graph(), target)
    assert isinstance(err.value, FloraGraphError)
    assert listing(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "not a directory"


def test_save_into_read_only_directory_fails_cleanly(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits: use a regular file as the parent instead
            (tmp_path / "plain").write_text("")
            target = tmp_path / "plain" / "m.onnx"
        else:
            target = ro / "m.onnx"
        with pytest.raises(OnnxExportError, match=re.escape(str(target))):
            save_onnx(lora_graph(), target)
        assert listing(ro) == []
        assert listing(tmp_path) in (["ro"], ["plain", "ro"])
    finally:
        ro.chmod(0o700)


def big_graph() -> Graph:
    g = Graph("big")
    x = g.input("x", ("batch", 64))
    h = g.add(Op.LINEAR, [x, g.const("w1", w(64, 64)), g.const("b1", w(64))], name="h")
    g.set_output("y", g.add(Op.LINEAR, [g.add(Op.TANH, [h]), g.const("w2", w(32, 64, seed=3))], name="y"))
    return verify(g)


def test_external_data_past_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    g = big_graph()
    model = to_onnx(g)
    path = save_onnx(model, tmp_path / "big.onnx")
    assert listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert all(t.raw_data for t in model.graph.initializer)  # the caller's model keeps its weights
    on_disk = onnx.load(str(path), load_external_data=False)
    assert sum(uses_external_data(t) for t in on_disk.graph.initializer) == 2  # w1, w2; b1 is under 1 KiB
    onnx.checker.check_model(str(path), full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(path, feeds)["y"], run(g, feeds)["y"], atol=ATOL, rtol=RTOL)


def test_external_data_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    model = to_onnx(big_graph())
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "big.onnx"
    with pytest.raises(OnnxExportError, match=re.escape(str(target))):
        save_onnx(model, target)
    assert listing(tmp_path) == ["file"]

    def refuse(model: Any, where: str) -> None:
        raise OnnxExportError(f"{where}: refused")

    monkeypatch.setattr(onnx_writer, "check_model", refuse)
    with pytest.raises(OnnxExportError, match="refused"):
        save_onnx(model, tmp_path / "big.onnx")
    assert listing(tmp_path) == ["file"]


def test_float64_stays_float64() -> None:
    rng = np.random.default_rng(0)
    g = Graph("double")
    x = g.input("x", ("batch", 3, 8), dtype="float64")
    h = g.add(Op.LINEAR, [x, g.const("w", rng.standard_normal((8, 8))), g.const("b", rng.standard_normal(8))])
    h = g.add(Op.LAYER_NORM, [g.add(Op.SILU, [h])], {"axis": -2})
    flat = g.add(Op.FLATTEN, [g.add(Op.SOFTMAX, [h], {"axis": 1})])
    g.set_output("y", g.add(Op.TANH, [g.add(Op.LINEAR, [flat, g.const("w2", rng.standard_normal((4, 24)))])]))
    model = to_onnx(verify(g))
    (ln,) = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert {a.name: a.i for a in ln.attribute}["stash_type"] == onnx.TensorProto.DOUBLE
    feeds = {"x": rng.standard_normal((4, 3, 8))}
    got, want = ort_run(model, feeds)["y"], run(g, feeds)["y"]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-12)


def test_rich_graph_every_dtype() -> None:
    g = rich_graph()
    del g.outputs["vision"]  # float64 Conv: valid ONNX, but onnxruntime's CPU provider has no kernel for it
    g.remove_dead()
    model = to_onnx(verify(g))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 4, 8)).astype(np.float32), "h": rng.standard_normal((4, 4)).astype(np.float16),
             "img": rng.standard_normal((3, 4, 9, 9))}
    got, want = ort_run(model, feeds), run(g, feeds)
    assert list(got) == list(want) == ["z_flat", "a_neg", "half", "mask", "steps"]
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, rtol=RTOL, err_msg=k)


def test_saved_graph_is_the_model_to_onnx_returns(tmp_path: Path) -> None:
    """save_onnx writes a graph's weights straight from its arrays (after the rest of the model, as a
    second graph field protobuf merges); reading the file back gives exactly to_onnx's model."""
    for g in (big_graph(), lora_graph()):
        path = save_onnx(g, tmp_path / f"{g.name}.onnx")
        assert onnx.load(str(path)).SerializeToString() == to_onnx(g).SerializeToString()
        onnx.checker.check_model(str(path), full_check=True)


def test_transposed_weights_are_written_transposed(tmp_path: Path) -> None:
    g = Graph("t")
    x = g.input("x", ("batch", 3, 40))
    g.set_output("y", g.add(Op.LINEAR, [x, g.const("w", w(70, 40))]))  # 3-D x: MatMul with W.T
    model = onnx.load(str(save_onnx(verify(g), tmp_path / "t.onnx")))
    (wt,) = [t for t in model.graph.initializer if t.name == "w.T"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(wt), g.params["w"].T)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 40)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(tmp_path / "t.onnx", feeds)["y"], run(g, feeds)["y"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("rank", [2, 3])
def test_a_tied_table_is_written_once(tmp_path: Path, rank: int) -> None:
    """An embedding's table that a linear layer also reads (an output layer tied to it) is written once: the layer is
    a ``Gemm`` with ``transB`` on the table itself (its input flattened to 2-D and the leading dims given back), not a
    ``MatMul`` on a transposed copy; outputs equal the numpy interpreter's. An untied layer keeps its ``MatMul``."""
    g = Graph("tied")
    ids = g.input("ids", ("batch", "seq")[:rank - 1], dtype="int64")
    table = g.const("table", w(50, 40))
    hidden = g.add(Op.GATHER, [table, ids], {"axis": 0})
    g.set_output("logits", g.add(Op.LINEAR, [hidden, table]))
    g.set_output("other", g.add(Op.LINEAR, [hidden, g.const("head", w(30, 40, seed=2))]))
    model = onnx.load(str(save_onnx(verify(g), tmp_path / "tied.onnx")))
    assert [t.name for t in model.graph.initializer if sorted(t.dims) == [40, 50]] == ["table"]
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and n.input[1] == "table"]
    assert len(gemms) == 1 and {a.name: a.i for a in gemms[0].attribute}.get("transB") == 1
    if rank == 3:  # a 2-D input is a Gemm on the weight as it is anyway; a 3-D one a MatMul on a transposed copy
        assert [n.input[1] for n in model.graph.node if n.op_type == "MatMul"] == ["head.T"]
    onnx.checker.check_model(str(tmp_path / "tied.onnx"), full_check=True)
    for batch in BATCHES:
        shape = (batch, 7)[:rank - 1]
        feeds = {"ids": np.random.default_rng(batch).integers(0, 50, shape)}
        got, want = ort_run(tmp_path / "tied.onnx", feeds), run(g, feeds)
        for name in ("logits", "other"):
            assert got[name].shape == (*shape, 50 if name == "logits" else 30)
            np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("limit", ["EXTERNAL_DATA_THRESHOLD", "DATA_FILE_BYTES"])
def test_saved_graph_past_threshold_uses_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       limit: str) -> None:
    """Past protobuf's limit, or past the size from which a data file loads faster (each set low here), a graph is
    written with its weights in a data file beside the model."""
    monkeypatch.setattr(onnx_writer, limit, 10_000)
    g = big_graph()
    path = save_onnx(g, tmp_path / "big.onnx")
    assert listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    on_disk = onnx.load(str(path), load_external_data=False)
    assert sum(uses_external_data(t) for t in on_disk.graph.initializer) == 2  # w1, w2; b1 is under 1 KiB
    onnx.checker.check_model(str(path), full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(path, feeds)["y"], run(g, feeds)["y"], atol=ATOL, rtol=RTOL)


def test_checker_sees_the_weights_it_does_not_serialize() -> None:
    """The checker runs with the big weights as typed inputs: a weight of the wrong shape is refused
    by shape inference, and a broken node by the structural check."""
    model, weights = onnx_lowering.lower(big_graph(), check=False)
    assert set(weights) == {"w1", "w2"} and not {t.name for t in model.graph.initializer} & set(weights)
    onnx_lowering.check_lowered(model, weights, "ok")
    with pytest.raises(OnnxExportError, match=r"wrong shape: onnx\.checker refused"):
        onnx_lowering.check_lowered(model, {**weights, "w1": np.zeros((64, 65), np.float32)}, "wrong shape")
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(OnnxExportError, match=r"broken: onnx\.checker refused"):
        onnx_lowering.check_lowered(model, weights, "broken")
