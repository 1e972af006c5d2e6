"""Reductions and scans: ``ReduceMean``, ``ReduceSum``, ``ReduceProd``, ``ReduceMax``,
``ReduceMin``, ``ReduceVar``, ``ArgMax``, ``ArgMin``, ``CumSum``, ``LinearScan``, ``ArgTopK``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. The numpy rules sum, multiply,
average and take variances of floats in float64 (the caller rounds the result to the node's
dtype). ``ReduceMax``/``ReduceMin`` propagate NaN (numpy and torch alike); ``ArgMax``/``ArgMin``
return the first index of the extreme value on ties, as torch does (ONNX ``select_last_index=0``).
``ArgTopK`` (the indices of ``torch.topk``/``torch.sort``; the values are a ``GatherElements`` of
them) is sorted and stable: equal values keep their order, the lower index first (ONNX ``TopK``'s
rule; torch's ``topk`` and unstable ``sort`` leave the order of ties unspecified), NaN the largest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import canonical_dim, dims_equal, normalize_axis
from flora_graph.ops._onnx import ONNX_DTYPES, dim_tensor, int64
from flora_graph.ops._torch import bound_expr, ints, torch_dtype
from flora_graph.ops.registry import define

__all__: list[str] = []


# --------------------------------------------------------------------------- ReduceMean, ReduceSum
def _reduce_axes(axes: Sequence[int], rank: int, what: str) -> list[int]:
    norm = [normalize_axis(a, rank, what=f"{what} axis") for a in axes] if axes else list(range(rank))
    if len(set(norm)) != len(norm):
        raise ShapeError(f"{what}: axes {tuple(axes)} repeat an axis")
    return norm


def _reduced(x, axes: set[int], keepdims: int):
    """``x``'s shape with ``axes`` reduced: kept as size 1 when ``keepdims``, else dropped."""
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(x))
    return tuple(d for i, d in enumerate(x) if i not in axes)


def _infer_reduce(shapes, dtypes, attrs):
    """``ReduceMean``/``ReduceSum`` over ``axes`` (empty: every axis), ``keepdims`` 0 or 1."""
    x = shapes[0]
    if dtypes[0] == "bool":
        raise ShapeError("reductions do not take bool inputs (cast first)")
    if attrs["keepdims"] not in (0, 1):
        raise ShapeError(f"keepdims must be 0 or 1, got {attrs['keepdims']}")
    return _reduced(x, set(_reduce_axes(attrs["axes"], len(x), "reduce")), attrs["keepdims"]), dtypes[0]


