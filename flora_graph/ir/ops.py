"""The op set and its schemas: arity, attributes, shape and dtype inference.

Every op has one :class:`OpSchema` in :data:`SCHEMAS`. Semantics follow ONNX where ONNX has
the op (so lowering is direct), with weight layouts taken from torch: ``Linear(x, W, b)``
is ``x @ W.T + b`` with ``W`` of shape ``[out, in]``. Every node produces one value:
``Split`` carries the ``index`` of the piece it yields, and a lowering groups the
``Split`` nodes that share input, axis and sizes back into one multi-output op.

Sizes that depend on a dynamic dim are attributes of kind ``"dim"`` (one int or dim name)
or ``"dims"`` (a tuple of them), never shape tensors: ``Arange(end="seq")``,
``Expand(shape=("batch", 1, "seq", "seq"))``, ``Slice(ends=("seq",))``, ``Reshape`` targets
(where the ints keep ONNX's 0/-1 meaning). Names are canonicalized like shape dims and resolve
at run time from the sizes the graph inputs bind. The shape rules of the transformer family
live in :mod:`flora_graph.ir.ops_transformer`.

The numpy reference interpreter (``flora_graph.runtimes.reference``) is the executable
definition of each op; this module defines only what can be known without running.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir import ops_transformer as _tf
from flora_graph.ir.shapes import (
    Dim,
    Shape,
    broadcast_shapes,
    canonical_dim,
    dim_product,
    divide_dims,
    format_shape,
    normalize_axis,
)

__all__ = ["DTYPES", "FLOAT_DTYPES", "SCHEMAS", "AttrSpec", "Op", "OpGroup", "OpSchema", "schema"]

DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool")
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


class Op(enum.Enum):
    """Every op of the IR. The value is the name used in text and JSON."""

    # leaves
    INPUT = "Input"
    CONST = "Const"
    # linear algebra
    LINEAR = "Linear"
    MATMUL = "MatMul"
    CONV2D = "Conv2d"
    # elementwise binary (broadcasting)
    ADD = "Add"
    SUB = "Sub"
    MUL = "Mul"
    DIV = "Div"
    # elementwise unary
    NEG = "Neg"
    RELU = "Relu"
    GELU = "Gelu"
    SILU = "Silu"
    SIGMOID = "Sigmoid"
    TANH = "Tanh"
    IDENTITY = "Identity"
    # normalisation
    SOFTMAX = "Softmax"
    LAYER_NORM = "LayerNorm"
    # movement
    RESHAPE = "Reshape"
    FLATTEN = "Flatten"
    TRANSPOSE = "Transpose"
    CONCAT = "Concat"
    SPLIT = "Split"
    GATHER = "Gather"
    GATHER_ELEMENTS = "GatherElements"
    INDEX = "Index"
    SLICE = "Slice"
    UNSQUEEZE = "Unsqueeze"
    SQUEEZE = "Squeeze"
    EXPAND = "Expand"
    # more elementwise unary (float math)
    EXP = "Exp"
    LOG = "Log"
    SQRT = "Sqrt"
    RSQRT = "Rsqrt"
    RECIPROCAL = "Reciprocal"
    COS = "Cos"
    SIN = "Sin"
    ABS = "Abs"
    POW = "Pow"  # binary, broadcasting
    # comparisons (broadcasting, result bool) and boolean logic
    EQUAL = "Equal"
    LESS = "Less"
    LESS_OR_EQUAL = "LessOrEqual"
    GREATER = "Greater"
    GREATER_OR_EQUAL = "GreaterOrEqual"
    NOT = "Not"
    AND = "And"
    OR = "Or"
    WHERE = "Where"
    CAST = "Cast"
    # reductions and scans
    REDUCE_MEAN = "ReduceMean"
    REDUCE_SUM = "ReduceSum"
    CUMSUM = "CumSum"
    # transformer blocks
    RMS_NORM = "RMSNorm"
    SDPA = "ScaledDotProductAttention"
    # sources with a (possibly dynamic) size given by attributes
    ARANGE = "Arange"


class OpGroup:
    """Membership sets, so passes test ``op in OpGroup.Binary`` rather than tuples inline."""

    Leaf = frozenset({Op.INPUT, Op.CONST})
    Binary = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW})
    Commutative = frozenset({Op.ADD, Op.MUL})
    Unary = frozenset(
        {Op.NEG, Op.RELU, Op.GELU, Op.SILU, Op.SIGMOID, Op.TANH, Op.IDENTITY, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT,
         Op.RECIPROCAL, Op.COS, Op.SIN, Op.ABS}
    )
    Movement = frozenset(
        {Op.RESHAPE, Op.FLATTEN, Op.TRANSPOSE, Op.CONCAT, Op.SPLIT, Op.GATHER, Op.GATHER_ELEMENTS, Op.INDEX, Op.SLICE, Op.UNSQUEEZE,
         Op.SQUEEZE, Op.EXPAND}
    )
    Compare = frozenset({Op.EQUAL, Op.LESS, Op.LESS_OR_EQUAL, Op.GREATER, Op.GREATER_OR_EQUAL})
    Logical = frozenset({Op.NOT, Op.AND, Op.OR})
    Reduce = frozenset({Op.REDUCE_MEAN, Op.REDUCE_SUM})
    DynamicSize = frozenset({Op.RESHAPE, Op.SLICE, Op.EXPAND, Op.ARANGE})  # ops with attributes of kind "dims"/"dim"


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: its kind and default (``REQUIRED`` when it has none)."""

    kind: str  # "int", "float", "str", "ints", "dim" (an int or a dim name), "dims" (a tuple of those)
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] | None = None


