"""Attention: ``ScaledDotProductAttention`` and ``RotaryEmbedding``.

Declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule, numpy
semantics, ONNX rule and torch rule side by side. The numpy rule computes in float64. The
ONNX rule writes rank-4 attention without a float mask as one ONNX ``Attention`` node from
opset 23 (grouped-query heads included: ONNX Runtime runs it as one kernel, a row with nothing
kept coming out 0 as in torch); otherwise it decomposes into standard ops (``MatMul``,
``Softmax``, an additive bias for the mask, the causal bias shared between attentions), grouped
query heads broadcasting over ``[.., kv, 1, S, E]`` keys (a mask per query head split to match). The torch rule is
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import broadcast_shapes, canonical_dim, canonical_shape, dims_equal, format_shape
from flora_graph.ops._infer import same_dtype
from flora_graph.ops._onnx import tensor_attr
from flora_graph.ops._torch import float_literal
from flora_graph.ops.registry import define

__all__: list[str] = []


def gqa_group(q, k, v) -> int:
    """The query heads per key/value head of grouped-query attention on shapes ``q``, ``k``, ``v``
    (heads on axis -3); ``ShapeError`` when they are not of one rank >= 3 with static query heads a
    multiple of the key/value heads."""
    if len(q) < 3 or len(k) != len(q) or len(v) != len(q):
        raise ShapeError(f"attention: enable_gqa needs q, k and v of one rank >= 3, got {format_shape(q)}, "
                         f"{format_shape(k)}, {format_shape(v)}")
    hq, hk = q[-3], k[-3]
    if not isinstance(hq, int) or not isinstance(hk, int) or hk < 1 or hq % hk or not dims_equal(hk, v[-3]):
        raise ShapeError(f"attention: enable_gqa needs static query heads {hq!r} a multiple of the key/value heads "
                         f"{hk!r} (k {format_shape(k)}, v {format_shape(v)})")
    return hq // hk


def _infer_sdpa(shapes, dtypes, attrs):
    """``q [.., L, E]``, ``k [.., S, E]``, ``v [.., S, Ev]``, optional mask broadcasting to ``[.., L, S]``;
    with ``enable_gqa`` the heads (axis -3) of ``k``/``v`` divide those of ``q``."""
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
    if attrs["enable_gqa"] not in (0, 1):
        raise ShapeError(f"attention: enable_gqa must be 0 or 1, got {attrs['enable_gqa']}")
    if attrs["scale"] < 0:
        raise ShapeError(f"attention: scale must be >= 0 (0: 1/sqrt(E)), got {attrs['scale']}")
    if attrs["softcap"] < 0:
        raise ShapeError(f"attention: softcap must be >= 0 (0: none), got {attrs['softcap']}")
    dtype = same_dtype(dtypes[:3], "attention q/k/v")
    if attrs["enable_gqa"]:
        gqa_group(q, k, v)
        batch = (*broadcast_shapes(q[:-3], k[:-3], v[:-3]), q[-3])
    else:
        batch = broadcast_shapes(q[:-2], k[:-2], v[:-2])
    if len(shapes) == 5:  # sinks: one logit per query head, a key that every query sees and that reads no value
        heads = q[-3] if len(q) >= 3 else None
        if dtypes[4] != dtype or len(shapes[4]) != 1 or not isinstance(heads, int) or not dims_equal(shapes[4][0], heads):
            raise ShapeError(f"attention: sinks {format_shape(shapes[4])} {dtypes[4]} are not one {dtype} per query "
                             f"head of q {format_shape(q)}")
    if len(shapes) >= 4:
        if attrs["is_causal"]:
            raise ShapeError("attention: is_causal and a mask cannot be combined (as in torch)")
        if dtypes[3] not in ("bool", dtype):
            raise ShapeError(f"attention: the mask must be bool or {dtype}, got {dtypes[3]}")
        full = (*batch, q[-2], k[-2])
        if broadcast_shapes(shapes[3], full) != tuple(canonical_dim(d) for d in full):
            raise ShapeError(f"attention: mask {format_shape(shapes[3])} does not broadcast to {format_shape(full)}")
    return (*batch, q[-2], v[-1]), dtype


def numpy_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
               sinks: np.ndarray | None = None, *, is_causal: int, scale: float, enable_gqa: int,
               softcap: float = 0.0) -> np.ndarray:
    """``ScaledDotProductAttention`` in float64 (the numpy rule; ``KVCacheAttention`` reuses it)."""
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    if enable_gqa:  # query head i reads key/value head i // g, as torch
        g = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * scale
    if softcap:  # before the mask, so that a masked score stays -inf (as Gemma 2 and ONNX Attention do)
        s = softcap * np.tanh(s / softcap)
    if mask is not None and mask.dtype != np.bool_:
        s = s + mask
    keep = None if mask is None or mask.dtype != np.bool_ else mask
    if is_causal:
        lq, lk = s.shape[-2:]
        keep = np.arange(lk)[None, :] <= np.arange(lq)[:, None]  # top-left aligned, as torch
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    sink = None if sinks is None else sinks.astype(np.float64).reshape(-1, 1, 1)  # [heads, 1, 1]
    if sink is not None:
        top = np.maximum(top, sink)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - np.where(np.isneginf(top), 0.0, top))  # a row with nothing kept is all 0
    total = e.sum(axis=-1, keepdims=True)
    if sink is not None:  # the sink's share of the softmax goes to no value
        total = total + np.exp(sink - top)
    p = e / np.where(total == 0, 1.0, total)
    return np.matmul(p, v.astype(np.float64))


def _onnx_sdpa(ctx: Any, node: ComputationNode, out: str) -> None:
    """ONNX ``Attention`` (opset >= 23, rank 4, no float mask), else the decomposition."""
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) >= 4 else None
    if ctx.opset >= 23 and _onnx_attention_fits(node):
        attrs = {"is_causal": node.attrs["is_causal"]}
        for key in ("scale", "softcap"):
            if node.attrs[key]:
                attrs[key] = node.attrs[key]
        ctx.emit("Attention", [ctx.arg(node, i) for i in range(len(node.inputs))], [out], **attrs)
        return
    scale = node.attrs["scale"] or 1.0 / math.sqrt(int(q.shape[-1]))
    common = {"scale": scale, "bool_mask": mask is not None and mask.dtype == "bool", "causal": bool(node.attrs["is_causal"]),
              "softcap": node.attrs["softcap"], "sinks": ctx.arg(node, 4) if len(node.inputs) == 5 else None}
    args = [ctx.arg(node, i) for i in range(3)]
    mask_arg = None if mask is None else ctx.arg(node, 3)
    if not node.attrs["enable_gqa"] or q.shape[-3] == k.shape[-3]:
        onnx_attention_decomposed(ctx, node, *args, out, rank=len(k.shape), mask=mask_arg, **common)
        return
    onnx_grouped_attention(ctx, node, *args, out, rank=len(q.shape), heads=int(q.shape[-3]), kv_heads=int(k.shape[-3]),
                           head_size=int(q.shape[-1]), value_size=int(v.shape[-1]), mask=mask_arg,
                           mask_shape=None if mask is None else mask.shape, **common)


def onnx_grouped_attention(ctx: Any, node: ComputationNode, q: str, k: str, v: str, out: str, *, rank: int, heads: int,
                           kv_heads: int, head_size: int, value_size: int, mask: str | None = None,
                           mask_shape: tuple | None = None, **common: Any) -> None:
    """Attention of ``heads`` query heads (axis -3 of the rank-``rank`` ``q``) over ``kv_heads`` key/value
    heads without copying them: ``q`` grouped to ``[.., kv, g, L, E]``, ``k``/``v`` ``[.., kv, 1, S, E]``,
    the mask (of ``mask_shape``) over the grouped scores by :func:`_grouped_mask`; ``common`` as for
    :func:`onnx_attention_decomposed`."""
    g, lead = heads // kv_heads, [0] * (rank - 3)
    if common.get("sinks") is not None:  # one per query head: over the grouped [.., kv, g, L, S] scores
        common["sink_shape"] = (kv_heads, g, 1, 1)
    ints = lambda *xs: ctx.constant(np.array(xs, dtype=np.int64), f"{node.name}/shape")  # noqa: E731
    q5 = ctx.emit("Reshape", [q, ints(*lead, kv_heads, g, -1, head_size)])
    k5, v5 = (ctx.emit("Unsqueeze", [t, ints(rank - 2)]) for t in (k, v))
    grouped = None if mask is None else _grouped_mask(ctx, node, mask, mask_shape, kv_heads, g)
    out5 = ctx.fresh(f"{node.name}.grouped")
    onnx_attention_decomposed(ctx, node, q5, k5, v5, out5, mask=grouped, rank=rank + 1, **common)
    ctx.emit("Reshape", [out5, ints(*lead, heads, -1, value_size)], [out])


def _grouped_mask(ctx: Any, node: ComputationNode, mask: str, shape: tuple, kv: int, g: int) -> str:
    """``mask`` (broadcasting to ``[.., h, L, S]`` scores) over grouped ``[.., kv, g, L, S]`` scores: a head
    axis of ``h = kv * g`` split into ``[kv, g]``, one of 1 given a unit axis before it, a mask of
    rank < 3 as it is; made once per mask."""
    r = len(shape)
    if r < 3:
        return mask

    def make() -> str:
        if shape[-3] == 1:
            return ctx.emit("Unsqueeze", [mask, ctx.constant(np.array([r - 3], np.int64), f"{node.name}/axis")])
        split = ctx.emit("Concat", [ctx.emit("Shape", [mask], end=r - 3),
                                    ctx.constant(np.array([kv, g], np.int64), f"{node.name}/kv_g"),
                                    ctx.emit("Shape", [mask], start=r - 2)], axis=0)
        return ctx.emit("Reshape", [mask, split])

    return ctx.once(("gqa-mask", mask, kv, g), make)


def _onnx_attention_fits(node: ComputationNode) -> bool:
    """Whether ONNX ``Attention`` computes ``node``: rank 4, one batch, key/value heads equal to the
    query heads or (grouped) dividing them, no mask or a boolean one, and no sinks."""
    q, k, v = (canonical_shape(t.shape) for t in node.inputs[:3])
    mask = node.inputs[3] if len(node.inputs) >= 4 else None
    if len(node.inputs) == 5:
        return False
    if len(q) != 4 or len(k) != 4 or len(v) != 4 or not q[0] == k[0] == v[0] or k[1] != v[1]:
        return False
    if q[1] != k[1] and not node.attrs["enable_gqa"]:
        return False
    return mask is None or (mask.dtype == "bool" and len(mask.shape) <= 4)


def onnx_attention_decomposed(ctx: Any, node: ComputationNode, q: str, k: str, v: str, out: str, *, rank: int,
                              scale: float, mask: str | None = None, bool_mask: bool = True,
                              causal: bool = False, softcap: float = 0.0, sinks: str | None = None,
                              sink_shape: tuple[int, ...] | None = None) -> None:
    """``Softmax(q @ k^T * scale + bias) @ v`` over rank-``rank`` ``q``/``k``/``v``, the mask as an
    additive bias (0 kept, -inf dropped); with ``softcap`` the scores are ``softcap * tanh(scores / softcap)``
    before the bias. ``sinks`` (one logit per query head, reshaped to ``sink_shape``, by default
    ``[heads, 1, 1]``) join each row's softmax as one more key that reads no value: the row's scores get a
    last column of its head's sink, which the softmax takes and the product drops.

    The bias is made once per mask and shared by every attention reading it: a boolean mask
    becomes ``Where(mask, 0, -inf)``, the causal one (keep ``j <= i``) ``Trilu(-inf, k=1)`` of the
    ``[L, S]`` scores. Each attention then adds it (cheaper than a ``Where`` per layer, and the
    form torch.onnx exports). With a mask, a row in which nothing is kept comes out of
    ``Softmax`` as NaN and is set to 0 as torch does.
    """
    perm = [*range(rank - 2), rank - 1, rank - 2]
    s = ctx.emit("Mul", [ctx.emit("MatMul", [q, ctx.emit("Transpose", [k], perm=perm)]), ctx.scalar(scale)])
    if softcap:
        s = ctx.emit("Mul", [ctx.emit("Tanh", [ctx.emit("Div", [s, ctx.scalar(softcap)])]), ctx.scalar(softcap)])
    if causal:
        s = ctx.emit("Add", [s, _causal_bias(ctx, node, s)])
    elif mask is not None:
        if bool_mask:
            bool_name = mask
            mask = ctx.once(("mask-bias", bool_name, ctx.dtype),
                            lambda: ctx.emit("Where", [bool_name, ctx.scalar(0.0), ctx.scalar(-math.inf)]))
        s = ctx.emit("Add", [s, mask])
    if sinks is not None:
        shape = sink_shape or (-1, 1, 1)
        column = ctx.emit("Reshape", [sinks, ctx.constant(np.array(shape, np.int64), f"{node.name}/sink_shape")])
        width = ctx.emit("Concat", [ctx.emit("Shape", [s], end=-1), ctx.constant(np.array([1], np.int64), f"{node.name}/1")],
                         axis=0)
        s = ctx.emit("Concat", [s, ctx.emit("Expand", [column, width])], axis=-1)
    p = ctx.emit("Softmax", [s], axis=-1)
    if sinks is not None:  # the sink's column dropped; its share of each row goes to no value
        ints = lambda x: ctx.constant(np.array([x], np.int64), f"{node.name}/slice")  # noqa: E731
        p = ctx.emit("Slice", [p, ints(0), ints(-1), ints(-1)])
    if mask is not None:
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


def torch_spelled_attention(q: str, k: str, v: str, mask: str, *, scale: str, node: ComputationNode,
                            softcap: float = 0.0, sinks: str | None = None, causal: bool = False, group: int = 1) -> str:
    """A torch expression of attention that ``F.scaled_dot_product_attention`` does not compute (a soft cap,
    sinks): ``softmax(cap * tanh(q @ k^T * scale / cap) + mask) @ v``, ``k``/``v`` heads repeated ``group``
    times, a row with nothing kept 0. ``sinks`` (one logit per query head) take their share of each row's
    softmax and give it to no value: ``softmax(s) * sigmoid(logsumexp(s) - sink)``."""
    if group > 1:
        k, v = f"{k}.repeat_interleave({group}, dim=-3)", f"{v}.repeat_interleave({group}, dim=-3)"
    s = f"(({q} @ {k}.transpose(-1, -2)) * {scale})"
    if softcap:
        cap = float_literal(softcap)
        s = f"(torch.tanh({s} / {cap}) * {cap})"
    if causal:
        s = f"{s}.masked_fill(torch.ones({s}.shape[-2:], dtype=torch.bool, device={s}.device).triu(1), float('-inf'))"
    if mask != "None":
        s = f"({s}.masked_fill(~{mask}, float('-inf')) if {mask}.dtype == torch.bool else {s} + {mask})"
    p = f"torch.softmax({s}, dim=-1)"
    if sinks is not None:
        p = f"({p} * torch.sigmoid(torch.logsumexp({s}, dim=-1, keepdim=True) - {sinks}.reshape(-1, 1, 1)))"
    return f"({p}.nan_to_num(0.0) @ {v})"


def _torch_sdpa(node: ComputationNode, args: list[str]) -> str:
    mask = args[3] if len(args) >= 4 else "None"
    scale = float_literal(node.attrs["scale"]) if node.attrs["scale"] else "None"
    causal, gqa = bool(node.attrs["is_causal"]), bool(node.attrs["enable_gqa"])
    if node.attrs["softcap"] or len(args) == 5:
        q, k = node.inputs[:2]
        group = int(q.shape[-3]) // int(k.shape[-3]) if gqa else 1
        eff = scale if node.attrs["scale"] else float_literal(1.0 / math.sqrt(int(q.shape[-1])))
        return torch_spelled_attention(*args[:3], mask, scale=eff, softcap=node.attrs["softcap"], node=node,
                                       causal=causal, group=group, sinks=args[4] if len(args) == 5 else None)
    return (f"F.scaled_dot_product_attention({args[0]}, {args[1]}, {args[2]}, attn_mask={mask}, dropout_p=0.0, "
            f"is_causal={causal}, scale={scale}, enable_gqa={gqa})")


define(
    "SDPA", "ScaledDotProductAttention", (3, 5),
    {"is_causal": AttrSpec("int", 0), "scale": AttrSpec("float", 0.0), "enable_gqa": AttrSpec("int", 0),
     "softcap": AttrSpec("float", 0.0)},
    infer=_infer_sdpa,
    doc="softmax(q @ k^T * scale + mask) @ v; scale 0 is 1/sqrt(E); softcap c > 0 caps the scores to "
        "c * tanh(scores / c) before the mask (Gemma 2); a bool mask keeps True, a float mask adds; "
        "is_causal keeps j <= i (top-left); a row with nothing kept is 0 (as torch); enable_gqa: the key/value "
        "heads (axis -3) divide the query heads, query head i reading key/value head i // g (as torch); "
        "sinks (a fifth input after the mask, one logit per query head, gpt-oss) join each row's softmax as a key "
        "that reads no value.",
    numpy=numpy_sdpa, onnx=_onnx_sdpa, torch=_torch_sdpa,
)


# --------------------------------------------------------------------------- RotaryEmbedding
def _infer_rotary(shapes, dtypes, attrs):
    """``x [.., d]`` (``d`` static and even), ``cos``/``sin`` ``[.., d/2]`` broadcasting to ``x[..., :d/2]``;
    with ``num_heads`` H, ``x [.., H*d]`` holds H heads side by side and ``cos``/``sin`` apply to each."""
    x, cos, sin = shapes
    heads = attrs["num_heads"]
    if heads < 0 or len(x) < 2 or not isinstance(x[-1], int) or x[-1] % (2 * max(heads, 1)):
        raise ShapeError(f"RotaryEmbedding: x {format_shape(x)} needs a static last dim of {max(heads, 1)} "
                         f"even-sized heads (num_heads {heads})")
    half = (*x[:-1], x[-1] // max(heads, 1) // 2)
    for what, c in (("cos", cos), ("sin", sin)):
        if not c or c[-1] != half[-1] or broadcast_shapes(c, half) != tuple(canonical_dim(d) for d in half):
            raise ShapeError(f"RotaryEmbedding: {what} {format_shape(c)} does not broadcast to {format_shape(half)}")
    return tuple(x), same_dtype(dtypes, "RotaryEmbedding x/cos/sin")


def _numpy_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, *, num_heads: int) -> np.ndarray:
    if num_heads:
        heads = x.reshape(*x.shape[:-1], num_heads, -1)
        out = _numpy_rotary(heads, cos[..., None, :], sin[..., None, :], num_heads=0)
        return out.reshape(x.shape)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].astype(np.float64), x[..., h:].astype(np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _onnx_rotary(ctx: Any, node: ComputationNode, out: str) -> None:
    """ONNX ``RotaryEmbedding`` (opset 23) for ``x [b, h, s, d]`` with ``cos``/``sin`` ``[b, 1, s, d/2]``
    (their head axis squeezed once and shared) or, with ``num_heads``, ``x [b, s, h*d]`` with
    ``[b, s, d/2]``; otherwise the halves rotated with ``Split``/``Concat`` (per head)."""
    x, cos, sin = node.inputs
    heads = node.attrs["num_heads"]
    same = lambda c, i, j: canonical_dim(c.shape[i]) == canonical_dim(x.shape[j])  # noqa: E731
    if ctx.opset >= 23 and heads and len(x.shape) == 3 and all(
            len(c.shape) == 3 and same(c, 0, 0) and same(c, 1, 1) for c in (cos, sin)):
        ctx.emit("RotaryEmbedding", ctx.args(node), [out], num_heads=heads)
        return
    if ctx.opset >= 23 and not heads and len(x.shape) == 4 and all(
            len(c.shape) == 4 and c.shape[1] == 1 and same(c, 0, 0) and same(c, 2, 2) for c in (cos, sin)):
        def squeezed(i: int) -> str:
            arg = ctx.arg(node, i)
            return ctx.once(("rotary-cache", arg), lambda: ctx.emit(
                "Squeeze", [arg, ctx.constant(np.array([1], dtype=np.int64), f"{node.name}/axis1")]))

        ctx.emit("RotaryEmbedding", [ctx.arg(node, 0), squeezed(1), squeezed(2)], [out])
        return
    xa, c, s = ctx.args(node)
    d = int(x.shape[-1]) // max(heads, 1)
    rank = len(x.shape)
    if heads:  # [.., h*d] -> [.., h, d]; cos/sin gain the head axis
        xa = ctx.emit("Reshape", [xa, ctx.constant(np.array([0] * (rank - 1) + [heads, d], np.int64), f"{node.name}/heads")])
        axis = ctx.constant(np.array([-2], np.int64), f"{node.name}/axis")
        c, s = ctx.emit("Unsqueeze", [c, axis]), ctx.emit("Unsqueeze", [s, axis])
    split = ctx.constant(np.array([d // 2, d // 2], dtype=np.int64), f"{node.name}/halves")
    x1, x2 = ctx.fresh(f"{node.name}/x1"), ctx.fresh(f"{node.name}/x2")
    ctx.emit("Split", [xa, split], [x1, x2], axis=-1)
    first = ctx.emit("Sub", [ctx.emit("Mul", [x1, c]), ctx.emit("Mul", [x2, s])])
    second = ctx.emit("Add", [ctx.emit("Mul", [x2, c]), ctx.emit("Mul", [x1, s])])
    if not heads:
        ctx.emit("Concat", [first, second], [out], axis=-1)
        return
    flat = ctx.constant(np.array([0] * (rank - 1) + [-1], np.int64), f"{node.name}/flat")
    ctx.emit("Reshape", [ctx.emit("Concat", [first, second], axis=-1), flat], [out])


def _torch_rotary(node: ComputationNode, args: list[str]) -> str:
    x, c, s = args
    heads = node.attrs["num_heads"]
    h = int(node.inputs[0].shape[-1]) // max(heads, 1) // 2
    if heads:
        x, c, s = f"{x}.unflatten(-1, ({heads}, {2 * h}))", f"{c}.unsqueeze(-2)", f"{s}.unsqueeze(-2)"
    out = (f"torch.cat([{x}[..., :{h}] * {c} - {x}[..., {h}:] * {s}, "
           f"{x}[..., {h}:] * {c} + {x}[..., :{h}] * {s}], dim=-1)")
    return f"{out}.flatten(-2)" if heads else out


define(
    "ROTARY_EMBEDDING", "RotaryEmbedding", (3, 3), {"num_heads": AttrSpec("int", 0)},
    infer=_infer_rotary,
    doc="Rotary position embedding, halves not interleaved: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], "
        "cos/sin of half the last dim; num_heads H > 0: the last dim holds H such heads side by side, each "
        "rotated by the same cos/sin (ONNX RotaryEmbedding from opset 23).",
    numpy=_numpy_rotary, onnx=_onnx_rotary, torch=_torch_rotary,
)