def _numpy_reduce(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def impl(x: np.ndarray, *, axes: tuple[int, ...], keepdims: int) -> np.ndarray:
        axis = tuple(a % x.ndim for a in axes) if axes else None
        return fn(x, axis=axis, keepdims=bool(keepdims), dtype=np.float64 if x.dtype.kind in "fV" else None)

    return impl


def _mean(x: np.ndarray, *, axis, keepdims: bool, dtype) -> np.ndarray:
    return np.mean(x, axis=axis, keepdims=keepdims, dtype=dtype or np.float64)


def _onnx_reduce(op_type: str) -> Callable[[Any, ComputationNode, str], None]:
    def lower(ctx: Any, node: ComputationNode, out: str) -> None:
        axes = node.attrs["axes"]
        extra = [int64(ctx, axes, f"{node.name}/axes")] if axes else []
        ctx.emit(op_type, [ctx.arg(node, 0), *extra], [out], keepdims=node.attrs["keepdims"])

    lower.__doc__ = f"``{op_type}`` with its axes as an input (none: every axis)."
    return lower


def _torch_reduce(fn: str) -> Callable[[ComputationNode, list[str]], str]:
    def lower(node: ComputationNode, args: list[str]) -> str:
        rank = len(node.inputs[0].shape)
        axes = [a % rank for a in node.attrs["axes"]] or list(range(rank))
        keep = bool(node.attrs["keepdims"])
        dtype = f", dtype={torch_dtype(node.dtype)}" if fn == "torch.sum" else ""  # torch sums integers as int64
        return f"{fn}({args[0]}, {ints(axes)}, {keep}{dtype})"

    return lower


_REDUCE_ATTRS = {"axes": AttrSpec("ints", ()), "keepdims": AttrSpec("int", 1)}

define(
    "REDUCE_MEAN", "ReduceMean", (1, 1), dict(_REDUCE_ATTRS),
    infer=_infer_reduce, doc="Mean over axes (empty: all), keeping them as size 1 when keepdims.",
    numpy=_numpy_reduce(_mean), onnx=_onnx_reduce("ReduceMean"), torch=_torch_reduce("torch.mean"),
    groups=("Reduce",),
)
define(
    "REDUCE_SUM", "ReduceSum", (1, 1), dict(_REDUCE_ATTRS),
    infer=_infer_reduce, doc="Sum over axes (empty: all), keeping them as size 1 when keepdims.",
    numpy=_numpy_reduce(np.sum), onnx=_onnx_reduce("ReduceSum"), torch=_torch_reduce("torch.sum"),
    groups=("Reduce",),
)


# --------------------------------------------------------------------------- ReduceProd, ReduceMax, ReduceMin
def _numpy_extreme(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def impl(x: np.ndarray, *, axes: tuple[int, ...], keepdims: int) -> np.ndarray:
        axis = tuple(a % x.ndim for a in axes) if axes else None
        return fn(x, axis=axis, keepdims=bool(keepdims))

    return impl


def _torch_prod(node: ComputationNode, args: list[str]) -> str:
    """``torch.prod`` takes one dim: one call per axis, the highest first (all axes: one call)."""
    rank = len(node.inputs[0].shape)
    axes = sorted({a % rank for a in node.attrs["axes"]} or range(rank), reverse=True)
    keep, dtype = bool(node.attrs["keepdims"]), torch_dtype(node.dtype)
    if not axes:  # a scalar
        return f"{args[0]}.to({dtype})"
    if not keep and len(axes) == rank:
        return f"torch.prod({args[0]}, dtype={dtype})"
    expr = args[0]
    for a in axes:
        expr = f"torch.prod({expr}, {a}, {keep}, dtype={dtype})"
    return expr


define(
    "REDUCE_PROD", "ReduceProd", (1, 1), dict(_REDUCE_ATTRS),
    infer=_infer_reduce, doc="Product over axes (empty: all), keeping them as size 1 when keepdims.",
    numpy=_numpy_reduce(np.prod), onnx=_onnx_reduce("ReduceProd"), torch=_torch_prod,
    groups=("Reduce",),
)
define(
    "REDUCE_MAX", "ReduceMax", (1, 1), dict(_REDUCE_ATTRS),
    infer=_infer_reduce, doc="Maximum over axes (empty: all; NaN wins), keeping them as size 1 when keepdims.",
    numpy=_numpy_extreme(np.max), onnx=_onnx_reduce("ReduceMax"), torch=_torch_reduce("torch.amax"),
    groups=("Reduce",),
)
define(
    "REDUCE_MIN", "ReduceMin", (1, 1), dict(_REDUCE_ATTRS),
    infer=_infer_reduce, doc="Minimum over axes (empty: all; NaN wins), keeping them as size 1 when keepdims.",
    numpy=_numpy_extreme(np.min), onnx=_onnx_reduce("ReduceMin"), torch=_torch_reduce("torch.amin"),
    groups=("Reduce",),
)


# --------------------------------------------------------------------------- ReduceVar
def _infer_var(shapes, dtypes, attrs):
    if dtypes[0] not in ("float16", "bfloat16", "float32", "float64"):
        raise ShapeError(f"ReduceVar takes a float input, got {dtypes[0]}")
    return _infer_reduce(shapes, dtypes, attrs)


def _numpy_var(x: np.ndarray, *, axes: tuple[int, ...], keepdims: int, correction: float) -> np.ndarray:
    axis = tuple(a % x.ndim for a in axes) if axes else None
    with np.errstate(divide="ignore", invalid="ignore"):  # n <= correction: inf or NaN, as torch
        return np.var(x, axis=axis, ddof=correction, keepdims=bool(keepdims), dtype=np.float64)


def _onnx_var(ctx: Any, node: ComputationNode, out: str) -> None:
    """sum((x - mean)^2) / (n - correction), n the product of the reduced sizes (read off ``Shape``)."""
    x, keep = ctx.arg(node, 0), node.attrs["keepdims"]
    rank = len(node.inputs[0].shape)
    axes = [a % rank for a in node.attrs["axes"]] or list(range(rank))
    axes_in = [int64(ctx, axes, f"{node.name}/axes")] if axes else []
    mean = ctx.emit("ReduceMean", [x, *axes_in], keepdims=1)
    diff = ctx.emit("Sub", [x, mean])
    total = ctx.emit("ReduceSum", [ctx.emit("Mul", [diff, diff]), *axes_in], keepdims=keep)
    sizes = ctx.emit("Gather", [ctx.emit("Shape", [x]), int64(ctx, axes, f"{node.name}/reduced")], axis=0)
    count = ctx.emit("Cast", [ctx.emit("ReduceProd", [sizes], keepdims=0)], to=ONNX_DTYPES[ctx.dtype])
    denom = ctx.emit("Sub", [count, ctx.scalar(float(node.attrs["correction"]))])
    ctx.emit("Div", [total, denom], [out])


def _torch_var(node: ComputationNode, args: list[str]) -> str:
    rank = len(node.inputs[0].shape)
    axes = [a % rank for a in node.attrs["axes"]] or list(range(rank))
    keep, c = bool(node.attrs["keepdims"]), float(node.attrs["correction"])
    return f"torch.var({args[0]}, {ints(axes)}, correction={c!r}, keepdim={keep})"


define(
    "REDUCE_VAR", "ReduceVar", (1, 1), {**_REDUCE_ATTRS, "correction": AttrSpec("float", 1.0)},
    infer=_infer_var,
    doc="Variance over axes (empty: all): sum((x - mean)^2) / (n - correction), keeping axes when keepdims.",
    numpy=_numpy_var, onnx=_onnx_var, torch=_torch_var,
    groups=("Reduce",),
)


# --------------------------------------------------------------------------- ArgMax, ArgMin
def _infer_arg(shapes, dtypes, attrs):
    x = shapes[0]
    if dtypes[0] == "bool":
        raise ShapeError("ArgMax/ArgMin do not take bool inputs (cast first)")
    if attrs["keepdims"] not in (0, 1):
        raise ShapeError(f"keepdims must be 0 or 1, got {attrs['keepdims']}")
    if not x:
        raise ShapeError("ArgMax/ArgMin need an input of rank >= 1 (reshape a scalar first)")
    return _reduced(x, {normalize_axis(attrs["axis"], len(x), what="arg axis")}, attrs["keepdims"]), "int64"


def _numpy_arg(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def impl(x: np.ndarray, *, axis: int, keepdims: int) -> np.ndarray:  # first index on ties, NaN wins
        return fn(x, axis=axis % x.ndim, keepdims=bool(keepdims)).astype(np.int64)

    return impl


def _onnx_arg(op_type: str) -> Callable[[Any, ComputationNode, str], None]:
    def lower(ctx: Any, node: ComputationNode, out: str) -> None:
        x = ctx.arg(node, 0)
        if node.inputs[0].dtype in ("float16", "bfloat16"):
            x = ctx.emit("Cast", [x], to=ONNX_DTYPES["float32"])
        ctx.emit(op_type, [x], [out], axis=int(node.attrs["axis"]), keepdims=int(node.attrs["keepdims"]),
                 select_last_index=0)

    lower.__doc__ = f"``{op_type}`` (first index on ties: ``select_last_index=0``)."
    return lower


def _torch_arg(fn: str) -> Callable[[ComputationNode, list[str]], str]:
    def lower(node: ComputationNode, args: list[str]) -> str:
        return f"{fn}({args[0]}, {int(node.attrs['axis'])}, {bool(node.attrs['keepdims'])})"

    return lower


_ARG_ATTRS = {"axis": AttrSpec("int", required=True), "keepdims": AttrSpec("int", 1)}

define(
    "ARG_MAX", "ArgMax", (1, 1), dict(_ARG_ATTRS),
    infer=_infer_arg, doc="int64 index of the maximum along axis (the first on ties; NaN counts as the maximum).",
    numpy=_numpy_arg(np.argmax), onnx=_onnx_arg("ArgMax"), torch=_torch_arg("torch.argmax"),
)
define(
    "ARG_MIN", "ArgMin", (1, 1), dict(_ARG_ATTRS),
    infer=_infer_arg, doc="int64 index of the minimum along axis (the first on ties; NaN counts as the minimum).",
    numpy=_numpy_arg(np.argmin), onnx=_onnx_arg("ArgMin"), torch=_torch_arg("torch.argmin"),
)


# --------------------------------------------------------------------------- CumSum
def _infer_cumsum(shapes, dtypes, attrs):
    if dtypes[0] == "bool":
        raise ShapeError("CumSum does not take bool inputs (cast first)")
    normalize_axis(attrs["axis"], len(shapes[0]))
    return tuple(shapes[0]), dtypes[0]


def _numpy_cumsum(x: np.ndarray, *, axis: int) -> np.ndarray:
    return np.cumsum(x, axis=axis, dtype=np.float64 if x.dtype.kind in "fV" else None)


def _onnx_cumsum(ctx: Any, node: ComputationNode, out: str) -> None:
    """``CumSum`` with its axis as a rank-0 int64 input."""
    axis = ctx.constant(np.array(node.attrs["axis"], dtype=np.int64), f"{node.name}/axis")
    ctx.emit("CumSum", [ctx.arg(node, 0), axis], [out])


def _torch_cumsum(node: ComputationNode, args: list[str]) -> str:
    return f"torch.cumsum({args[0]}, {int(node.attrs['axis'])}, dtype={torch_dtype(node.dtype)})"


define(
    "CUMSUM", "CumSum", (1, 1), {"axis": AttrSpec("int", required=True)},
    infer=_infer_cumsum, doc="Inclusive cumulative sum along axis.",
    numpy=_numpy_cumsum, onnx=_onnx_cumsum, torch=_torch_cumsum,
)


# --------------------------------------------------------------------------- LinearScan
def _infer_linear_scan(shapes, dtypes, attrs):
    """``a`` and ``b`` of one shape; ``h0`` that shape without the scanned axis; floats of one dtype."""
    a, b, h0 = shapes
    if len(set(dtypes)) != 1 or dtypes[0] not in ("float16", "bfloat16", "float32", "float64"):
        raise ShapeError(f"LinearScan takes floats of one dtype, got {', '.join(dtypes)}")
    if len(a) != len(b) or not all(dims_equal(x, y) for x, y in zip(a, b, strict=True)):
        raise ShapeError(f"LinearScan: a {tuple(a)} and b {tuple(b)} differ in shape")
    axis = normalize_axis(attrs["axis"], len(a), what="LinearScan axis")
    rest = [d for i, d in enumerate(a) if i != axis]
    if len(h0) != len(rest) or not all(dims_equal(x, y) for x, y in zip(h0, rest, strict=True)):
        raise ShapeError(f"LinearScan: h0 {tuple(h0)} is not a {tuple(a)} without axis {axis}")
    return tuple(b), dtypes[0]


def _numpy_linear_scan(a: np.ndarray, b: np.ndarray, h0: np.ndarray, *, axis: int) -> np.ndarray:
    """``h[t] = a[t] * h[t-1] + b[t]`` along ``axis`` from ``h[-1] = h0``, in float64."""
    axis %= a.ndim
    a64, b64 = np.moveaxis(a, axis, 0).astype(np.float64), np.moveaxis(b, axis, 0).astype(np.float64)
    out, h = np.empty_like(b64), h0.astype(np.float64)
    for t in range(a64.shape[0]):
        h = a64[t] * h + b64[t]
        out[t] = h
    return np.moveaxis(out, 0, axis)


def _onnx_linear_scan(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Scan`` over ``a`` and ``b`` along the axis, its state ``h0``: a body of one ``Mul`` and one ``Add``."""
    from onnx import helper

    a, b, h0 = ctx.args(node)
    axis = int(node.attrs["axis"]) % len(node.shape)
    elem = ONNX_DTYPES[ctx.dtype]  # the compute dtype: float32 for a widened 16-bit node
    body = helper.make_graph(
        [helper.make_node("Mul", ["a_t", "h"], ["ah"]), helper.make_node("Add", ["ah", "b_t"], ["h_next"]),
         helper.make_node("Identity", ["h_next"], ["h_out"])],
        f"{node.name}_step",
        [helper.make_tensor_value_info(n, elem, None) for n in ("h", "a_t", "b_t")],
        [helper.make_tensor_value_info(n, elem, None) for n in ("h_next", "h_out")],
    )
    ctx.emit("Scan", [h0, a, b], [ctx.fresh(f"{out}/last"), out], body=body, num_scan_inputs=2,
             scan_input_axes=[axis, axis], scan_output_axes=[axis])


_SCAN_HELPER = "_flora_linear_scan"
_SCAN_SOURCE = f'''
def {_SCAN_HELPER}(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, axis: int) -> torch.Tensor:
    """h[t] = a[t] * h[t-1] + b[t] along axis: a loop in TorchScript, torch's scan elsewhere (torch.export)."""
    if torch.jit.is_scripting():
        states = []
        for t in range(a.size(axis)):
            h = a.select(axis, t) * h + b.select(axis, t)
            states.append(h)
        return torch.stack(states, axis)
    return {_SCAN_HELPER}_traced(a, b, h, axis)


def {_SCAN_HELPER}_step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h.clone()


@torch.jit.unused
def {_SCAN_HELPER}_traced(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, axis: int) -> torch.Tensor:
    from torch._higher_order_ops.scan import scan

    return scan({_SCAN_HELPER}_step, h, (a.movedim(axis, 0), b.movedim(axis, 0)))[1].movedim(0, axis)
'''


def _torch_linear_scan(node: ComputationNode, args: list[str]) -> str:
    return f"{_SCAN_HELPER}({args[0]}, {args[1]}, {args[2]}, {int(node.attrs['axis']) % len(node.shape)})"


define(
    "LINEAR_SCAN", "LinearScan", (3, 3), {"axis": AttrSpec("int", required=True)},
    infer=_infer_linear_scan,
    doc="Every state of the first-order linear recurrence h[t] = a[t] * h[t-1] + b[t] along axis, from h[-1] = h0 "
        "(inputs a, b, h0; h0 is a's shape without axis): a selective scan's states (Mamba), CumSum when a is 1.",
    numpy=_numpy_linear_scan, onnx=_onnx_linear_scan, torch=_torch_linear_scan, torch_source=_SCAN_SOURCE,
)


# --------------------------------------------------------------------------- ArgTopK
def _infer_arg_top_k(shapes, dtypes, attrs):
    """``k`` an int (at most the axis's size when that is static) or the axis's own dim (a full sort)."""
    x, k = shapes[0], attrs["k"]
    if dtypes[0] == "bool":
        raise ShapeError("ArgTopK does not take bool inputs (cast first)")
    if not x:
        raise ShapeError("ArgTopK needs an input of rank >= 1 (reshape a scalar first)")
    if attrs["largest"] not in (0, 1):
        raise ShapeError(f"largest must be 0 or 1, got {attrs['largest']}")
    axis = normalize_axis(attrs["axis"], len(x), what="ArgTopK axis")
    size = x[axis]
    if isinstance(k, str):
        if not dims_equal(k, size):
            raise ShapeError(f"ArgTopK: a named k ({k!r}) must be the axis's dim ({size!r})")
    elif k < 0 or (isinstance(size, int) and k > size):
        raise ShapeError(f"ArgTopK: k = {k} is not in [0, {size}] (axis {axis})")
    out = list(x)
    out[axis] = canonical_dim(k) if isinstance(k, str) else int(k)
    return tuple(out), "int64"


def _numpy_arg_top_k(x: np.ndarray, *, k: int, axis: int, largest: int) -> np.ndarray:
    a = axis % x.ndim
    if largest:  # descending and stable: sort the reversed axis ascending (stable), reverse, map indices back
        order = x.shape[a] - 1 - np.flip(np.argsort(np.flip(x, a), axis=a, kind="stable"), a)
    else:
        order = np.argsort(x, axis=a, kind="stable")  # NaN last, as torch
    return np.take(order, np.arange(k), axis=a).astype(np.int64)


def _onnx_arg_top_k(ctx: Any, node: ComputationNode, out: str) -> None:
    """``TopK`` (``sorted=1``; ties: the lower index first) with ``k`` as an int64 ``[1]``, its indices output."""
    x = ctx.arg(node, 0)
    if node.inputs[0].dtype in ("float16", "bfloat16"):
        x = ctx.emit("Cast", [x], to=ONNX_DTYPES["float32"])
    k = dim_tensor(ctx, node.attrs["k"], node)
    ctx.emit("TopK", [x, k], [ctx.fresh(f"{out}/values"), out], axis=int(node.attrs["axis"]),
             largest=int(node.attrs["largest"]), sorted=1)


def _torch_arg_top_k(node: ComputationNode, args: list[str]) -> str:
    """A stable ``torch.sort`` (``torch.topk`` leaves ties unspecified), narrowed to ``k`` when it is not the axis."""
    shape = node.inputs[0].shape
    axis, k = int(node.attrs["axis"]) % len(shape), node.attrs["k"]
    desc = bool(node.attrs["largest"])
    expr = f"torch.sort({args[0]}, dim={axis}, descending={desc}, stable=True)[1]"
    if isinstance(k, str) or (isinstance(shape[axis], int) and k == shape[axis]):
        return expr
    return f"{expr}.narrow({axis}, 0, {bound_expr(k, node)})"


define(
    "ARG_TOP_K", "ArgTopK", (1, 1),
    {"k": AttrSpec("dim", required=True), "axis": AttrSpec("int", required=True), "largest": AttrSpec("int", 1)},
    infer=_infer_arg_top_k,
    doc="int64 indices of the k largest (largest=1) or smallest values along axis, sorted; ties: the lower index "
        "first; NaN the largest. k may be the axis's dim (a full sort).",
    numpy=_numpy_arg_top_k, onnx=_onnx_arg_top_k, torch=_torch_arg_top_k,
)
