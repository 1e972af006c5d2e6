"""ONNX lowerings of the transformer op family; importing this module registers them in ``ONNX_LOWERING``.

:mod:`flora_graph.runtimes.onnx_lowering` imports it at its end, so the table is complete
whichever module is imported first. A named dim in an attribute becomes an int64 value
computed in the graph: ``Shape(input, start=i, end=i + 1)`` of a graph input that carries
it (made once per name and shared), products multiplied, and the pieces ``Concat``-ed into
the shape/starts/ends input of the ONNX op. ``Reshape`` is lowered here as well, since its
target may name dims now. Attention and RMSNorm are decomposed into standard ONNX ops
(opset 23's ``RMSNormalization`` is used from opset 23 on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, numpy_helper

from flora_graph.errors import GraphError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op
from flora_graph.ir.shapes import Dim, canonical_dim
from flora_graph.runtimes.onnx_lowering import ONNX_DTYPES, ONNX_LOWERING, Lowering, LoweringContext, _simple

__all__ = ["TRANSFORMER_LOWERING", "dim_tensor", "dims_tensor"]


# --------------------------------------------------------------------------- named dims as values
def _int64(ctx: LoweringContext, values: Sequence[int], hint: str) -> str:
    return ctx.constant(np.array(values, dtype=np.int64), hint)


def dim_tensor(ctx: LoweringContext, dim: Dim, node: ComputationNode) -> str:
    """An int64 ``[1]`` value holding ``dim``: a constant, or read off the graph input carrying it (made once)."""
    if isinstance(dim, int):
        return _int64(ctx, [dim], f"{node.name}/dim")
    dim = canonical_dim(dim)

    def make() -> str:
        for inp in ctx.graph.inputs:
            for i, d in enumerate(inp.shape):
                if isinstance(d, str) and canonical_dim(d) == dim:
                    return ctx.emit("Shape", [ctx.names[inp]], start=i, end=i + 1)
        parts = str(dim).split("*")
        if len(parts) == 1:
            raise GraphError(f"node {node.name!r} ({node.op.value}): dim {dim!r} is not carried by any graph input")
        value = dim_tensor(ctx, parts[0] if not parts[0].isdigit() else int(parts[0]), node)
        for p in parts[1:]:
            value = ctx.emit("Mul", [value, dim_tensor(ctx, p, node)])
        return value

    return ctx.once(("dim", dim), make)


def dims_tensor(ctx: LoweringContext, dims: Sequence[Dim], node: ComputationNode, hint: str) -> str:
    """An int64 ``[len(dims)]`` value: one constant when every dim is static, else a ``Concat``."""
    if all(isinstance(d, int) for d in dims):
        return _int64(ctx, [int(d) for d in dims], f"{node.name}/{hint}")  # type: ignore[arg-type]
    return ctx.emit("Concat", [dim_tensor(ctx, d, node) for d in dims], axis=0)


def _scalar_dim(ctx: LoweringContext, dim: Dim, node: ComputationNode, dtype: str) -> str:
    """A rank-0 value of ``dtype`` holding ``dim`` (for ``Range``)."""
    if isinstance(dim, int):
        return ctx.constant(np.array(dim, dtype=dtype), f"{node.name}/{dim}")
    value = ctx.emit("Squeeze", [dim_tensor(ctx, dim, node), _int64(ctx, [0], f"{node.name}/axes")])
    return value if dtype == "int64" else ctx.emit("Cast", [value], to=ONNX_DTYPES[dtype])


# --------------------------------------------------------------------------- lowerings
def _reshape(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``Reshape`` (0 copies a dim, -1 infers one); a named target dim is read off a graph input."""
    ctx.emit("Reshape", [ctx.arg(node, 0), dims_tensor(ctx, node.attrs["shape"], node, "shape")], [out])