def _req(kind: str) -> AttrSpec:
    return AttrSpec(kind, required=True)


InferFn = Callable[[Sequence[Shape], Sequence[str], dict[str, Any]], tuple[Shape, str]]


@dataclass(frozen=True)
class OpSchema:
    """What the IR knows of an op without running it."""

    op: Op
    min_inputs: int
    max_inputs: int | None  # None: variadic
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    infer: InferFn | None = None  # None for leaves: shape/dtype are given
    doc: str = ""

    def check_arity(self, n: int, where: str) -> None:
        """Raise ``GraphError`` naming ``where`` when ``n`` inputs do not fit."""
        hi = self.max_inputs
        if n < self.min_inputs or (hi is not None and n > hi):
            want = (
                f"{self.min_inputs}"
                if hi == self.min_inputs
                else f"{self.min_inputs}..{'n' if hi is None else hi}"
            )
            raise GraphError(f"node {where!r} ({self.op.value}) takes {want} inputs, got {n}")

    def normalize_attrs(self, attrs: dict[str, Any], where: str) -> dict[str, Any]:
        """Validate ``attrs`` against the schema, fill defaults, return a new dict."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise GraphError(
                f"node {where!r} ({self.op.value}) has unknown attribute(s) {sorted(unknown)}"
            )
        out: dict[str, Any] = {}
        for name, spec in self.attrs.items():
            if name not in attrs:
                if spec.required:
                    raise GraphError(
                        f"node {where!r} ({self.op.value}) is missing attribute {name!r}"
                    )
                out[name] = spec.default
                continue
            out[name] = _coerce_attr(attrs[name], spec, f"{where}.{name}")
        return out


def _coerce_attr(value: Any, spec: AttrSpec, where: str) -> Any:
    bad = GraphError(f"attribute {where!r} = {value!r} is not a valid {spec.kind}")
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return int(value)
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if spec.kind == "str":
        if not isinstance(value, str):
            raise bad
        if spec.choices and value not in spec.choices:
            raise GraphError(
                f"attribute {where!r} = {value!r} must be one of {list(spec.choices or ())}"
            )
        return value
    if spec.kind == "ints":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return tuple(int(v) for v in value)
    if spec.kind == "dim":
        return _coerce_dim(value, bad)
    if spec.kind == "dims":
        if not isinstance(value, list | tuple):
            raise bad
        return tuple(_coerce_dim(v, bad) for v in value)
    raise AssertionError(f"unknown attribute kind {spec.kind}")  # pragma: no cover


def _coerce_dim(value: Any, bad: GraphError) -> Dim:
    """An int (any sign: an op gives negatives their meaning) or a dim name, canonicalized."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise bad
    if isinstance(value, int):
        return int(value)
    try:
        return canonical_dim(value)
    except ShapeError:
        raise bad from None


