"""Normalisation: ``Softmax``, ``LayerNorm``, ``RMSNorm``, ``LogSoftmax``, ``BatchNorm``, ``GroupNorm``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. The numpy rules compute their
statistics in float64 (the caller rounds the result to the node's dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora_graph.errors import ShapeError, UnsupportedOpError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import canonical_dim, format_shape, is_static, normalize_axis
from flora_graph.ops._infer import same_dtype, same_float_dtype
from flora_graph.ops._onnx import STASH_DOUBLE, STASH_FLOAT, int64, simple, tensor_attr
from flora_graph.ops._torch import float_literal, ints
from flora_graph.ops.registry import define

__all__ = ["check_norm_params"]


def check_norm_params(shapes, attrs, what: str) -> None:
    """A normalisation over dims ``axis``..end of ``shapes[0]``: each of ``shapes[1:]`` (scale,
    bias) has exactly those dims, or ``ShapeError`` names ``what`` (e.g. ``"RMSNorm: scale"``)."""
    x = shapes[0]
    norm = tuple(canonical_dim(d) for d in x[normalize_axis(attrs["axis"], len(x)):])
    for extra in shapes[1:]:
        if tuple(canonical_dim(d) for d in extra) != norm:
            raise ShapeError(f"{what} {format_shape(extra)} != normalized shape {format_shape(norm)}")


# --------------------------------------------------------------------------- Softmax
def _infer_softmax(shapes, dtypes, attrs):
    normalize_axis(attrs["axis"], len(shapes[0]))
    return tuple(shapes[0]), dtypes[0]


def _shifted(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` in float64 minus its maximum along ``axis`` (so ``exp`` of it never overflows)."""
    x64 = x.astype(np.float64)
    return x64 - np.max(x64, axis=axis, keepdims=True, initial=-np.inf)


def _numpy_softmax(x: np.ndarray, *, axis: int) -> np.ndarray:
    e = np.exp(_shifted(x, axis))
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def _torch_softmax(node: ComputationNode, args: list[str]) -> str:
    return f"torch.softmax({args[0]}, {int(node.attrs['axis'])})"


define(
    "SOFTMAX", "Softmax", (1, 1), {"axis": AttrSpec("int", -1)},
    infer=_infer_softmax, doc="softmax along axis.",
    numpy=_numpy_softmax, onnx=simple("Softmax", axis="axis"), torch=_torch_softmax,
)


# --------------------------------------------------------------------------- LayerNorm
def _infer_layer_norm(shapes, dtypes, attrs):
    check_norm_params(shapes, attrs, "LayerNorm: scale/bias")
    return tuple(shapes[0]), same_float_dtype(dtypes)


