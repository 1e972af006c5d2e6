"""Attention: ``ScaledDotProductAttention`` and ``RotaryEmbedding``.

Declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule, numpy
semantics, ONNX rule and torch rule side by side. The numpy rule computes in float64; the
ONNX rule decomposes into standard ops (``MatMul``, ``Softmax``, an additive bias for the
mask, the causal bias shared between attentions); the torch rule is
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import broadcast_shapes, canonical_dim, dims_equal, format_shape
from flora_graph.ops._infer import same_dtype
from flora_graph.ops._onnx import tensor_attr
from flora_graph.ops._torch import float_literal
from flora_graph.ops.registry import define

__all__: list[str] = []


def _infer_sdpa(shapes, dtypes, attrs):
    """``q [.., L, E]``, ``k [.., S, E]``, ``v [.., S, Ev]``, optional mask broadcasting to ``[.., L, S]``."""
    q, k, v = shapes[:3]
    if len(q) < 2 or len(k) < 2 or len(v) < 2:
        raise ShapeError("attention: q, k and v need rank >= 2")
    if not isinstance(q[-1], int):
        raise ShapeError(f"attention: the head size of q {format_shape(q)} must be static")
    if not dims_equal(q[-1], k[-1]):
        raise ShapeError(f"attention: q {format_shape(q)} and k {format_shape(k)} head sizes differ")
    if not dims_equal(k[-2], v[-2]):
        raise ShapeError(f"attention: k {format_shape(k)} and v {format_shape(v)} lengths differ")
    if attrs["is_causal"] not in (0, 1):
        raise ShapeError(f"attention: is_causal must be 0 or 1, got {attrs['is_causal']}")
    if attrs["scale"] < 0:
        raise ShapeError(f"attention: scale must be >= 0 (0: 1/sqrt(E)), got {attrs['scale']}")
    dtype = same_dtype(dtypes[:3], "attention q/k/v")
    batch = broadcast_shapes(q[:-2], k[:-2], v[:-2])
    if len(shapes) == 4:
        if attrs["is_causal"]:
            raise ShapeError("attention: is_causal and a mask cannot be combined (as in torch)")
        if dtypes[3] not in ("bool", dtype):
            raise ShapeError(f"attention: the mask must be bool or {dtype}, got {dtypes[3]}")
        full = (*batch, q[-2], k[-2])
        if broadcast_shapes(shapes[3], full) != tuple(canonical_dim(d) for d in full):
            raise ShapeError(f"attention: mask {format_shape(shapes[3])} does not broadcast to {format_shape(full)}")
    return (*batch, q[-2], v[-1]), dtype


def _numpy_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None, *,
                is_causal: int, scale: float) -> np.ndarray:
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * scale
    if mask is not None and mask.dtype != np.bool_:
        s = s + mask
    keep = None if mask is None or mask.dtype != np.bool_ else mask
    if is_causal:
        lq, lk = s.shape[-2:]
        keep = np.arange(lk)[None, :] <= np.arange(lq)[:, None]  # top-left aligned, as torch
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - np.where(np.isneginf(top), 0.0, top))  # a row with nothing kept is all 0
    total = e.sum(axis=-1, keepdims=True)
    p = e / np.where(total == 0, 1.0, total)
    return np.matmul(p, v.astype(np.float64))


def _onnx_sdpa(ctx: Any, node: ComputationNode, out: str) -> None:
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


def _causal_bias(ctx: Any, node: ComputationNode, scores: str) -> str:
    """The ``[L, S]`` causal bias (``-inf`` where ``j > i``, else 0) of ``node``'s scores, shared by the
    attentions with the same ``L`` and ``S`` dims."""
    dims = (canonical_dim(node.inputs[0].shape[-2]), canonical_dim(node.inputs[1].shape[-2]))

    def make() -> str:
        minus_inf = np.array([-math.inf], dtype=ctx.dtype)
        full = ctx.emit("ConstantOfShape", [ctx.emit("Shape", [scores], start=-2)], value=tensor_attr(minus_inf))
        return ctx.emit("Trilu", [full, ctx.constant(np.array(1, dtype=np.int64), f"{node.name}/1")], upper=1)

    return ctx.once(("causal-bias", *dims, ctx.dtype), make)


def _torch_sdpa(node: ComputationNode, args: list[str]) -> str:
    mask = args[3] if len(args) == 4 else "None"
    scale = float_literal(node.attrs["scale"], node) if node.attrs["scale"] else "None"
    causal = bool(node.attrs["is_causal"])
    return (f"F.scaled_dot_product_attention({args[0]}, {args[1]}, {args[2]}, attn_mask={mask}, dropout_p=0.0, "
            f"is_causal={causal}, scale={scale})")


define(
    "SDPA", "ScaledDotProductAttention", (3, 4), {"is_causal": AttrSpec("int", 0), "scale": AttrSpec("float", 0.0)},
    infer=_infer_sdpa,
    doc="softmax(q @ k^T * scale + mask) @ v; scale 0 is 1/sqrt(E); a bool mask keeps True, a float mask adds; "
        "is_causal keeps j <= i (top-left); a row with nothing kept is 0 (as torch).",
    numpy=_numpy_sdpa, onnx=_onnx_sdpa, torch=_torch_sdpa,
)


# --------------------------------------------------------------------------- RotaryEmbedding
def _infer_rotary(shapes, dtypes, attrs):
    """``x [.., d]`` (``d`` static and even), ``cos``/``sin`` ``[.., d/2]`` broadcasting to ``x[..., :d/2]``."""
    x, cos, sin = shapes
    if len(x) < 2 or not isinstance(x[-1], int) or x[-1] % 2:
        raise ShapeError(f"RotaryEmbedding: x {format_shape(x)} needs a static, even last dim")
    half = (*x[:-1], x[-1] // 2)
    for what, c in (("cos", cos), ("sin", sin)):
        if not c or c[-1] != x[-1] // 2 or broadcast_shapes(c, half) != tuple(canonical_dim(d) for d in half):
            raise ShapeError(f"RotaryEmbedding: {what} {format_shape(c)} does not broadcast to {format_shape(half)}")
    return tuple(x), same_dtype(dtypes, "RotaryEmbedding x/cos/sin")


def _numpy_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].astype(np.float64), x[..., h:].astype(np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _onnx_rotary(ctx: Any, node: ComputationNode, out: str) -> None:
    """ONNX ``RotaryEmbedding`` (opset 23) for ``x [b, h, s, d]`` with ``cos``/``sin`` ``[b, 1, s, d/2]``
    (their head axis squeezed once and shared); otherwise the halves rotated with ``Split``/``Concat``."""
    x, cos, sin = node.inputs
    if ctx.opset >= 23 and len(x.shape) == 4 and all(len(c.shape) == 4 and c.shape[1] == 1 and
                                                      canonical_dim(c.shape[0]) == canonical_dim(x.shape[0]) and
                                                      canonical_dim(c.shape[2]) == canonical_dim(x.shape[2])
                                                      for c in (cos, sin)):
        def squeezed(i: int) -> str:
            arg = ctx.arg(node, i)
            return ctx.once(("rotary-cache", arg), lambda: ctx.emit(
                "Squeeze", [arg, ctx.constant(np.array([1], dtype=np.int64), f"{node.name}/axis1")]))

        ctx.emit("RotaryEmbedding", [ctx.arg(node, 0), squeezed(1), squeezed(2)], [out])
        return
    half = int(x.shape[-1]) // 2
    split = ctx.constant(np.array([half, half], dtype=np.int64), f"{node.name}/halves")
    x1, x2 = ctx.fresh(f"{node.name}/x1"), ctx.fresh(f"{node.name}/x2")
    ctx.emit("Split", [ctx.arg(node, 0), split], [x1, x2], axis=-1)
    c, s = ctx.arg(node, 1), ctx.arg(node, 2)
    first = ctx.emit("Sub", [ctx.emit("Mul", [x1, c]), ctx.emit("Mul", [x2, s])])
    second = ctx.emit("Add", [ctx.emit("Mul", [x2, c]), ctx.emit("Mul", [x1, s])])
    ctx.emit("Concat", [first, second], [out], axis=-1)


def _torch_rotary(node: ComputationNode, args: list[str]) -> str:
    x, c, s = args
    h = int(node.inputs[0].shape[-1]) // 2
    return (f"torch.cat([{x}[..., :{h}] * {c} - {x}[..., {h}:] * {s}, "
            f"{x}[..., {h}:] * {c} + {x}[..., :{h}] * {s}], dim=-1)")


define(
    "ROTARY_EMBEDDING", "RotaryEmbedding", (3, 3),
    infer=_infer_rotary,
    doc="Rotary position embedding, halves not interleaved: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], "
        "cos/sin of half the last dim (ONNX RotaryEmbedding from opset 23).",
    numpy=_numpy_rotary, onnx=_onnx_rotary, torch=_torch_rotary,
)
