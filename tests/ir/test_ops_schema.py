"""Op schemas: arity, attributes, shape and dtype inference for every op, static and dynamic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir import SCHEMAS, Graph, Op, OpGroup, schema

NAME = "node_under_test"


def infer(op: Op, shapes: Sequence[Sequence[Any]], attrs: dict | None = None, dtypes: Sequence[str] | None = None):
    """Build Inputs of ``shapes`` and one ``op`` node on them; return the node."""
    g = Graph("t")
    dtypes = dtypes or ["float32"] * len(shapes)
    ins = [g.input(f"in{i}", s, d) for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))]
    return g.add(op, ins, attrs, name=NAME)


def raises_naming(exc: type[Exception], op: Op, shapes, attrs=None, dtypes=None, match: str | None = None):
    """Assert that building the node raises ``exc`` whose message names the node."""
    with pytest.raises(exc, match=match) as info:
        infer(op, shapes, attrs, dtypes)
    assert NAME in str(info.value)
    return info.value


# ------------------------------------------------------------------ the table itself
def test_every_op_has_a_schema():
    assert set(SCHEMAS) == set(Op)
    for op in Op:
        sch = schema(op)
        assert sch.op is op
        assert (sch.infer is None) == (op in OpGroup.Leaf)
        assert sch.doc
        if sch.max_inputs is not None:
            assert sch.min_inputs <= sch.max_inputs


def test_op_groups_hold_only_ops_and_commutative_is_binary():
    for group in (OpGroup.Leaf, OpGroup.Binary, OpGroup.Unary, OpGroup.Movement):
        assert all(isinstance(op, Op) for op in group)
    assert OpGroup.Commutative <= OpGroup.Binary


# A row per op: (op, input shapes, attrs, expected shape); dtype is float32 throughout here.
INFER_CASES = [
    (Op.LINEAR, [("batch", 8), (4, 8)], None, ("batch", 4)),
    (Op.LINEAR, [(8,), (4, 8)], None, (4,)),
    (Op.LINEAR, [("batch", "seq", 8), (4, 8), (4,)], None, ("batch", "seq", 4)),
    (Op.LINEAR, [("batch", "hidden"), (3, "hidden")], None, ("batch", 3)),
    (Op.MATMUL, [("batch", 3, 4), (4, 5)], None, ("batch", 3, 5)),
    (Op.MATMUL, [("batch", 1, 3, 4), ("heads", 4, 5)], None, ("batch", "heads", 3, 5)),
    (Op.MATMUL, [("batch", "seq", "d"), ("batch", "d", "seq")], None, ("batch", "seq", "seq")),
    (Op.MATMUL, [(4,), ("batch", 4, 5)], None, ("batch", 5)),
    (Op.CONV2D, [("batch", 3, 8, 8), (6, 3, 3, 3)], None, ("batch", 6, 6, 6)),
    (Op.CONV2D, [("batch", 3, "h", "w"), (6, 3, 1, 1)], None, ("batch", 6, "h", "w")),
    (Op.ADD, [("batch", 4), (4,)], None, ("batch", 4)),
    (Op.SUB, [(1, 4), ("batch", 1)], None, ("batch", 4)),
    (Op.MUL, [("batch", "seq", 8), ()], None, ("batch", "seq", 8)),
    (Op.DIV, [("seq*batch", 2), ("batch*seq", 1)], None, ("batch*seq", 2)),
    (Op.NEG, [("batch", 3)], None, ("batch", 3)),
    (Op.RELU, [("batch", 3)], None, ("batch", 3)),
    (Op.GELU, [("batch", 3)], {"approximate": "tanh"}, ("batch", 3)),
    (Op.SILU, [()], None, ()),
    (Op.SIGMOID, [(0, 2)], None, (0, 2)),
    (Op.TANH, [("seq*batch",)], None, ("batch*seq",)),
    (Op.IDENTITY, [("batch", 1, 2)], None, ("batch", 1, 2)),
    (Op.SOFTMAX, [("batch", "seq", 8)], {"axis": 1}, ("batch", "seq", 8)),
    (Op.LAYER_NORM, [("batch", "seq", 8), (8,), (8,)], None, ("batch", "seq", 8)),
    (Op.LAYER_NORM, [("batch", "seq", 8), ("seq", 8)], {"axis": 1}, ("batch", "seq", 8)),
    (Op.RESHAPE, [("batch", "seq", 64)], {"shape": (0, 0, 4, 16)}, ("batch", "seq", 4, 16)),
    (Op.RESHAPE, [("batch", "seq", 64)], {"shape": (-1, 64)}, ("batch*seq", 64)),
    (Op.RESHAPE, [("batch", "seq", 64)], {"shape": (0, -1)}, ("batch", "64*seq")),
    (Op.RESHAPE, [("batch", "seq", 64)], {"shape": (-1, 8, 8)}, ("batch*seq", 8, 8)),
    (Op.RESHAPE, [("batch", "seq", 64)], {"shape": (-1,)}, ("64*batch*seq",)),
    (Op.RESHAPE, [("batch", 4, 6)], {"shape": (-1, 3)}, ("8*batch", 3)),
    (Op.RESHAPE, [("batch*seq", 8)], {"shape": (0, 2, 4)}, ("batch*seq", 2, 4)),
    (Op.FLATTEN, [("batch", 3, 4, 5)], None, ("batch", 60)),
    (Op.FLATTEN, [("batch", "seq", 4)], {"axis": -1}, ("batch*seq", 4)),
    (Op.FLATTEN, [("batch", "seq", 4)], {"axis": 0}, (1, "4*batch*seq")),
    (Op.FLATTEN, [("batch", "seq", 4)], {"axis": 3}, ("4*batch*seq", 1)),
    (Op.TRANSPOSE, [("batch", "seq", 8)], {"perm": (1, 0, 2)}, ("seq", "batch", 8)),
    (Op.CONCAT, [("batch", 3), ("batch", 5)], {"axis": 1}, ("batch", 8)),
    (Op.CONCAT, [("batch", 3), ("batch", 5), ("batch", 1)], {"axis": -1}, ("batch", 9)),
    (Op.CONCAT, [("batch", 3)], {"axis": 1}, ("batch", 3)),
    (Op.SPLIT, [("batch", 10)], {"axis": 1, "sizes": (3, 7), "index": 1}, ("batch", 7)),
    (Op.SPLIT, [("batch", "seq", 12)], {"axis": -1, "sizes": (4, 4, 4), "index": 2}, ("batch", "seq", 4)),
    # the transformer family (rows with int/bool inputs or results: test_ops_transformer_schema.TYPED_INFER_CASES)
    (Op.RESHAPE, [("batch", "seq", 64)], {"shape": ("batch", "seq", 4, -1)}, ("batch", "seq", 4, 16)),
    (Op.SLICE, [("batch", "seq", 16)], {"axes": (2,), "starts": (8,), "ends": (2**63 - 1,)}, ("batch", "seq", 8)),
    (Op.SLICE, [(256, 16)], {"axes": (0,), "starts": (0,), "ends": ("seq",)}, ("seq", 16)),
    (Op.UNSQUEEZE, [("batch", "seq")], {"axes": (0, -1)}, (1, "batch", "seq", 1)),
    (Op.SQUEEZE, [("batch", 1, "seq", 1)], {"axes": (-1, 1)}, ("batch", "seq")),
    (Op.EXPAND, [("batch", 2, 1, "seq", 16)], {"shape": ("batch", 2, 2, "seq", 16)}, ("batch", 2, 2, "seq", 16)),
    (Op.EXPAND, [(1, 4)], {"shape": ("seq", 1)}, ("seq", 4)),
    (Op.EXP, [("batch", 3)], None, ("batch", 3)),
    (Op.LOG, [("batch", 3)], None, ("batch", 3)),
    (Op.SQRT, [("batch", 3)], None, ("batch", 3)),
    (Op.RSQRT, [("batch", "seq", 1)], None, ("batch", "seq", 1)),
    (Op.RECIPROCAL, [()], None, ()),
    (Op.COS, [("seq", 16)], None, ("seq", 16)),
    (Op.SIN, [("seq", 16)], None, ("seq", 16)),
    (Op.ABS, [("batch", 3)], None, ("batch", 3)),
    (Op.POW, [("batch", "seq", 64), ()], None, ("batch", "seq", 64)),
    (Op.REDUCE_MEAN, [("batch", "seq", 64)], {"axes": (-1,)}, ("batch", "seq", 1)),
    (Op.REDUCE_MEAN, [("batch", "seq", 64)], {"axes": (0, 2), "keepdims": 0}, ("seq",)),
    (Op.REDUCE_SUM, [("batch", "seq", 64)], {"keepdims": 0}, ()),
    (Op.CUMSUM, [("batch", "seq")], {"axis": 1}, ("batch", "seq")),
    (Op.RMS_NORM, [("batch", "seq", 64), (64,)], None, ("batch", "seq", 64)),
    (Op.RMS_NORM, [("batch", "seq", 64)], {"axis": 1}, ("batch", "seq", 64)),
    (Op.SDPA, [("batch", 4, "seq", 16)] * 3, {"is_causal": 1}, ("batch", 4, "seq", 16)),
    (Op.SDPA, [("batch", 4, "seq", 16), ("batch", 4, "kv", 16), (1, 4, "kv", 8), ("batch", 1, "seq", "kv")], None,
     ("batch", 4, "seq", 8)),
    # adapter slots (the mixed slot, with its int64 index: test_ops_transformer_schema.TYPED_INFER_CASES)
    (Op.LORA_SLOT, [("batch", "seq", 4), ("batch", "seq", 8), ("fc.rank", 8), (4, "fc.rank")], {"module": "fc"},
     ("batch", "seq", 4)),
    (Op.LORA_SLOT, [("batch", 6, 4, 4), ("batch", 3, 8, 8), (0, 3, 3, 3), (6, 0, 1, 1)],
     {"module": "c", "kind": "conv", "kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)}, ("batch", 6, 4, 4)),
]


@pytest.mark.parametrize(("op", "shapes", "attrs", "want"), INFER_CASES, ids=lambda v: getattr(v, "value", None))
def test_infer_shape(op, shapes, attrs, want):
    node = infer(op, shapes, attrs)
    assert node.shape == want
    assert node.dtype == "float32"


def test_infer_cases_cover_every_non_leaf_op():
    """Every op's shape rule has a case here or a row in its family's table of tests/ops (whose checks
    compare each output's shape and dtype with torch's)."""
    from ..ops.harness import all_cases, build
    from .test_ops_transformer_schema import TYPED_INFER_CASES

    rows = {n.op for c in all_cases() for n in build(c).nodes} - OpGroup.Leaf
    assert {c[0] for c in INFER_CASES} | {c[0] for c in TYPED_INFER_CASES} | rows == set(Op) - OpGroup.Leaf


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize(("op", "shapes", "attrs", "want"), INFER_CASES[::3])
def test_infer_keeps_the_input_dtype(op, shapes, attrs, want, dtype):
    node = infer(op, shapes, attrs, [dtype] * len(shapes))
    assert node.dtype == dtype


@pytest.mark.parametrize(
    ("op", "shapes", "attrs"),
    [
        (Op.LINEAR, [("batch", 8), (4, 8)], None),
        (Op.LINEAR, [("batch", 8), (4, 8), (4,)], None),
        (Op.MATMUL, [(3, 4), (4, 5)], None),
        (Op.CONV2D, [(1, 3, 8, 8), (6, 3, 3, 3)], None),
        (Op.ADD, [(3,), (3,)], None),
        (Op.LAYER_NORM, [(2, 8), (8,)], None),
        (Op.CONCAT, [(2, 3), (2, 3)], {"axis": 0}),
    ],
)
def test_mixed_dtypes_raise_naming_the_node(op, shapes, attrs):
    dtypes = ["float32"] * len(shapes)
    dtypes[-1] = "float64"
    raises_naming(ShapeError, op, shapes, attrs, dtypes, match="dtypes")


# ------------------------------------------------------------------ Linear
@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ([("batch", 8), (4, 7)], "features"),
        ([("batch", 8), (8,)], "rank"),
        ([("batch", 8), (4, 8, 1)], "rank"),
        ([(), (4, 8)], "rank"),
        ([("batch", 8), (4, 8), (5,)], "bias"),
        ([("batch", 8), (4, 8), (1, 4)], "bias"),
        ([("batch", "hidden"), (4, "inner")], "features"),
    ],
)
def test_linear_bad_shapes(shapes, match):
    raises_naming(ShapeError, Op.LINEAR, shapes, match=match)


# ------------------------------------------------------------------ MatMul
@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((4,), (4,)),
        ((4,), (4, 5)),
        ((3, 4), (4,)),
        ((4,), (2, 4, 5)),
        ((2, 3, 4), (4,)),
        ((3, 4), (4, 5)),
        ((2, 3, 4), (4, 5)),
        ((2, 1, 3, 4), (5, 4, 6)),
        ((1, 3, 4), (7, 4, 2)),
        ((6, 1, 1, 3, 4), (2, 1, 4, 5)),
        ((0, 3, 4), (4, 2)),
    ],
)
def test_matmul_matches_numpy(a, b):
    want = np.matmul(np.zeros(a, np.float32), np.zeros(b, np.float32)).shape
    assert infer(Op.MATMUL, [a, b]).shape == want


@pytest.mark.parametrize(
    ("a", "b"),
    [((3, 4), (5, 6)), ((4,), (5,)), ((), (4,)), ((4,), ()), ((2, 3, 4), (3, 4, 5)), (("batch", 3, 4), ("seq", 4, 5)),
     (("batch", 3, 4), (3, 4, 5)), ((3, "k"), ("j", 5))],
)
def test_matmul_bad_shapes(a, b):
    raises_naming(ShapeError, Op.MATMUL, [a, b])


# ------------------------------------------------------------------ Conv2d
CONV_CASES = [
    # (N, C, H, W), (O, C/g, kh, kw), stride, padding, dilation, groups
    ((1, 3, 8, 8), (6, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((2, 3, 9, 7), (4, 3, 3, 2), (2, 3), (1, 0), (1, 1), 1),
    ((1, 4, 10, 11), (8, 2, 3, 3), (1, 2), (2, 1), (2, 3), 2),
    ((1, 6, 7, 7), (6, 1, 3, 3), (2, 2), (1, 1), (1, 1), 6),
    ((3, 2, 5, 5), (2, 2, 5, 5), (1, 1), (0, 0), (1, 1), 1),
    ((1, 2, 5, 5), (3, 2, 1, 1), (3, 3), (0, 0), (1, 1), 1),
    ((1, 1, 4, 4), (1, 1, 2, 2), (3, 3), (3, 3), (1, 1), 1),
    ((1, 8, 16, 12), (12, 2, 3, 5), (2, 1), (1, 2), (3, 1), 4),
]


@pytest.mark.parametrize(("x", "w", "stride", "padding", "dilation", "groups"), CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_matches_torch(x, w, stride, padding, dilation, groups, bias):
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    want = torch.nn.functional.conv2d(
        torch.zeros(x), torch.zeros(w), torch.zeros(w[0]) if bias else None,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    ).shape
    shapes = [x, w, (w[0],)] if bias else [x, w]
    assert infer(Op.CONV2D, shapes, attrs).shape == tuple(want)
    # the batch dim may be dynamic
    assert infer(Op.CONV2D, [("batch", *x[1:]), *shapes[1:]], attrs).shape == ("batch", *tuple(want)[1:])


def test_conv2d_default_attrs_are_filled():
    node = infer(Op.CONV2D, [(1, 3, 8, 8), (6, 3, 3, 3)], {"stride": [2, 2]})
    assert node.attrs == {"stride": (2, 2), "padding": (0, 0), "dilation": (1, 1), "groups": 1}
    assert isinstance(node.attrs["stride"], tuple)


@pytest.mark.parametrize(
    ("shapes", "attrs", "exc"),
    [
        ([(1, 4, 8, 8), (6, 2, 3, 3)], {"groups": 4}, ShapeError),  # 6 not divisible by 4
        ([(1, 4, 8, 8), (6, 3, 3, 3)], None, ShapeError),  # channels
        ([(1, 4, 8, 8), (6, 2, 3, 3)], None, ShapeError),  # channels without groups
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"groups": 0}, ShapeError),
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"stride": (1, 1, 1)}, ShapeError),
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"padding": (1,)}, ShapeError),
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"stride": (0, 1)}, ShapeError),
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"dilation": (1, 0)}, ShapeError),
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"padding": (-1, 0)}, ShapeError),
        ([(1, 3, 2, 8), (6, 3, 3, 3)], None, ShapeError),  # too small
        ([(1, 3, 5, 5), (6, 3, 3, 3)], {"dilation": (3, 1)}, ShapeError),  # dilated kernel too large
        ([(1, 3, 8, 8), (6, 3, 3, 3), (5,)], None, ShapeError),  # bias
        ([(1, 3, 8), (6, 3, 3)], None, ShapeError),  # rank
        ([(1, 3, 8, 8), (6, 3, "k", 3)], None, ShapeError),  # named kernel size
        ([(1, 3, 8, 8), (6, 3, 3, "k")], None, ShapeError),
        ([(1, 3, 8, 8), ("o", 3, 3, 3)], None, ShapeError),
        ([(1, "c", 8, 8), (6, 3, 3, 3)], None, ShapeError),
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"stride": 2}, GraphError),  # int where ints expected
        ([(1, 3, 8, 8), (6, 3, 3, 3)], {"groups": 1.0}, GraphError),
    ],
)
def test_conv2d_bad(shapes, attrs, exc):
    raises_naming(exc, Op.CONV2D, shapes, attrs)


@pytest.mark.parametrize(("attrs", "want"), [({}, "h-2"), ({"padding": (1, 1)}, "h"), ({"padding": (2, 2)}, "h+2"),
                                             ({"dilation": (2, 2), "padding": (1, 1)}, "h-2")])
def test_conv2d_over_a_named_dim_with_stride_one(attrs, want):
    assert infer(Op.CONV2D, [(1, 3, "h", 8), (6, 3, 3, 3)], attrs).shape[2] == want


@pytest.mark.parametrize(("attrs", "want"), [({"stride": (2, 2)}, "((h+1)//2)-1"), ({"stride": (5, 5), "padding": (1, 1)}, "((h+4)//5)"),
                                             ({"stride": (3, 3), "dilation": (2, 2)}, "((h+1)//3)-1")])
def test_conv2d_strided_over_a_named_dim_is_a_floor_division(attrs, want):
    shape = infer(Op.CONV2D, [(1, 3, "h", "w"), (6, 3, 3, 3)], attrs).shape
    assert shape[2] == want and shape[3] == want.replace("h", "w")
    s, p, d = attrs["stride"][0], attrs.get("padding", (0, 0))[0], attrs.get("dilation", (1, 1))[0]
    for h in range(8, 30):
        assert eval(want, {"h": h}) == (h + 2 * p - d * 2 - 1) // s + 1


# ------------------------------------------------------------------ elementwise
@pytest.mark.parametrize("op", sorted(OpGroup.Binary, key=lambda o: o.value))
def test_binary_broadcast_mismatch_names_node(op):
    raises_naming(ShapeError, op, [("batch", 4), (3,)], match="broadcast")
    raises_naming(ShapeError, op, [("batch", 4), ("seq", 4)], match="broadcast")
    assert infer(op, [("batch", 1), (1, 4)]).shape == ("batch", 4)


@pytest.mark.parametrize("op", sorted(OpGroup.Unary, key=lambda o: o.value))
@pytest.mark.parametrize("dtype", ["float16", "float64", "int64"])
def test_unary_keeps_shape_and_dtype(op, dtype):
    node = infer(op, [("batch", "seq*batch", 0, 3)], None, [dtype])
    assert node.shape == ("batch", "batch*seq", 0, 3)
    assert node.dtype == dtype


def test_gelu_approximate_attr():
    assert infer(Op.GELU, [(2,)]).attrs == {"approximate": "none"}
    assert infer(Op.GELU, [(2,)], {"approximate": "tanh"}).attrs == {"approximate": "tanh"}
    err = raises_naming(GraphError, Op.GELU, [(2,)], {"approximate": "fast"})
    assert "tanh" in str(err)  # the message lists the choices
    raises_naming(GraphError, Op.GELU, [(2,)], {"approximate": 1})
    raises_naming(GraphError, Op.GELU, [(2,)], {"approximate": None})


# ------------------------------------------------------------------ normalisation
def test_softmax():
    assert infer(Op.SOFTMAX, [("batch", 5)]).attrs == {"axis": -1}
    assert infer(Op.SOFTMAX, [("batch", 5)], {"axis": -2}).shape == ("batch", 5)
    raises_naming(ShapeError, Op.SOFTMAX, [("batch", 5)], {"axis": 2}, match="out of range")
    raises_naming(ShapeError, Op.SOFTMAX, [("batch", 5)], {"axis": -3})
    raises_naming(ShapeError, Op.SOFTMAX, [()])


def test_layer_norm():
    node = infer(Op.LAYER_NORM, [("batch", 8)], {"epsilon": 1})
    assert node.attrs == {"axis": -1, "epsilon": 1.0}
    assert isinstance(node.attrs["epsilon"], float)
    assert infer(Op.LAYER_NORM, [("batch", 8)]).attrs["epsilon"] == 1e-5
    raises_naming(ShapeError, Op.LAYER_NORM, [("batch", 8), (7,)], match="LayerNorm")
    raises_naming(ShapeError, Op.LAYER_NORM, [("batch", 8), (8,), (1, 8)])
    raises_naming(ShapeError, Op.LAYER_NORM, [("batch", "seq", 8), (8,)], {"axis": 1})
    raises_naming(ShapeError, Op.LAYER_NORM, [("batch", 8)], {"axis": 2})
    raises_naming(GraphError, Op.LAYER_NORM, [("batch", 8)], {"epsilon": "small"})


# ------------------------------------------------------------------ movement
@pytest.mark.parametrize(
    ("x", "target"),
    [
        ((2, 3, 4), (6, 4)),
        ((2, 3, 4), (-1,)),
        ((2, 3, 4), (0, -1)),
        ((2, 3, 4), (0, 0, 2, 2)),
        ((2, 3, 4), (4, -1, 2)),
        ((2, 3, 4), (1, 1, 24)),
        ((4, 6), (2, 0, -1)),
        ((0, 3), (-1, 3)),
        ((0, 3), (0, 3)),
        ((), (1, 1)),
        ((1,), ()),
    ],
)
def test_reshape_matches_numpy_with_onnx_zero(x, target):
    # ONNX Reshape (allowzero=0): a 0 copies the input dim at that position
    np_target = tuple(x[i] if t == 0 else t for i, t in enumerate(target))
    want = np.zeros(x).reshape(np_target).shape
    assert infer(Op.RESHAPE, [x], {"shape": target}).shape == want


@pytest.mark.parametrize(
    ("x", "target", "match"),
    [
        ((2, 3, 4), (5, -1), "infer"),
        ((2, 3, 4), (-1, -1), "more than one"),
        ((2, 3, 4), (7, 4), "elements"),
        ((2, 3), (0, 0, 0), "position"),
        ((2, 3), (-2, 3), "invalid"),
        (("batch", 4), (4, 4), "elements"),
        (("batch", "seq"), (0, 0, -1, -1), "more than one"),
        ((0, 3), (0, -1), "infer"),  # -1 next to a zero-sized dim is ambiguous
        ((0, 3), (3, 0), "elements"),  # the 0 copies 3: 0 elements vs 9
    ],
)
def test_reshape_bad(x, target, match):
    raises_naming(ShapeError, Op.RESHAPE, [x], {"shape": target}, match=match)


def test_reshape_needs_its_shape():
    raises_naming(GraphError, Op.RESHAPE, [(2, 3)], None, match="missing")
    raises_naming(GraphError, Op.RESHAPE, [(2, 3)], {"shape": (2.0, 3)})
    raises_naming(GraphError, Op.RESHAPE, [(2, 3)], {"shape": (True, 6)})
    raises_naming(GraphError, Op.RESHAPE, [(2, 3)], {"shape": 6})


def _onnx_flatten_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """ONNX Flatten: [prod(d[:axis]), prod(d[axis:])], negative axis counted from the end."""
    if axis < 0:
        axis += len(shape)
    x = np.zeros(shape)
    return x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:])).shape


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), (3, 0, 2), (1, 1)])
def test_flatten_matches_onnx_for_every_axis(shape):
    r = len(shape)
    for axis in range(-r, r + 1):
        assert infer(Op.FLATTEN, [shape], {"axis": axis}).shape == _onnx_flatten_shape(shape, axis), axis


def test_flatten_default_axis_and_dynamic_dims():
    assert infer(Op.FLATTEN, [("batch", 3, 4)]).attrs == {"axis": 1}
    assert infer(Op.FLATTEN, [("batch", 3, 4)]).shape == ("batch", 12)
    assert infer(Op.FLATTEN, [("batch", "seq", 3, 4)], {"axis": -2}).shape == ("batch*seq", 12)
    assert infer(Op.FLATTEN, [("seq", "batch", 3)], {"axis": 2}).shape == ("batch*seq", 3)
    assert infer(Op.FLATTEN, [("batch", "seq", 3)], {"axis": -3}).shape == (1, "3*batch*seq")


@pytest.mark.parametrize("axis", [5, -5, 100])
def test_flatten_axis_out_of_range(axis):
    raises_naming(ShapeError, Op.FLATTEN, [(2, 3, 4, 5)], {"axis": axis}, match="out of range")


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)])
def test_transpose_matches_numpy(perm):
    x = (2, 3, 4)
    assert infer(Op.TRANSPOSE, [x], {"perm": perm}).shape == np.zeros(x).transpose(perm).shape
    node = infer(Op.TRANSPOSE, [("batch", "seq", 4)], {"perm": list(perm)})
    assert node.shape == tuple(("batch", "seq", 4)[p] for p in perm)
    assert node.attrs["perm"] == perm


@pytest.mark.parametrize("perm", [(0, 1), (0, 1, 1), (0, 1, 3), (-1, 0, 1), (0, 1, 2, 3)])
def test_transpose_bad_perm(perm):
    raises_naming(ShapeError, Op.TRANSPOSE, [(2, 3, 4)], {"perm": perm}, match="perm")


@pytest.mark.parametrize(
    ("shapes", "axis"),
    [([(2, 3), (2, 5)], 1), ([(2, 3), (4, 3), (1, 3)], 0), ([(2, 3, 4), (2, 3, 1)], -1), ([(5,)], 0)],
)
def test_concat_matches_numpy(shapes, axis):
    want = np.concatenate([np.zeros(s) for s in shapes], axis=axis).shape
    assert infer(Op.CONCAT, shapes, {"axis": axis}).shape == want


@pytest.mark.parametrize(
    ("shapes", "axis", "match"),
    [
        ([(2, 3), (2, 3, 1)], 0, "ranks"),
        ([(2, 3), (3, 3)], 1, "differs"),
        ([("batch", 3), ("seq", 3)], 1, "differs"),
        ([(2, 3), (2, 3)], 2, "out of range"),
        ([(), ()], 0, "out of range"),
    ],
)
def test_concat_bad(shapes, axis, match):
    raises_naming(ShapeError, Op.CONCAT, shapes, {"axis": axis}, match=match)


@pytest.mark.parametrize(
    ("shapes", "want"),
    [([("batch", 3), ("batch", 3)], ("2*batch", 3)), ([("past_seq", 3), ("seq", 3)], ("past_seq+seq", 3)),
     ([(2, 3), ("seq", 3)], ("seq+2", 3))],
)
def test_concat_along_named_dims_is_their_sum(shapes, want):
    assert infer(Op.CONCAT, shapes, {"axis": 0}).shape == want


@pytest.mark.parametrize(("axis", "sizes"), [(0, (1, 3)), (1, (2, 2, 1)), (-1, (6,)), (-1, (1, 2, 3))])
def test_split_matches_numpy(axis, sizes):
    x = (4, 5, 6)
    pieces = np.split(np.zeros(x), np.cumsum(sizes)[:-1], axis=axis)
    for index, piece in enumerate(pieces):
        node = infer(Op.SPLIT, [x], {"axis": axis, "sizes": sizes, "index": index})
        assert node.shape == piece.shape


@pytest.mark.parametrize(
    ("x", "attrs", "match"),
    [
        ((4, 6), {"axis": 1, "sizes": (2, 3), "index": 0}, "add up"),
        ((4, 6), {"axis": 1, "sizes": (3, 3), "index": 2}, "index"),
        ((4, 6), {"axis": 1, "sizes": (3, 3), "index": -1}, "index"),
        ((4, 6), {"axis": 1, "sizes": (6, 0), "index": 0}, "positive"),
        ((4, 6), {"axis": 1, "sizes": (), "index": 0}, "positive"),
        ((4, 6), {"axis": 2, "sizes": (3, 3), "index": 0}, "out of range"),
        (("batch", 6), {"axis": 0, "sizes": (3, 3), "index": 0}, "add up"),
    ],
)
def test_split_bad(x, attrs, match):
    raises_naming(ShapeError, Op.SPLIT, [x], attrs, match=match)


def test_split_keeps_dynamic_dims_elsewhere():
    node = infer(Op.SPLIT, [("batch", "seq", 12)], {"axis": 2, "sizes": [4, 8], "index": 0})
    assert node.shape == ("batch", "seq", 4)
    assert node.attrs == {"axis": 2, "sizes": (4, 8), "index": 0}


# ------------------------------------------------------------------ attributes and arity
@pytest.mark.parametrize(
    ("op", "shapes", "attrs", "match"),
    [
        (Op.RELU, [(2,)], {"alpha": 0.1}, "unknown attribute"),
        (Op.SOFTMAX, [(2,)], {"axis": 0, "dim": 0}, "unknown attribute"),
        (Op.TRANSPOSE, [(2, 3)], None, "missing attribute 'perm'"),
        (Op.CONCAT, [(2,), (2,)], {}, "missing attribute 'axis'"),
        (Op.SPLIT, [(4,)], {"axis": 0, "sizes": (2, 2)}, "missing attribute 'index'"),
        (Op.SOFTMAX, [(2,)], {"axis": "0"}, "not a valid int"),
        (Op.SOFTMAX, [(2,)], {"axis": 0.0}, "not a valid int"),
        (Op.SOFTMAX, [(2,)], {"axis": True}, "not a valid int"),
        (Op.SOFTMAX, [(2,)], {"axis": np.int64(0)}, "not a valid int"),
        (Op.TRANSPOSE, [(2, 3)], {"perm": "10"}, "not a valid ints"),
        (Op.TRANSPOSE, [(2, 3)], {"perm": (1, 0.0)}, "not a valid ints"),
        (Op.TRANSPOSE, [(2, 3)], {"perm": (1, False)}, "not a valid ints"),
        (Op.LAYER_NORM, [(2,)], {"epsilon": True}, "not a valid float"),
        (Op.LAYER_NORM, [(2,)], {"epsilon": "1e-5"}, "not a valid float"),
        (Op.GELU, [(2,)], {"approximate": 0}, "not a valid str"),
    ],
)
def test_bad_attributes_raise_graph_error_naming_node(op, shapes, attrs, match):
    raises_naming(GraphError, op, shapes, attrs, match=match)


@pytest.mark.parametrize(
    ("op", "n"),
    [(Op.RELU, 0), (Op.RELU, 2), (Op.ADD, 1), (Op.ADD, 3), (Op.LINEAR, 1), (Op.LINEAR, 4), (Op.MATMUL, 3),
     (Op.CONV2D, 4), (Op.LAYER_NORM, 4), (Op.CONCAT, 0), (Op.RESHAPE, 2), (Op.SPLIT, 2)],
)
def test_wrong_arity_raises_graph_error_naming_node(op, n):
    attrs = {Op.CONCAT: {"axis": 0}, Op.RESHAPE: {"shape": (-1,)}, Op.SPLIT: {"axis": 0, "sizes": (2,), "index": 0}}
    err = raises_naming(GraphError, op, [(2,)] * n, attrs.get(op), match="inputs")
    assert f"got {n}" in str(err)
    assert not isinstance(err, ShapeError)


@pytest.mark.parametrize("op", sorted(OpGroup.Leaf, key=lambda o: o.value))
def test_leaves_cannot_be_added_as_ops(op):
    attrs = {"param": "w"} if op is Op.CONST else None
    raises_naming(GraphError, op, [], attrs, match="leaf")


def test_add_rejects_inputs_that_are_not_nodes():
    g = Graph()
    x = g.input("x", (2,))
    with pytest.raises(GraphError, match="bad_in"):
        g.add(Op.ADD, [x, "x"], name="bad_in")  # type: ignore[list-item]


def test_input_and_const_validate():
    g = Graph()
    with pytest.raises(GraphError, match="dtype"):
        g.input("x", (2,), dtype="float8")
    with pytest.raises(ShapeError, match="'y'"):
        g.input("y", (-1,))
    with pytest.raises(GraphError, match="unknown param"):
        g.const("missing")
    with pytest.raises(GraphError, match="dtype"):
        g.const("c", np.zeros(2, dtype=np.complex64))
    g.input("z", ("seq*batch", 2))
    with pytest.raises(GraphError, match="already used"):
        g.input("z", (2,))
    assert g.node("z").shape == ("batch*seq", 2)


def test_add_picks_a_fresh_name_when_taken():
    g = Graph()
    x = g.input("x", (2,))
    a = g.add(Op.RELU, [x], name="r")
    b = g.add(Op.RELU, [x], name="r")
    assert a.name == "r" and b.name != "r"
    assert len({n.name for n in g.nodes}) == len(g.nodes)
