"""Schemas of the transformer op family: shape and dtype inference, "dims" attributes, bad cases, files.

``TYPED_INFER_CASES`` holds the rows whose inputs or result are not all float32 (indices,
bool, casts, sources); ``test_ops_schema.INFER_CASES`` holds the float rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir import Graph, Op, OpGroup, verify
from flora_graph.ir.shapes import eval_dim
from flora_graph.ops.movement import SLICE_END, slice_size

from .helpers import assert_graphs_equal
from .test_ops_schema import infer, raises_naming

END = 2**63 - 1

# (op, input shapes, input dtypes, attrs, expected shape, expected dtype)
TYPED_INFER_CASES: list[tuple[Op, list, list[str], dict | None, tuple, str]] = [
    (Op.GATHER, [(259, 64), ("batch", "seq")], ["float32", "int64"], None, ("batch", "seq", 64), "float32"),
    (Op.GATHER, [("batch", 5, 3), (2, 2)], ["float16", "int32"], {"axis": 1}, ("batch", 2, 2, 3), "float16"),
    (Op.GATHER, [("batch", 5, 3), ()], ["int64", "int64"], {"axis": -2}, ("batch", 3), "int64"),
    (Op.GATHER_ELEMENTS, [("batch", 5), ("batch", 3)], ["float32", "int64"], {"axis": 1}, ("batch", 3), "float32"),
    (Op.INDEX, [("batch", "seq"), ("batch", 1, 1), (1, "seq", 1)], ["int64", "int64", "int64"], None, ("batch", "seq", 1), "int64"),
    (Op.INDEX, [("batch", 5, 4, 3), (2, 1), (3,)], ["float32", "int64", "int32"], {"axis": 1}, ("batch", 2, 3, 3), "float32"),
    (Op.EQUAL, [("batch", "seq"), (1, "seq")], ["int64", "int64"], None, ("batch", "seq"), "bool"),
    (Op.LESS, [("seq", 1), ("seq",)], ["int64", "int64"], None, ("seq", "seq"), "bool"),
    (Op.LESS_OR_EQUAL, [("batch", 3), ()], ["float32", "float32"], None, ("batch", 3), "bool"),
    (Op.GREATER, [("batch", 3), (3,)], ["bool", "bool"], None, ("batch", 3), "bool"),
    (Op.GREATER_OR_EQUAL, [(2, 1), (1, 4)], ["float16", "float16"], None, (2, 4), "bool"),
    (Op.NOT, [("batch", "seq")], ["bool"], None, ("batch", "seq"), "bool"),
    (Op.AND, [("batch", 1, "seq"), ("seq",)], ["bool", "bool"], None, ("batch", 1, "seq"), "bool"),
    (Op.OR, [("batch", 1), (1, "seq")], ["bool", "bool"], None, ("batch", "seq"), "bool"),
    (Op.WHERE, [("seq", "seq"), ("batch", 1, "seq", "seq"), ()], ["bool", "float32", "float32"], None,
     ("batch", 1, "seq", "seq"), "float32"),
    (Op.CAST, [("batch", "seq")], ["float32"], {"to": "int64"}, ("batch", "seq"), "int64"),
    (Op.CAST, [("batch",)], ["bool"], {"to": "bfloat16"}, ("batch",), "bfloat16"),
    (Op.REDUCE_SUM, [("batch", "seq")], ["int64"], {"axes": (1,), "keepdims": 0}, ("batch",), "int64"),
    (Op.CUMSUM, [("batch", "seq")], ["int32"], {"axis": -1}, ("batch", "seq"), "int32"),
    (Op.SDPA, [("b", 2, "seq", 4), ("b", 2, "kv", 4), ("b", 2, "kv", 5), ("seq", "kv")], ["float32"] * 3 + ["bool"], None,
     ("b", 2, "seq", 5), "float32"),
    (Op.ARANGE, [], [], {"end": "seq"}, ("seq",), "int64"),
    (Op.ARANGE, [], [], {"start": 2, "end": 11, "step": 3, "dtype": "float32"}, (3,), "float32"),
    (Op.ARANGE, [], [], {"start": 5, "end": -3, "step": -2}, (4,), "int64"),
    (Op.ARANGE, [], [], {"end": "seq*batch", "dtype": "int32"}, ("batch*seq",), "int32"),
    (Op.EXPAND, [()], ["bool"], {"shape": ("batch", 1, "seq")}, ("batch", 1, "seq"), "bool"),
    (Op.LORA_MIXED_SLOT, [("batch", 5, 4), ("batch", 5, 8), ("slots", 8, "r"), ("slots", "r", 4), ("batch",)],
     ["float16"] * 4 + ["int64"], {"module": "fc"}, ("batch", 5, 4), "float16"),
]


def typed(op: Op, shapes, dtypes, attrs):
    g = Graph("t")
    ins = [g.input(f"in{i}", s, d) for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))]
    return g.add(op, ins, attrs, name="node_under_test")


@pytest.mark.parametrize(("op", "shapes", "dtypes", "attrs", "want", "dtype"), TYPED_INFER_CASES,
                         ids=lambda v: getattr(v, "value", None))
def test_typed_infer(op, shapes, dtypes, attrs, want, dtype):
    node = typed(op, shapes, dtypes, attrs)
    assert node.shape == want and node.dtype == dtype


# --------------------------------------------------------------------------- "dims" attributes
def test_dims_attributes_are_canonical_and_keep_ints() -> None:
    node = infer(Op.SLICE, [("batch", "seq", 8)], {"axes": [1], "starts": [-2], "ends": [END], "steps": [1]})
    assert node.attrs == {"axes": (1,), "starts": (-2,), "ends": (END,), "steps": (1,)}
    node = infer(Op.EXPAND, [("batch", 1, 8)], {"shape": ["batch", "seq*2", 8]})
    assert node.attrs["shape"] == ("batch", "2*seq", 8) and node.shape == ("batch", "2*seq", 8)
    node = infer(Op.RESHAPE, [("batch", "seq", 8)], {"shape": ("seq*batch", "4", -1)})
    assert node.attrs["shape"] == ("batch*seq", 4, -1) and node.shape == ("batch*seq", 4, 2)
    node = typed(Op.ARANGE, [], [], {"end": "seq", "start": 0})
    assert node.attrs == {"start": 0, "end": "seq", "step": 1, "dtype": "int64"}


@pytest.mark.parametrize("bad", [("bat ch",), (1.5,), (True,), "seq", ("-seq",), (None,), ("2*",)], ids=str)
def test_bad_dims_attribute_is_a_graph_error_naming_the_node(bad: Any) -> None:
    err = raises_naming(GraphError, Op.EXPAND, [("batch", 1)], {"shape": bad})
    assert not isinstance(err, ShapeError)


def test_bad_dim_attribute() -> None:
    for bad in (1.0, False, "x y", (1,)):
        with pytest.raises(GraphError, match="node_under_test"):
            typed(Op.ARANGE, [], [], {"end": bad})


@pytest.mark.parametrize(
    ("x", "target", "want"),
    [
        (("batch", "seq", 64), ("batch", "seq", 4, -1), ("batch", "seq", 4, 16)),
        (("batch", "seq", 64), (-1, "seq", 64), ("batch", "seq", 64)),
        (("batch", "seq", 64), ("batch*seq", 64), ("batch*seq", 64)),
        (("batch", 2, 2, "seq", 16), (0, 4, "seq", 16), ("batch", 4, "seq", 16)),
        (("batch*seq", 8), ("batch", "seq", 8), ("batch", "seq", 8)),
        (("batch", "samples"), (0, -1, 80), ("batch", "((samples)//80)", 80)),  # raw samples cut into frames
        (("batch", "samples", 2), (0, -1, 160), ("batch", "((samples)//80)", 160)),
        # a dynamic batch regrouped: exact where it divides (the one case the reshape runs), as torch's own
        (("batch", 4), (-1, 3), ("((4*batch)//3)", 3)),
        (("batch", 4), (8, -1), (8, "((batch)//2)")),
    ],
)
def test_reshape_to_named_dims(x, target, want) -> None:
    assert infer(Op.RESHAPE, [x], {"shape": target}).shape == want


def test_reshape_to_named_dims_bad() -> None:
    raises_naming(ShapeError, Op.RESHAPE, [("batch", 64)], {"shape": ("seq", 64)}, match="elements")
    raises_naming(ShapeError, Op.RESHAPE, [("batch", 64)], {"shape": ("seq", -1)}, match="infer")


# --------------------------------------------------------------------------- Slice
@pytest.mark.parametrize("size", [0, 1, 5, 8])
@pytest.mark.parametrize(("start", "end", "step"), [(0, END, 1), (1, 5, 2), (-3, END, 1), (-5, -1, 2), (2, 2, 1), (6, 9, 1),
                                                    (-100, 3, 1), (0, -100, 1), (3, 1, 1)])
def test_static_slice_size_matches_python(size: int, start: int, end: int, step: int) -> None:
    assert slice_size(size, start, end, step) == len(range(size)[start:end:step])


@pytest.mark.parametrize(
    ("dim", "start", "end", "step", "want"),
    [
        ("seq", 0, END, 1, "seq"),
        ("seq", 0, "seq", 1, "seq"),
        ("seq", -2, END, 1, 2),
        ("seq", -5, END, 2, 3),
        ("seq", 0, 1, 1, 1),
        ("seq", 2, 7, 2, 3),
        ("seq", -4, -1, 1, 3),
        (256, 0, "seq", 1, "seq"),
        ("past_seq+seq", "past_seq", END, 1, "seq"),
        ("past_seq+seq", 0, "past_seq", 1, "past_seq"),
        ("seq", 2, -1, 1, "seq-3"),  # as torch.export sizes it (it assumes seq >= 3)
        ("seq", 1, END, 1, "seq-1"),  # likewise (MobileBERT's trigram embedding)
        ("2*seq-3", 0, "seq-1", 1, "seq-1"),  # seq >= 2 where 2*seq-3 >= 0: seq-1 <= 2*seq-3 (a window's half)
        ("2*seq-3", "seq-2", END, 1, "seq-1"),
        ("16*((seq)//16)+16", 0, "seq", 1, "seq"),  # a padded length and back (PegasusX's blocks)
        ("seq+16", 0, "16*((seq)//16)+16", 1, "16*((seq)//16)+16"),
    ],
)
def test_named_slice_size(dim, start, end, step, want) -> None:
    assert slice_size(dim, start, end, step) == want


@pytest.mark.parametrize(("start", "step"), [(0, 2), (1, 3), (2, 2), (0, 5)])
def test_strided_slice_of_a_named_dim_to_its_end(start, step) -> None:
    """``x[a::s]`` of a named dim (a strided 3-D convolution's frames): ``ceil((seq - a) / s)``, a floor division,
    equal to Python's count at every size past ``a``."""
    size = slice_size("seq", start, END, step)
    assert isinstance(size, str) and "//" in size
    for n in range(start + 1, 40):
        assert eval_dim(size, {"seq": n}) == len(range(n)[start::step]), (size, n)


@pytest.mark.parametrize(("dim", "start", "end", "step"), [("seq+1", 0, -1, 2), ("seq", 1, -2, 3), ("seq", 0, -1, 2),
                                                           ("seq+4", 2, -3, 4)])
def test_strided_slice_of_a_named_dim_to_a_negative_end(dim, start, end, step) -> None:
    """``x[a:-b:s]`` of a named dim (Funnel's factorized attention pools ``x[:-1:2]`` of its seq + 1 positions):
    ``ceil((dim - b - a) / s)``, a floor division, equal to Python's count at every size where ``dim - b > a``."""
    size = slice_size(dim, start, end, step)
    assert isinstance(size, str) and "//" in size
    for n in range(1, 40):
        d = eval_dim(dim, {"seq": n})
        if d + end > start:
            assert eval_dim(size, {"seq": n}) == len(range(d)[start:end:step]), (size, n)


@pytest.mark.parametrize(("dim", "start", "end", "step"), [("seq", -3, 1, 1), (256, 1, "seq", 1), ("seq", "batch", END, 1),
                                                           ("seq", 0, "batch", 1), ("past_seq", 0, "past_seq+seq", 1),
                                                           ("2*seq-3", 0, "seq-3", 1), ("2*seq-3", 0, "2*seq", 1),
                                                           ("seq+15", 0, "16*((seq)//16)+16", 1)])
def test_unexpressible_slice_sizes_are_refused(dim, start, end, step) -> None:
    with pytest.raises(ShapeError, match="cannot be written"):
        slice_size(dim, start, end, step)


def test_slice_bad() -> None:
    x = [("batch", 6, 5)]
    raises_naming(ShapeError, Op.SLICE, x, {"axes": (1, 2), "starts": (0,), "ends": (1, 2)}, match="length")
    raises_naming(ShapeError, Op.SLICE, x, {"axes": (1, 1), "starts": (0, 0), "ends": (1, 2)}, match="twice")
    raises_naming(ShapeError, Op.SLICE, x, {"axes": (3,), "starts": (0,), "ends": (1,)}, match="out of range")
    raises_naming(ShapeError, Op.SLICE, x, {"axes": (1,), "starts": (0,), "ends": (1,), "steps": (-1,)}, match="step")
    raises_naming(GraphError, Op.SLICE, x, {"axes": (1,), "starts": (0,)}, match="missing")
    assert infer(Op.SLICE, x, {"axes": (-1, 1), "starts": (1, 0), "ends": (SLICE_END, 3)}).shape == ("batch", 3, 4)


# --------------------------------------------------------------------------- the others' bad cases
@pytest.mark.parametrize(
    ("op", "shapes", "dtypes", "attrs", "match"),
    [
        (Op.GATHER, [(5, 3), ("batch",)], ["float32", "float32"], None, "indices"),
        (Op.GATHER, [(), ("batch",)], ["float32", "int64"], None, "rank"),
        (Op.GATHER, [(5, 3), ("batch",)], ["float32", "int64"], {"axis": 2}, "out of range"),
        (Op.GATHER_ELEMENTS, [(5, 3), (2,)], ["float32", "int64"], None, "rank"),
        (Op.GATHER_ELEMENTS, [(5, 3), (2, 3)], ["float32", "bool"], None, "indices"),
        (Op.GATHER_ELEMENTS, [(5, 3), (2, 3)], ["float32", "int64"], {"axis": -3}, "out of range"),
        (Op.INDEX, [(5, 3), (2,), (2,), (2,)], ["float32", "int64", "int64", "int64"], None, "exceed"),
        (Op.INDEX, [(5, 3), (2,), (3,)], ["float32", "int64", "int64"], None, "broadcast"),
        (Op.INDEX, [(5, 3), (2,)], ["float32", "float32"], None, "indices"),
        (Op.EQUAL, [("batch",), ("batch",)], ["int64", "float32"], None, "dtypes"),
        (Op.LESS, [("batch",), ("seq",)], ["int64", "int64"], None, "broadcast"),
        (Op.AND, [("batch",), ("batch",)], ["bool", "int64"], None, "bool"),
        (Op.NOT, [("batch",)], ["float32"], None, "bool"),
        (Op.WHERE, [("batch",), ("batch",), ()], ["float32", "float32", "float32"], None, "condition"),
        (Op.WHERE, [("batch",), ("batch",), ()], ["bool", "float32", "int64"], None, "dtypes"),
        (Op.REDUCE_MEAN, [("batch", 3)], ["float32"], {"axes": (2,)}, "out of range"),
        (Op.REDUCE_MEAN, [("batch", 3)], ["float32"], {"axes": (1, -1)}, "repeat"),
        (Op.REDUCE_SUM, [("batch", 3)], ["bool"], None, "bool"),
        (Op.REDUCE_SUM, [("batch", 3)], ["float32"], {"keepdims": 2}, "keepdims"),
        (Op.CUMSUM, [("batch", 3)], ["bool"], {"axis": 0}, "bool"),
        (Op.CUMSUM, [("batch", 3)], ["float32"], {"axis": 2}, "out of range"),
        (Op.RMS_NORM, [("batch", 8), (7,)], ["float32", "float32"], None, "scale"),
        (Op.RMS_NORM, [("batch", 8), (8,)], ["float32", "float16"], None, "dtypes"),
        (Op.SDPA, [("b", "s", 4), ("b", "s", 5), ("b", "s", 4)], ["float32"] * 3, None, "head sizes"),
        (Op.SDPA, [("b", "s", 4), ("b", "s", 4), ("b", "t", 4)], ["float32"] * 3, None, "lengths"),
        (Op.SDPA, [("b", "s", "e"), ("b", "s", "e"), ("b", "s", 4)], ["float32"] * 3, None, "static"),
        (Op.SDPA, [("b", "s", 4)] * 3 + [("s", "s")], ["float32"] * 3 + ["bool"], {"is_causal": 1}, "cannot be combined"),
        (Op.SDPA, [("b", "s", 4)] * 3 + [("s", "s")], ["float32"] * 3 + ["int64"], None, "mask must be"),
        (Op.SDPA, [("b", "s", 4)] * 3 + [("s", 3)], ["float32"] * 3 + ["bool"], None, "broadcast"),
        (Op.SDPA, [("b", "s", 4)] * 3, ["float32"] * 3, {"is_causal": 2}, "is_causal"),
        (Op.SDPA, [("b", "s", 4)] * 3, ["float32"] * 3, {"scale": -1.0}, "scale"),
        (Op.SDPA, [("b", "s", 4)] * 3, ["float32", "float32", "float16"], None, "dtypes"),
        (Op.UNSQUEEZE, [("batch", 3)], ["float32"], {"axes": (3,)}, "out of range"),
        (Op.UNSQUEEZE, [("batch", 3)], ["float32"], {"axes": (1, -3)}, "distinct"),
        (Op.UNSQUEEZE, [("batch", 3)], ["float32"], {"axes": ()}, "non-empty"),
        (Op.SQUEEZE, [("batch", 3)], ["float32"], {"axes": (0,)}, "not 1"),
        (Op.SQUEEZE, [("batch", 1)], ["float32"], {"axes": (1, -1)}, "distinct"),
        (Op.EXPAND, [("batch", 3)], ["float32"], {"shape": (2, 3)}, "broadcast"),
        (Op.EXPAND, [("batch", 3)], ["float32"], {"shape": (-1, 3)}, "negative"),
        (Op.ARANGE, [], [], {"start": 1, "end": "seq"}, "cannot be written"),
        (Op.ARANGE, [], [], {"end": 4, "step": 0}, "nonzero"),
        (Op.ARANGE, [], [], {"end": 4, "step": "seq"}, "nonzero"),
    ],
    ids=lambda v: getattr(v, "value", None),
)
def test_bad_shapes_and_dtypes_name_the_node(op, shapes, dtypes, attrs, match) -> None:
    with pytest.raises(ShapeError, match=match) as info:
        typed(op, shapes, dtypes, attrs)
    assert "node_under_test" in str(info.value)


def test_attribute_choices() -> None:
    with pytest.raises(GraphError, match="must be one of"):
        typed(Op.CAST, [(2,)], ["float32"], {"to": "float8"})
    with pytest.raises(GraphError, match="missing"):
        typed(Op.CAST, [(2,)], ["float32"], {})
    with pytest.raises(GraphError, match="must be one of"):
        typed(Op.ARANGE, [], [], {"end": 3, "dtype": "bool"})


def test_new_groups() -> None:
    assert OpGroup.Compare | OpGroup.Logical | OpGroup.Reduce <= set(Op)
    assert {Op.GATHER, Op.GATHER_ELEMENTS, Op.INDEX, Op.SLICE, Op.UNSQUEEZE, Op.SQUEEZE, Op.EXPAND} <= OpGroup.Movement
    assert {Op.RESHAPE, Op.SLICE, Op.EXPAND, Op.ARANGE} <= OpGroup.DynamicSize
    from flora_graph.ir import SCHEMAS  # the group is exactly the ops with an attribute of kind "dim"/"dims"

    named = {op for op, sch in SCHEMAS.items() if any(a.kind in ("dim", "dims") for a in sch.attrs.values())}
    assert OpGroup.DynamicSize == named


@pytest.mark.parametrize("op", [Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.RECIPROCAL, Op.COS, Op.SIN, Op.ABS, Op.POW,
                                Op.REDUCE_MEAN, Op.RMS_NORM])
def test_float_ops_follow_torch_shapes(op: Op) -> None:
    """Shape inference agrees with torch on a static example."""
    x = torch.rand(2, 3, 4) + 0.5
    fns = {Op.EXP: torch.exp, Op.LOG: torch.log, Op.SQRT: torch.sqrt, Op.RSQRT: torch.rsqrt, Op.RECIPROCAL: torch.reciprocal,
           Op.COS: torch.cos, Op.SIN: torch.sin, Op.ABS: torch.abs, Op.POW: lambda t: t**2,
           Op.REDUCE_MEAN: lambda t: t.mean(-1, keepdim=True), Op.RMS_NORM: lambda t: t}
    attrs = {Op.REDUCE_MEAN: {"axes": (-1,)}}.get(op)
    shapes = [(2, 3, 4), ()] if op is Op.POW else [(2, 3, 4)]
    assert infer(op, shapes, attrs).shape == tuple(fns[op](x).shape)


# --------------------------------------------------------------------------- verify and files
def transformer_graph() -> Graph:
    """Every op of the family with named dims in its attributes, as a capture of a decoder produces."""
    rng = np.random.default_rng(0)
    g = Graph("transformer")
    ids = g.input("input_ids", ("batch", "seq"), "int64")
    emb = g.add(Op.GATHER, [g.const("emb", rng.standard_normal((11, 8)).astype(np.float32)), ids], name="embed")
    pos = g.add(Op.ARANGE, [], {"end": "seq"}, name="positions")
    posf = g.add(Op.CAST, [g.add(Op.UNSQUEEZE, [pos], {"axes": (1,)})], {"to": "float32"}, name="posf")
    ang = g.add(Op.MUL, [posf, g.const("inv_freq", np.linspace(1, 0.1, 4, dtype=np.float32))])
    rot = g.add(Op.CONCAT, [g.add(Op.COS, [ang]), g.add(Op.SIN, [ang])], {"axis": -1}, name="rot")
    h = g.add(Op.ADD, [emb, rot])
    h = g.add(Op.RMS_NORM, [h, g.const("norm_w", np.ones(8, np.float32))], {"epsilon": 1e-6}, name="norm")
    q = g.add(Op.TRANSPOSE, [g.add(Op.RESHAPE, [h], {"shape": ("batch", "seq", 2, -1)})], {"perm": (0, 2, 1, 3)}, name="q")
    k = g.add(Op.SLICE, [q], {"axes": (2,), "starts": (0,), "ends": ("seq",)}, name="k")
    att = g.add(Op.SDPA, [q, k, q], {"is_causal": 1}, name="attn")
    keep = g.add(Op.LESS_OR_EQUAL, [pos, g.add(Op.UNSQUEEZE, [pos], {"axes": (1,)})], name="keep")
    full = g.add(Op.EXPAND, [keep], {"shape": ("batch", 1, "seq", "seq")}, name="full")
    masked = g.add(Op.SDPA, [q, k, q, g.add(Op.AND, [full, g.add(Op.NOT, [g.add(Op.EQUAL, [pos, pos])])])], name="masked")
    y = g.add(Op.WHERE, [g.add(Op.GREATER, [att, masked]), att, masked], name="where")
    y = g.add(Op.REDUCE_MEAN, [g.add(Op.POW, [y, g.const("two", np.array(2.0, np.float32))])], {"axes": (-1,)}, name="ms")
    g.set_output("out", g.add(Op.CUMSUM, [g.add(Op.SQUEEZE, [y], {"axes": (-1,)})], {"axis": -1}, name="cum"))
    return verify(g)


def test_graph_with_named_dim_attributes_verifies_and_round_trips(tmp_path: Path) -> None:
    g = transformer_graph()
    g.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g")
    assert_graphs_equal(g, back)
    assert back.node("k").attrs["ends"] == ("seq",)
    from flora_graph.runtimes import run

    ids = np.random.default_rng(1).integers(0, 11, (3, 5))
    np.testing.assert_array_equal(run(g, {"input_ids": ids})["out"], run(back, {"input_ids": ids})["out"])


def test_edited_named_dim_attribute_is_caught_on_load(tmp_path: Path) -> None:
    import json

    g = transformer_graph()
    g.save(tmp_path / "g")
    doc = json.loads((tmp_path / "g" / "graph.json").read_text())
    for nd in doc["nodes"]:
        if nd["name"] == "k":
            nd["attrs"]["ends"] = ["se q"]
    (tmp_path / "g" / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(GraphError, match=r"'k\.ends'.*not a valid dims"):
        Graph.load(tmp_path / "g")