def _index(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``GatherND`` over the indices broadcast to one shape and stacked on a last axis; axes before
    ``axis`` are moved behind the indexed ones first and back after."""
    x, k = node.inputs[0], len(node.inputs) - 1
    rank, axis = len(x.shape), node.attrs["axis"] % len(x.shape)
    bshape = node.shape[axis : len(node.shape) - (rank - axis - k)]
    target = dims_tensor(ctx, bshape, node, "broadcast")
    last = _int64(ctx, [-1], f"{node.name}/axes")
    stacked = [ctx.emit("Unsqueeze", [ctx.emit("Expand", [ctx.arg(node, i), target]), last]) for i in range(1, k + 1)]
    if any(i.dtype != "int64" for i in node.inputs[1:]):
        stacked = [ctx.emit("Cast", [s], to=TensorProto.INT64) for s in stacked]
    idx = ctx.emit("Concat", stacked, axis=-1) if k > 1 else stacked[0]
    data = ctx.arg(node, 0)
    if axis == 0:
        ctx.emit("GatherND", [data, idx], [out])
        return
    perm = [*range(axis, axis + k), *range(axis), *range(axis + k, rank)]
    picked = ctx.emit("GatherND", [ctx.emit("Transpose", [data], perm=perm), idx])  # B + x[:axis] + x[axis+k:]
    nb = len(bshape)
    ctx.emit("Transpose", [picked], [out], perm=[*range(nb, nb + axis), *range(nb), *range(nb + axis, nb + rank - k)])


def _slice(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    a = node.attrs
    steps = a["steps"] or (1,) * len(a["axes"])
    ctx.emit("Slice", [ctx.arg(node, 0), dims_tensor(ctx, a["starts"], node, "starts"),
                       dims_tensor(ctx, a["ends"], node, "ends"), _int64(ctx, a["axes"], f"{node.name}/axes"),
                       _int64(ctx, steps, f"{node.name}/steps")], [out])


def _axes_input(op_type: str) -> Lowering:
    def lower(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
        ctx.emit(op_type, [ctx.arg(node, 0), _int64(ctx, node.attrs["axes"], f"{node.name}/axes")], [out])

    lower.__doc__ = f"``{op_type}`` with its axes as an int64 input."
    return lower


def _expand(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    ctx.emit("Expand", [ctx.arg(node, 0), dims_tensor(ctx, node.attrs["shape"], node, "shape")], [out])


def _rsqrt(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.arg(node, 0)])], [out])


def _cast(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``Cast`` to the compute dtype (float32 for a widened 16-bit target; the caller casts on)."""
    ctx.emit("Cast", [ctx.arg(node, 0)], [out], to=ONNX_DTYPES[ctx.dtype])


def _reduce(op_type: str) -> Lowering:
    def lower(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
        axes = node.attrs["axes"]
        extra = [_int64(ctx, axes, f"{node.name}/axes")] if axes else []
        ctx.emit(op_type, [ctx.arg(node, 0), *extra], [out], keepdims=node.attrs["keepdims"])

    lower.__doc__ = f"``{op_type}`` with its axes as an input (none: every axis)."
    return lower


def _cumsum(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    axis = ctx.constant(np.array(node.attrs["axis"], dtype=np.int64), f"{node.name}/axis")
    ctx.emit("CumSum", [ctx.arg(node, 0), axis], [out])


def _rms_norm(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``RMSNormalization`` from opset 23; before it ``x / Sqrt(ReduceMean(Pow(x, 2)) + eps) * scale``.

    That exact form (``Pow`` by 2, not ``Mul(x, x)``; ``Div``, not ``Reciprocal`` + ``Mul``) is the
    one ONNX Runtime's graph optimizer fuses into a single ``SimplifiedLayerNormalization``.
    """
    rank = len(node.inputs[0].shape)
    axis, eps = node.attrs["axis"] % rank, node.attrs["epsilon"]
    args = ctx.args(node)
    if ctx.opset >= 23 and len(args) == 2:
        stash = TensorProto.DOUBLE if ctx.dtype == "float64" else TensorProto.FLOAT
        ctx.emit("RMSNormalization", args, [out], axis=axis, epsilon=eps, stash_type=stash)
        return
    x = args[0]
    ms = ctx.emit("ReduceMean", [ctx.emit("Pow", [x, ctx.scalar(2.0)]), _int64(ctx, range(axis, rank), f"{node.name}/axes")], keepdims=1)
    y = ctx.emit("Div", [x, ctx.emit("Sqrt", [ctx.emit("Add", [ms, ctx.scalar(eps)])])], None if len(args) == 2 else [out])
    if len(args) == 2:
        ctx.emit("Mul", [y, args[1]], [out])


def _sdpa(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``Softmax(q @ k^T * scale + bias) @ v``, the mask as an additive bias (0 kept, -inf dropped).

    The bias is made once per mask and shared by every attention reading it: a boolean mask
    becomes ``Where(mask, 0, -inf)``, the causal one (keep ``j <= i``) ``Trilu(-inf, k=1)`` of the
    ``[L, S]`` scores. Each attention then adds it (cheaper than a ``Where`` per layer, and the
    form torch.onnx exports). With a mask input, a row in which nothing is kept comes out of
    ``Softmax`` as NaN and is set to 0 as torch does.
    """
    q, k, v = (ctx.arg(node, i) for i in range(3))
    rank_k = len(node.inputs[1].shape)
    perm = [*range(rank_k - 2), rank_k - 1, rank_k - 2]
    scale = node.attrs["scale"] or 1.0 / math.sqrt(int(node.inputs[0].shape[-1]))
    s = ctx.emit("Mul", [ctx.emit("MatMul", [q, ctx.emit("Transpose", [k], perm=perm)]), ctx.scalar(scale)])
    if node.attrs["is_causal"]:
        s = ctx.emit("Add", [s, _causal_bias(ctx, node, s)])
    elif len(node.inputs) == 4:
        mask = ctx.arg(node, 3)
        if node.inputs[3].dtype == "bool":
            mask = ctx.once(("mask-bias", mask, ctx.dtype),
                            lambda: ctx.emit("Where", [mask, ctx.scalar(0.0), ctx.scalar(-math.inf)]))
        s = ctx.emit("Add", [s, mask])
    p = ctx.emit("Softmax", [s], axis=-1)
    if len(node.inputs) == 4:
        p = ctx.emit("Where", [ctx.emit("IsNaN", [p]), ctx.scalar(0.0), p])
    ctx.emit("MatMul", [p, v], [out])


def _causal_bias(ctx: LoweringContext, node: ComputationNode, scores: str) -> str:
    """The ``[L, S]`` causal bias (``-inf`` where ``j > i``, else 0) of ``node``'s scores, shared by the
    attentions with the same ``L`` and ``S`` dims."""
    dims = (canonical_dim(node.inputs[0].shape[-2]), canonical_dim(node.inputs[1].shape[-2]))

    def make() -> str:
        minus_inf = np.array([-math.inf], dtype=ctx.dtype)
        full = ctx.emit("ConstantOfShape", [ctx.emit("Shape", [scores], start=-2)],
                        value=numpy_helper.from_array(minus_inf))
        return ctx.emit("Trilu", [full, ctx.constant(np.array(1, dtype=np.int64), f"{node.name}/1")], upper=1)

    return ctx.once(("causal-bias", *dims, ctx.dtype), make)


def _arange(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    dtype = ctx.dtype
    bounds = [_scalar_dim(ctx, node.attrs[k], node, dtype) for k in ("start", "end", "step")]
    ctx.emit("Range", bounds, [out])


TRANSFORMER_LOWERING: dict[Op, Lowering] = {
    Op.RESHAPE: _reshape,
    Op.GATHER: _simple("Gather", axis="axis"),
    Op.GATHER_ELEMENTS: _simple("GatherElements", axis="axis"),
    Op.INDEX: _index,
    Op.SLICE: _slice,
    Op.UNSQUEEZE: _axes_input("Unsqueeze"),
    Op.SQUEEZE: _axes_input("Squeeze"),
    Op.EXPAND: _expand,
    Op.EXP: _simple("Exp"),
    Op.LOG: _simple("Log"),
    Op.SQRT: _simple("Sqrt"),
    Op.RSQRT: _rsqrt,
    Op.RECIPROCAL: _simple("Reciprocal"),
    Op.COS: _simple("Cos"),
    Op.SIN: _simple("Sin"),
    Op.ABS: _simple("Abs"),
    Op.POW: _simple("Pow"),
    Op.EQUAL: _simple("Equal"),
    Op.LESS: _simple("Less"),
    Op.LESS_OR_EQUAL: _simple("LessOrEqual"),
    Op.GREATER: _simple("Greater"),
    Op.GREATER_OR_EQUAL: _simple("GreaterOrEqual"),
    Op.NOT: _simple("Not"),
    Op.AND: _simple("And"),
    Op.OR: _simple("Or"),
    Op.WHERE: _simple("Where"),
    Op.CAST: _cast,
    Op.REDUCE_MEAN: _reduce("ReduceMean"),
    Op.REDUCE_SUM: _reduce("ReduceSum"),
    Op.CUMSUM: _cumsum,
    Op.RMS_NORM: _rms_norm,
    Op.SDPA: _sdpa,
    Op.ARANGE: _arange,
}

ONNX_LOWERING.update(TRANSFORMER_LOWERING)