# --------------------------------------------------------------------------- inference
def _same_float_dtype(dtypes: Sequence[str]) -> str:
    first = dtypes[0]
    for d in dtypes[1:]:
        if d != first:
            raise ShapeError(f"dtypes {list(dtypes)} differ")
    return first


def _unary(shapes, dtypes, attrs):
    return tuple(shapes[0]), dtypes[0]


def _binary(shapes, dtypes, attrs):
    return broadcast_shapes(shapes[0], shapes[1]), _same_float_dtype(dtypes)


def _linear(shapes, dtypes, attrs):
    x, w = shapes[0], shapes[1]
    if len(x) < 1 or len(w) != 2:
        raise ShapeError(f"Linear needs x of rank >= 1 and W of rank 2, got {format_shape(x)}, {format_shape(w)}")
    if canonical_dim(x[-1]) != canonical_dim(w[1]):
        raise ShapeError(
            f"Linear: x {format_shape(x)} has {x[-1]} features, W {format_shape(w)} expects {w[1]}"
        )
    if len(shapes) == 3 and (len(shapes[2]) != 1 or canonical_dim(shapes[2][0]) != canonical_dim(w[0])):
        raise ShapeError(f"Linear: bias {format_shape(shapes[2])} does not match W {format_shape(w)}")
    return (*x[:-1], w[0]), _same_float_dtype(dtypes)


def _matmul(shapes, dtypes, attrs):
    a, b = shapes
    if not a or not b:
        raise ShapeError("MatMul operands must have rank >= 1")
    a2 = (1, *a) if len(a) == 1 else tuple(a)
    b2 = (*b, 1) if len(b) == 1 else tuple(b)
    if canonical_dim(a2[-1]) != canonical_dim(b2[-2]):
        raise ShapeError(f"MatMul: {format_shape(a)} @ {format_shape(b)} inner dims differ")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    out = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out, _same_float_dtype(dtypes)


def _conv_out(size: Dim, k: int, s: int, p: int, d: int) -> Dim:
    if not isinstance(size, int):
        if k == 1 and s == 1 and p == 0:
            return size
        raise ShapeError("Conv2d: spatial dims must be static unless the kernel is 1x1, stride 1, no padding")
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out <= 0:
        raise ShapeError(f"Conv2d: input size {size} too small for kernel {k} (dilation {d}, padding {p})")
    return out


def _conv2d(shapes, dtypes, attrs):
    x, w = shapes[0], shapes[1]
    if len(x) != 4 or len(w) != 4:
        raise ShapeError(f"Conv2d needs x [N,C,H,W] and W [O,C/g,kh,kw], got {format_shape(x)}, {format_shape(w)}")
    g = attrs["groups"]
    for name in ("stride", "padding", "dilation"):
        if len(attrs[name]) != 2:
            raise ShapeError(f"Conv2d: {name} must have 2 values, got {attrs[name]}")
    if g < 1 or not isinstance(w[0], int) or w[0] % g:
        raise ShapeError(f"Conv2d: {w[0]} output channels not divisible by groups={g}")
    cin = x[1]
    if not isinstance(cin, int) or not isinstance(w[1], int) or cin != w[1] * g:
        raise ShapeError(f"Conv2d: x has {cin} channels, W {format_shape(w)} with groups={g} expects {w[1] * g}")
    if len(shapes) == 3 and (len(shapes[2]) != 1 or shapes[2][0] != w[0]):
        raise ShapeError(f"Conv2d: bias {format_shape(shapes[2])} does not match {w[0]} channels")
    if not isinstance(w[2], int) or not isinstance(w[3], int):
        raise ShapeError(f"Conv2d: kernel size of W {format_shape(w)} must be static")
    (sh, sw), (ph, pw), (dh, dw) = attrs["stride"], attrs["padding"], attrs["dilation"]
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ShapeError("Conv2d: stride and dilation must be >= 1 and padding >= 0")
    h = _conv_out(x[2], int(w[2]), sh, ph, dh)
    ww = _conv_out(x[3], int(w[3]), sw, pw, dw)
    return (x[0], w[0], h, ww), _same_float_dtype(dtypes)


