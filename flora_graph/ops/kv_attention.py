"""``KVCacheAttention``: a decoder's attention with its key/value cache, heads packed in the last dim.

One op, three results (attribute ``output``): the attention (0), the key cache (1) and the value
cache (2) after appending this step's keys and values. A graph holds one node per result used,
with the same inputs; the ONNX rule writes all three as one ONNX ``Attention`` node (opset 23,
``past_key``/``past_value`` in, ``present_key``/``present_value`` out) made once and shared, so
the cache is appended inside the attention kernel, with no ``Reshape``/``Transpose`` of the heads
around it. The ``fuse-kv-attention`` pass makes it from ``ScaledDotProductAttention`` on a
cache ``Concat`` (:mod:`flora_graph.passes.fuse_kv_attention`).

Inputs: ``q [b, s, H*d]``, ``k [b, s, KV*d]``, ``v [b, s, KV*dv]``, ``past_k [b, KV, P, d]``,
``past_v [b, KV, P, dv]``, an optional boolean ``mask`` broadcasting to ``[b, H, s, P+s]`` and,
after it, optional ``sinks [H]`` (gpt-oss: one logit per query head that joins each row's softmax
as a key reading no value); ``KV`` divides ``H`` (query head ``i`` reads key/value head
``i // (H/KV)``). Before opset 23, with sinks (which ONNX ``Attention`` lacks), and in the numpy
and torch rules it is that computation spelled out: the heads unpacked, the caches concatenated,
grouped-query attention. A spelled-out one with sinks is recorded (:class:`SinkAttention`) for the
ONNX Runtime contrib lowering, whose ``GroupQueryAttention`` takes sinks (``head_sink``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import add_dims, broadcast_shapes, canonical_dim, format_shape
from flora_graph.ops._infer import same_dtype
from flora_graph.ops._torch import float_literal
from flora_graph.ops.attention import numpy_sdpa, onnx_grouped_attention, torch_spelled_attention
from flora_graph.ops.registry import define

__all__ = ["SinkAttention"]

OUTPUTS = ("attention", "key cache", "value cache")


@dataclass(frozen=True)
class SinkAttention:
    """A ``KVCacheAttention`` with sinks as its ONNX rule spelled it out: its inputs' value names (``q, k, v,
    past_k, past_v, mask, sinks``), those of its three results, its head counts, scale and soft cap."""

    inputs: tuple[str, ...]
    outputs: tuple[str, str, str]
    q_heads: int
    kv_heads: int
    scale: float
    softcap: float


def _heads(shapes, attrs) -> tuple[int, int, int, int]:
    """``(H, KV, d, dv)`` of a ``KVCacheAttention``; ``ShapeError`` when the shapes do not fit them."""
    q, k, v, pk, pv = shapes[:5]
    h, kv = attrs["q_heads"], attrs["kv_heads"]
    if h < 1 or kv < 1 or h % kv:
        raise ShapeError(f"KVCacheAttention: kv_heads {kv} must divide q_heads {h} (both >= 1)")
    if any(len(t) != 3 for t in (q, k, v)) or any(len(t) != 4 for t in (pk, pv)):
        raise ShapeError(f"KVCacheAttention: q, k, v need rank 3 and the caches rank 4, got {format_shape(q)}, "
                         f"{format_shape(k)}, {format_shape(v)}, {format_shape(pk)}, {format_shape(pv)}")
    if not all(isinstance(t[-1], int) for t in (q, k, v)) or q[-1] % h or k[-1] % kv or v[-1] % kv:
        raise ShapeError(f"KVCacheAttention: the last dims of q {format_shape(q)}, k {format_shape(k)} and v "
                         f"{format_shape(v)} must be static multiples of their head counts {h}, {kv}, {kv}")
    d, dv = q[-1] // h, v[-1] // kv
    if k[-1] // kv != d:
        raise ShapeError(f"KVCacheAttention: q {format_shape(q)} and k {format_shape(k)} head sizes differ")
    for name, cache, size in (("past_k", pk, d), ("past_v", pv, dv)):
        if cache[1] != kv or cache[3] != size:
            raise ShapeError(f"KVCacheAttention: {name} {format_shape(cache)} is not [batch, {kv}, past, {size}]")
    return h, kv, d, dv


def _infer(shapes, dtypes, attrs):
    h, kv, d, dv = _heads(shapes, attrs)
    q, k, v, pk, pv = shapes[:5]
    if attrs["output"] not in (0, 1, 2):
        raise ShapeError(f"KVCacheAttention: output must be 0, 1 or 2, got {attrs['output']}")
    dtype = same_dtype(dtypes[:5], "KVCacheAttention q/k/v/past_k/past_v")
    batch = canonical_dim(q[0])
    if any(canonical_dim(t[0]) != batch for t in (k, v, pk, pv)):
        raise ShapeError(f"KVCacheAttention: q, k, v and the caches need one batch dim, got {format_shape(q)}, "
                         f"{format_shape(k)}, {format_shape(v)}, {format_shape(pk)}, {format_shape(pv)}")
    if canonical_dim(k[1]) != canonical_dim(q[1]) or canonical_dim(v[1]) != canonical_dim(q[1]):
        raise ShapeError(f"KVCacheAttention: q {format_shape(q)}, k {format_shape(k)}, v {format_shape(v)} lengths differ")
    if canonical_dim(pk[2]) != canonical_dim(pv[2]):
        raise ShapeError(f"KVCacheAttention: past_k {format_shape(pk)} and past_v {format_shape(pv)} lengths differ")
    total = add_dims(pk[2], q[1])
    if len(shapes) == 7 and (dtypes[6] != dtype or len(shapes[6]) != 1 or canonical_dim(shapes[6][0]) != h):
        raise ShapeError(f"KVCacheAttention: sinks {format_shape(shapes[6])} {dtypes[6]} are not one {dtype} per "
                         f"query head ({h})")
    if len(shapes) >= 6:
        if dtypes[5] != "bool":
            raise ShapeError(f"KVCacheAttention: the mask must be bool, got {dtypes[5]}")
        full = (batch, h, q[1], total)
        if len(shapes[5]) > 4 or broadcast_shapes(shapes[5], full) != tuple(canonical_dim(x) for x in full):
            raise ShapeError(f"KVCacheAttention: mask {format_shape(shapes[5])} does not broadcast to {format_shape(full)}")
    if attrs["scale"] < 0:
        raise ShapeError(f"KVCacheAttention: scale must be >= 0 (0: 1/sqrt(d)), got {attrs['scale']}")
    out = [(batch, q[1], h * dv), (batch, kv, total, d), (batch, kv, total, dv)][attrs["output"]]
    return out, dtype


def _numpy(q, k, v, pk, pv, mask=None, sinks=None, *, q_heads: int, kv_heads: int, scale: float, output: int,
           softcap: float = 0.0) -> np.ndarray:
    s = q.shape[1]
    split = lambda t, n: t.reshape(t.shape[0], s, n, -1).transpose(0, 2, 1, 3)  # noqa: E731
    ck = np.concatenate([pk, split(k, kv_heads).astype(pk.dtype)], axis=2)
    cv = np.concatenate([pv, split(v, kv_heads).astype(pv.dtype)], axis=2)
    if output:
        return ck if output == 1 else cv
    y = numpy_sdpa(split(q, q_heads), ck, cv, mask, sinks, is_causal=0, scale=scale,
                   enable_gqa=int(q_heads != kv_heads), softcap=softcap)
    return y.transpose(0, 2, 1, 3).reshape(y.shape[0], s, -1)


def _onnx(ctx: Any, node: ComputationNode, out: str) -> None:
    """One ONNX ``Attention`` (opset 23) for the three results of these inputs, else spelled out (always with
    sinks, which ONNX ``Attention`` does not take: the spelled-out results are then recorded in
    ``ctx.sink_attentions``, for ONNX Runtime's ``GroupQueryAttention`` to take them, sinks and all)."""
    a = node.attrs
    names = tuple(ctx.arg(node, i) for i in range(len(node.inputs)))
    key = ("kv-attention", names, a["q_heads"], a["kv_heads"], a["scale"], a["softcap"])
    if ctx.opset >= 23 and len(names) < 7:
        def fused() -> tuple[str, str, str]:
            outs = [ctx.fresh(f"{node.name}/{what.replace(' ', '_')}") for what in OUTPUTS]
            ins = [*names[:3], names[5] if len(names) == 6 else "", names[3], names[4]]
            extra = {k: a[k] for k in ("scale", "softcap") if a[k]}
            ctx.emit("Attention", ins, outs, q_num_heads=a["q_heads"], kv_num_heads=a["kv_heads"], **extra)
            return tuple(outs)

        ctx.emit("Identity", [ctx.once(key, fused)[a["output"]]], [out])
        return

    def spelled() -> tuple[str, str, str]:
        ints = lambda *xs: ctx.constant(np.array(xs, dtype=np.int64), f"{node.name}/shape")  # noqa: E731
        perm = (0, 2, 1, 3)

        def heads(x: str, n: int, size: int) -> str:
            return ctx.emit("Transpose", [ctx.emit("Reshape", [x, ints(0, 0, n, size)])], perm=perm)

        h, kv = a["q_heads"], a["kv_heads"]
        d, dv = int(node.inputs[0].shape[-1]) // h, int(node.inputs[2].shape[-1]) // kv
        ck = ctx.emit("Concat", [names[3], heads(names[1], kv, d)], axis=2)
        cv = ctx.emit("Concat", [names[4], heads(names[2], kv, dv)], axis=2)
        y4 = ctx.fresh(f"{node.name}/heads")
        onnx_grouped_attention(ctx, node, heads(names[0], h, d), ck, cv, y4, rank=4, heads=h, kv_heads=kv, head_size=d,
                               value_size=dv, mask=names[5] if len(names) >= 6 else None,
                               mask_shape=node.inputs[5].shape if len(names) >= 6 else None,
                               scale=a["scale"] or 1.0 / math.sqrt(d), softcap=a["softcap"],
                               sinks=names[6] if len(names) == 7 else None)
        y = ctx.emit("Reshape", [ctx.emit("Transpose", [y4], perm=perm), ints(0, 0, -1)])
        if len(names) == 7:
            ctx.sink_attentions.append(SinkAttention(names, (y, ck, cv), h, kv, a["scale"], a["softcap"]))
        return y, ck, cv

    ctx.emit("Identity", [ctx.once(key, spelled)[a["output"]]], [out])


def _torch(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    h, kv = a["q_heads"], a["kv_heads"]
    d, dv = int(node.inputs[0].shape[-1]) // h, int(node.inputs[2].shape[-1]) // kv
    ck = f"torch.cat([{args[3]}, {args[1]}.unflatten(-1, ({kv}, {d})).transpose(1, 2)], dim=2)"
    cv = f"torch.cat([{args[4]}, {args[2]}.unflatten(-1, ({kv}, {dv})).transpose(1, 2)], dim=2)"
    if a["output"]:
        return ck if a["output"] == 1 else cv
    mask = args[5] if len(args) >= 6 else "None"
    scale = float_literal(a["scale"]) if a["scale"] else "None"
    if a["softcap"] or len(args) == 7:
        q = f"{args[0]}.unflatten(-1, ({h}, {d})).transpose(1, 2)"
        eff = scale if a["scale"] else float_literal(1.0 / math.sqrt(d))
        y = torch_spelled_attention(q, ck, cv, mask, scale=eff, softcap=a["softcap"], node=node, group=h // kv,
                                    sinks=args[6] if len(args) == 7 else None)
        return f"{y}.transpose(1, 2).flatten(-2)"
    return (f"F.scaled_dot_product_attention({args[0]}.unflatten(-1, ({h}, {d})).transpose(1, 2), {ck}, {cv}, "
            f"attn_mask={mask}, dropout_p=0.0, scale={scale}, enable_gqa={h != kv}).transpose(1, 2).flatten(-2)")


define(
    "KV_ATTENTION", "KVCacheAttention", (5, 7),
    {"q_heads": AttrSpec("int", 1), "kv_heads": AttrSpec("int", 1), "scale": AttrSpec("float", 0.0),
     "output": AttrSpec("int", 0), "softcap": AttrSpec("float", 0.0)},
    infer=_infer,
    doc="Decoder attention with its key/value cache: q [b,s,H*d], k/v [b,s,KV*d], past_k/past_v [b,KV,P,d], "
        "optional bool mask to [b,H,s,P+s], then optional sinks [H] (one logit per query head joining each row's "
        "softmax as a key that reads no value); output 0: attention [b,s,H*dv], 1/2: the caches with this step "
        "appended [b,KV,P+s,d] (ONNX Attention with past/present from opset 23, without sinks).",
    numpy=_numpy, onnx=_onnx, torch=_torch, family="attention",
)