def _numpy_layer_norm(
    x: np.ndarray, scale: np.ndarray | None = None, bias: np.ndarray | None = None, *, axis: int, epsilon: float
) -> np.ndarray:
    axes = tuple(range(axis % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = np.square(x64 - mean).mean(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def _onnx_layer_norm(ctx: Any, node: ComputationNode, out: str) -> None:
    """``LayerNormalization``; a missing scale becomes ones (an initializer, or ``ConstantOfShape`` if dynamic)."""
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    args = ctx.args(node)
    if len(args) == 1:
        norm = x.shape[axis:]
        if is_static(norm):
            args.append(ctx.constant(np.ones([int(d) for d in norm], dtype=ctx.dtype), f"{out}/ones"))
        else:
            shape = ctx.emit("Shape", [args[0]], start=axis)
            one = tensor_attr(np.ones(1, dtype=ctx.dtype))
            args.append(ctx.emit("ConstantOfShape", [shape], value=one))
    stash = STASH_DOUBLE if ctx.dtype == "float64" else STASH_FLOAT
    ctx.emit("LayerNormalization", args, [out], axis=axis, epsilon=node.attrs["epsilon"], stash_type=stash)


def _torch_layer_norm(node: ComputationNode, args: list[str]) -> str:
    shape = node.inputs[0].shape
    axis = node.attrs["axis"] % len(shape)
    norm = shape[axis:]
    if not all(isinstance(d, int) for d in norm):
        raise UnsupportedOpError(
            f"node {node.name!r} (LayerNorm): torch lowering needs static normalized dims, "
            f"got {format_shape(norm)} of input {format_shape(shape)}",
            {node.op.value: [node.name]},
        )
    scale = args[1] if len(args) > 1 else "None"
    bias = args[2] if len(args) > 2 else "None"
    eps = float_literal(node.attrs["epsilon"])
    return f"F.layer_norm({args[0]}, {ints(int(d) for d in norm)}, {scale}, {bias}, {eps})"


define(
    "LAYER_NORM", "LayerNorm", (1, 3), {"axis": AttrSpec("int", -1), "epsilon": AttrSpec("float", 1e-5)},
    infer=_infer_layer_norm, doc="Normalise over dims axis..end, then * scale + bias (ONNX LayerNormalization).",
    numpy=_numpy_layer_norm, onnx=_onnx_layer_norm, torch=_torch_layer_norm,
)


# --------------------------------------------------------------------------- RMSNorm
def _infer_rms_norm(shapes, dtypes, attrs):
    """Normalise over dims ``axis``..end; an optional scale has exactly those dims."""
    check_norm_params(shapes, attrs, "RMSNorm: scale")
    return tuple(shapes[0]), same_dtype(dtypes, "RMSNorm")


def _numpy_rms_norm(x: np.ndarray, scale: np.ndarray | None = None, *, axis: int, epsilon: float) -> np.ndarray:
    axes = tuple(range(axis % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.square(x64).mean(axis=axes, keepdims=True) + epsilon)
    return y if scale is None else y * scale


def _onnx_rms_norm(ctx: Any, node: ComputationNode, out: str) -> None:
    """``RMSNormalization`` from opset 23 (a norm without scale, over static dims, with a scale of
    ones); before it ``x / Sqrt(ReduceMean(Pow(x, 2)) + eps) * scale``.

    That exact form (``Pow`` by 2, not ``Mul(x, x)``; ``Div``, not ``Reciprocal`` + ``Mul``) is the
    one ONNX Runtime's graph optimizer fuses into a single ``SimplifiedLayerNormalization``.
    """
    rank = len(node.inputs[0].shape)
    axis, eps = node.attrs["axis"] % rank, node.attrs["epsilon"]
    args = ctx.args(node)
    normalized = node.inputs[0].shape[axis:]
    if ctx.opset >= 23 and (len(args) == 2 or all(isinstance(d, int) for d in normalized)):
        if len(args) == 1:  # no scale (a scale of ones simplified away): ones, shared by the norms of one shape
            ones = np.ones(tuple(normalized), dtype=ctx.dtype)
            args.append(ctx.once(("rms-ones", tuple(normalized), ctx.dtype), lambda: ctx.constant(ones, "rms_ones")))
        stash = STASH_DOUBLE if ctx.dtype == "float64" else STASH_FLOAT
        ctx.emit("RMSNormalization", args, [out], axis=axis, epsilon=eps, stash_type=stash)
        return
    x = args[0]
    ms = ctx.emit("ReduceMean", [ctx.emit("Pow", [x, ctx.scalar(2.0)]), int64(ctx, range(axis, rank), f"{node.name}/axes")], keepdims=1)
    y = ctx.emit("Div", [x, ctx.emit("Sqrt", [ctx.emit("Add", [ms, ctx.scalar(eps)])])], None if len(args) == 2 else [out])
    if len(args) == 2:
        ctx.emit("Mul", [y, args[1]], [out])


def _torch_rms_norm(node: ComputationNode, args: list[str]) -> str:
    x, shape = args[0], node.inputs[0].shape
    axis = node.attrs["axis"] % len(shape)
    eps = float_literal(node.attrs["epsilon"])
    scale = args[1] if len(args) > 1 else "None"
    if all(isinstance(d, int) for d in shape[axis:]):
        return f"torch.rms_norm({x}, {ints(shape[axis:])}, {scale}, {eps})"
    y = f"{x} * torch.rsqrt(torch.mean({x} * {x}, {ints(range(axis, len(shape)))}, True) + {eps})"
    return y if len(args) == 1 else f"{y} * {args[1]}"


define(
    "RMS_NORM", "RMSNorm", (1, 2), {"axis": AttrSpec("int", -1), "epsilon": AttrSpec("float", 1e-6)},
    infer=_infer_rms_norm, doc="x / sqrt(mean(x**2 over dims axis..end) + epsilon) * scale (ONNX RMSNormalization).",
    numpy=_numpy_rms_norm, onnx=_onnx_rms_norm, torch=_torch_rms_norm,
)


# --------------------------------------------------------------------------- LogSoftmax
def _numpy_log_softmax(x: np.ndarray, *, axis: int) -> np.ndarray:
    shifted = _shifted(x, axis)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _torch_log_softmax(node: ComputationNode, args: list[str]) -> str:
    return f"torch.log_softmax({args[0]}, {int(node.attrs['axis'])})"


define(
    "LOG_SOFTMAX", "LogSoftmax", (1, 1), {"axis": AttrSpec("int", -1)},
    infer=_infer_softmax, doc="log(softmax(x)) along axis (ONNX LogSoftmax).",
    numpy=_numpy_log_softmax, onnx=simple("LogSoftmax", axis="axis"), torch=_torch_log_softmax,
)


# --------------------------------------------------------------------------- BatchNorm
def _infer_batch_norm(shapes, dtypes, attrs):
    x = shapes[0]
    if len(x) < 2:
        raise ShapeError(f"BatchNorm needs x [N, C, ...], got {format_shape(x)}")
    for what, s in zip(("scale", "bias", "mean", "var"), shapes[1:], strict=True):
        if len(s) != 1 or canonical_dim(s[0]) != canonical_dim(x[1]):
            raise ShapeError(f"BatchNorm: {what} {format_shape(s)} does not match {x[1]} channels")
    return tuple(x), same_float_dtype(dtypes)


def _numpy_batch_norm(x, scale, bias, mean, var, *, epsilon: float) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt(var.astype(np.float64) + epsilon)
    return (x64 - mean.reshape(shape)) * inv.reshape(shape) * scale.reshape(shape) + bias.reshape(shape)


def _torch_batch_norm(node: ComputationNode, args: list[str]) -> str:
    x, scale, bias, mean, var = args
    eps = float_literal(node.attrs["epsilon"])
    return f"F.batch_norm({x}, {mean}, {var}, {scale}, {bias}, False, 0.0, {eps})"


define(
    "BATCH_NORM", "BatchNorm", (5, 5), {"epsilon": AttrSpec("float", 1e-5)},
    infer=_infer_batch_norm,
    doc="Inference batch norm over axis 1: (x - mean) / sqrt(var + epsilon) * scale + bias (ONNX BatchNormalization).",
    numpy=_numpy_batch_norm, onnx=simple("BatchNormalization", epsilon="epsilon"), torch=_torch_batch_norm,
)


# --------------------------------------------------------------------------- GroupNorm
def _infer_group_norm(shapes, dtypes, attrs):
    x, g = shapes[0], attrs["groups"]
    if len(x) < 2 or not isinstance(x[1], int) or g < 1 or x[1] % g:
        raise ShapeError(f"GroupNorm needs x [N, C, ...] with static C divisible by groups={g}, got {format_shape(x)}")
    for what, s in zip(("scale", "bias"), shapes[1:], strict=False):
        if len(s) != 1 or canonical_dim(s[0]) != x[1]:
            raise ShapeError(f"GroupNorm: {what} {format_shape(s)} does not match {x[1]} channels")
    return tuple(x), same_float_dtype(dtypes)


def _numpy_group_norm(x, scale=None, bias=None, *, groups: int, epsilon: float) -> np.ndarray:
    x64 = x.astype(np.float64).reshape(x.shape[0], groups, -1)
    mean = x64.mean(axis=2, keepdims=True)
    var = np.square(x64 - mean).mean(axis=2, keepdims=True)
    y = ((x64 - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if scale is not None:
        y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _onnx_group_norm(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Reshape`` to ``[N, groups, -1]``, ``InstanceNormalization`` (unit scale, zero bias), ``Reshape``
    back, then ``* scale + bias`` per channel."""
    x, g, rank = node.inputs[0], node.attrs["groups"], len(node.inputs[0].shape)
    args = ctx.args(node)
    grouped = ctx.emit("Reshape", [args[0], int64(ctx, [0, g, -1], f"{node.name}/groups")])
    ones = ctx.constant(np.ones(g, dtype=ctx.dtype), f"{node.name}/ones")
    zeros = ctx.constant(np.zeros(g, dtype=ctx.dtype), f"{node.name}/zeros")
    normed = ctx.emit("InstanceNormalization", [grouped, ones, zeros], epsilon=node.attrs["epsilon"])
    affine = args[1:]
    y = ctx.emit("Reshape", [normed, ctx.emit("Shape", [args[0]])], None if affine else [out])
    per_channel = int64(ctx, [x.shape[1]] + [1] * (rank - 2), f"{node.name}/channel")
    for k, a in enumerate(affine):
        y = ctx.emit("Mul" if k == 0 else "Add", [y, ctx.emit("Reshape", [a, per_channel])],
                     [out] if k == len(affine) - 1 else None)


def _torch_group_norm(node: ComputationNode, args: list[str]) -> str:
    scale = args[1] if len(args) > 1 else "None"
    bias = args[2] if len(args) > 2 else "None"
    eps = float_literal(node.attrs["epsilon"])
    return f"F.group_norm({args[0]}, {int(node.attrs['groups'])}, {scale}, {bias}, {eps})"


define(
    "GROUP_NORM", "GroupNorm", (1, 3), {"groups": AttrSpec("int", required=True), "epsilon": AttrSpec("float", 1e-5)},
    infer=_infer_group_norm,
    doc="Normalise x [N, C, ...] over each of groups channel groups, then * scale + bias per channel.",
    numpy=_numpy_group_norm, onnx=_onnx_group_norm, torch=_torch_group_norm,
)