def _softmax(shapes, dtypes, attrs):
    normalize_axis(attrs["axis"], len(shapes[0]))
    return tuple(shapes[0]), dtypes[0]


def _layer_norm(shapes, dtypes, attrs):
    _tf.check_norm_params(shapes, attrs, "LayerNorm: scale/bias")
    return tuple(shapes[0]), _same_float_dtype(dtypes)


def _reshape(shapes, dtypes, attrs):
    x = shapes[0]
    target = attrs["shape"]
    out: list[Dim | None] = []
    infer_at = None
    for i, t in enumerate(target):
        if isinstance(t, str):
            out.append(t)
        elif t == 0:
            if i >= len(x):
                raise ShapeError(f"Reshape: 0 at position {i} but input rank is {len(x)}")
            out.append(canonical_dim(x[i]))
        elif t == -1:
            if infer_at is not None:
                raise ShapeError(f"Reshape: more than one -1 in {target}")
            infer_at = i
            out.append(None)
        elif t > 0:
            out.append(t)
        else:
            raise ShapeError(f"Reshape: invalid target dim {t} in {target}")
    total = dim_product(x)
    known = dim_product([d for d in out if d is not None])
    if infer_at is not None:
        missing = divide_dims(total, known)
        if missing is None:
            raise ShapeError(f"Reshape: cannot infer -1 in {target} for input {format_shape(x)}")
        out[infer_at] = missing
    elif canonical_dim(total) != canonical_dim(known):
        raise ShapeError(f"Reshape: {format_shape(x)} has {total} elements, target {target} has {known}")
    return tuple(out), dtypes[0]  # type: ignore[arg-type]


def _flatten(shapes, dtypes, attrs):
    x = shapes[0]
    axis = attrs["axis"]
    if not -len(x) <= axis <= len(x):
        raise ShapeError(f"Flatten: axis {axis} out of range for rank {len(x)}")
    if axis < 0:
        axis += len(x)
    return (dim_product(x[:axis]), dim_product(x[axis:])), dtypes[0]


def _transpose(shapes, dtypes, attrs):
    x = shapes[0]
    perm = attrs["perm"]
    if sorted(perm) != list(range(len(x))):
        raise ShapeError(f"Transpose: perm {perm} is not a permutation of {len(x)} axes")
    return tuple(x[p] for p in perm), dtypes[0]


def _concat(shapes, dtypes, attrs):
    rank = len(shapes[0])
    axis = normalize_axis(attrs["axis"], rank)
    for s in shapes[1:]:
        if len(s) != rank:
            raise ShapeError(f"Concat: ranks differ ({[format_shape(s) for s in shapes]})")
        for i in range(rank):
            if i != axis and canonical_dim(s[i]) != canonical_dim(shapes[0][i]):
                raise ShapeError(f"Concat: dim {i} differs ({[format_shape(s) for s in shapes]})")
    out = list(shapes[0])
    out[axis] = _sum_dims([s[axis] for s in shapes])
    return tuple(out), _same_float_dtype(dtypes)


def _sum_dims(dims: Sequence[Dim]) -> Dim:
    if all(isinstance(d, int) for d in dims):
        return sum(int(d) for d in dims)
    raise ShapeError(f"Concat along named dims {list(dims)} is not supported")


def _split(shapes, dtypes, attrs):
    x = shapes[0]
    axis = normalize_axis(attrs["axis"], len(x))
    sizes, index = attrs["sizes"], attrs["index"]
    if not sizes or any(s <= 0 for s in sizes):
        raise ShapeError(f"Split: sizes {sizes} must be positive")
    if not 0 <= index < len(sizes):
        raise ShapeError(f"Split: index {index} out of range for {len(sizes)} pieces")
    if x[axis] != sum(sizes):
        raise ShapeError(f"Split: sizes {sizes} do not add up to dim {axis} = {x[axis]}")
    out = list(x)
    out[axis] = sizes[index]
    return tuple(out), dtypes[0]


_S = OpSchema
_UNARY_DOCS = {
    Op.EXP: "exp(x).", Op.LOG: "log(x).", Op.SQRT: "sqrt(x).", Op.RSQRT: "1 / sqrt(x).", Op.RECIPROCAL: "1 / x.",
    Op.COS: "cos(x).", Op.SIN: "sin(x).", Op.ABS: "|x|.",
}
_COMPARE_DOCS = {
    Op.EQUAL: "a == b", Op.LESS: "a < b", Op.LESS_OR_EQUAL: "a <= b", Op.GREATER: "a > b", Op.GREATER_OR_EQUAL: "a >= b",
}
_TRANSFORMER_SCHEMAS = [
    _S(Op.GATHER, 2, 2, {"axis": AttrSpec("int", 0)}, _tf.infer_gather,
       "ONNX Gather: data[..., indices, ...] along axis (negative indices count from the end); Embedding is axis 0."),
    _S(Op.GATHER_ELEMENTS, 2, 2, {"axis": AttrSpec("int", 0)}, _tf.infer_gather_elements,
       "ONNX GatherElements / torch.gather: out[i][j] = data[index[i][j]][j] (axis 0); the result has the index's shape."),
    _S(Op.INDEX, 2, None, {"axis": AttrSpec("int", 0)}, _tf.infer_index,
       "numpy/torch advanced indexing x[..., i0, i1, ...] of consecutive axes from axis; the indices broadcast."),
    _S(Op.SLICE, 1, 1, {"axes": _req("ints"), "starts": _req("dims"), "ends": _req("dims"), "steps": AttrSpec("ints", ())},
       _tf.infer_slice, "ONNX Slice with steps >= 1 (empty: all 1); bounds may name dims; ends >= 2**62 mean the end."),
    _S(Op.UNSQUEEZE, 1, 1, {"axes": _req("ints")}, _tf.infer_unsqueeze, "Insert size-1 dims at axes of the output."),
    _S(Op.SQUEEZE, 1, 1, {"axes": _req("ints")}, _tf.infer_squeeze, "Drop the size-1 dims at axes."),
    _S(Op.EXPAND, 1, 1, {"shape": _req("dims")}, _tf.infer_expand,
       "ONNX Expand: broadcast x against shape (ints or dim names)."),
    *[_S(op, 1, 1, {}, _unary, doc) for op, doc in _UNARY_DOCS.items()],
    _S(Op.POW, 2, 2, {}, _binary, "a ** b, broadcasting."),
    *[_S(op, 2, 2, {}, _tf.infer_compare, f"{doc}, broadcasting; the result is bool.") for op, doc in _COMPARE_DOCS.items()],
    _S(Op.NOT, 1, 1, {}, _tf.infer_logical_not, "Logical not of a bool value."),
    _S(Op.AND, 2, 2, {}, _tf.infer_logical, "Logical and of bool values, broadcasting."),
    _S(Op.OR, 2, 2, {}, _tf.infer_logical, "Logical or of bool values, broadcasting."),
    _S(Op.WHERE, 3, 3, {}, _tf.infer_where, "cond ? a : b, broadcasting all three."),
    _S(Op.CAST, 1, 1, {"to": AttrSpec("str", required=True, choices=DTYPES)}, _tf.infer_cast,
       "Convert to dtype `to` (float -> int truncates toward zero, nonzero -> True)."),
    _S(Op.REDUCE_MEAN, 1, 1, {"axes": AttrSpec("ints", ()), "keepdims": AttrSpec("int", 1)}, _tf.infer_reduce,
       "Mean over axes (empty: all), keeping them as size 1 when keepdims."),
    _S(Op.REDUCE_SUM, 1, 1, {"axes": AttrSpec("ints", ()), "keepdims": AttrSpec("int", 1)}, _tf.infer_reduce,
       "Sum over axes (empty: all), keeping them as size 1 when keepdims."),
    _S(Op.CUMSUM, 1, 1, {"axis": _req("int")}, _tf.infer_cumsum, "Inclusive cumulative sum along axis."),
    _S(Op.RMS_NORM, 1, 2, {"axis": AttrSpec("int", -1), "epsilon": AttrSpec("float", 1e-6)}, _tf.infer_rms_norm,
       "x / sqrt(mean(x**2 over dims axis..end) + epsilon) * scale (ONNX RMSNormalization)."),
    _S(Op.SDPA, 3, 4, {"is_causal": AttrSpec("int", 0), "scale": AttrSpec("float", 0.0)}, _tf.infer_sdpa,
       "softmax(q @ k^T * scale + mask) @ v; scale 0 is 1/sqrt(E); a bool mask keeps True, a float mask adds; "
       "is_causal keeps j <= i (top-left); a row with nothing kept is 0 (as torch)."),
    _S(Op.ARANGE, 0, 0, {"start": AttrSpec("dim", 0), "end": _req("dim"), "step": AttrSpec("dim", 1),
                         "dtype": AttrSpec("str", "int64", choices=("int32", "int64", "float32", "float64"))},
       _tf.infer_arange, "start, start + step, ... < end; bounds may name dims (Arange(0, 'seq'))."),
]
SCHEMAS: dict[Op, OpSchema] = {
    s.op: s
    for s in [
        _S(Op.INPUT, 0, 0, {}, None, "A graph input; shape and dtype are declared."),
        _S(Op.CONST, 0, 0, {"param": _req("str")}, None, "A named weight from graph.params."),
        _S(Op.LINEAR, 2, 3, {}, _linear, "x @ W.T (+ b); W is [out, in] (torch layout)."),
        _S(Op.MATMUL, 2, 2, {}, _matmul, "numpy/ONNX MatMul with batch broadcasting."),
        _S(
            Op.CONV2D,
            2,
            3,
            {
                "stride": AttrSpec("ints", (1, 1)),
                "padding": AttrSpec("ints", (0, 0)),
                "dilation": AttrSpec("ints", (1, 1)),
                "groups": AttrSpec("int", 1),
            },
            _conv2d,
            "NCHW convolution, W [O, C/groups, kh, kw], symmetric padding (ph, pw).",
        ),
        _S(Op.ADD, 2, 2, {}, _binary, "a + b, broadcasting."),
        _S(Op.SUB, 2, 2, {}, _binary, "a - b, broadcasting."),
        _S(Op.MUL, 2, 2, {}, _binary, "a * b, broadcasting."),
        _S(Op.DIV, 2, 2, {}, _binary, "a / b, broadcasting."),
        _S(Op.NEG, 1, 1, {}, _unary, "-x."),
        _S(Op.RELU, 1, 1, {}, _unary, "max(x, 0)."),
        _S(
            Op.GELU,
            1,
            1,
            {"approximate": AttrSpec("str", "none", choices=("none", "tanh"))},
            _unary,
            "GELU, exact (erf) or tanh approximation.",
        ),
        _S(Op.SILU, 1, 1, {}, _unary, "x * sigmoid(x)."),
        _S(Op.SIGMOID, 1, 1, {}, _unary, "1 / (1 + exp(-x))."),
        _S(Op.TANH, 1, 1, {}, _unary, "tanh(x)."),
        _S(Op.IDENTITY, 1, 1, {}, _unary, "x."),
        _S(Op.SOFTMAX, 1, 1, {"axis": AttrSpec("int", -1)}, _softmax, "softmax along axis."),
        _S(
            Op.LAYER_NORM,
            1,
            3,
            {"axis": AttrSpec("int", -1), "epsilon": AttrSpec("float", 1e-5)},
            _layer_norm,
            "Normalise over dims axis..end, then * scale + bias (ONNX LayerNormalization).",
        ),
        _S(Op.RESHAPE, 1, 1, {"shape": _req("dims")}, _reshape,
           "ONNX Reshape: 0 copies a dim, -1 infers one, a name is that dynamic dim."),
        _S(Op.FLATTEN, 1, 1, {"axis": AttrSpec("int", 1)}, _flatten, "ONNX Flatten to 2-D at axis."),
        _S(Op.TRANSPOSE, 1, 1, {"perm": _req("ints")}, _transpose, "Permute axes."),
        _S(Op.CONCAT, 1, None, {"axis": _req("int")}, _concat, "Concatenate along axis."),
        _S(
            Op.SPLIT,
            1,
            1,
            {"axis": _req("int"), "sizes": _req("ints"), "index": _req("int")},
            _split,
            "The index-th piece of splitting x along axis into sizes.",
        ),
        *_TRANSFORMER_SCHEMAS,
    ]
}


def schema(op: Op) -> OpSchema:
    """The schema of ``op``."""
    return SCHEMAS[op]
