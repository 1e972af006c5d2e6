"""fuse-kv-attention: A decoder attention on its key/value cache becomes one ``KVCacheAttention``.

Hugging Face decoders split the projected queries, keys and values into heads, append this
step's keys and values to the cache, attend, and pack the heads again:

    q = Transpose(Reshape(q3, [b, s, H, d]), 0213)        (then RotaryEmbedding(q, cos, sin))
    k = Transpose(Reshape(k3, [b, s, KV, d]), 0213)       (then RotaryEmbedding(k, cos, sin))
    present_k = Concat(past_k, k, axis=2);  present_v = Concat(past_v, Transpose(Reshape(v3)), axis=2)
    y = Reshape(Transpose(ScaledDotProductAttention(q, present_k, present_v, mask), 0213), [b, s, H*dv])

Rule ``fuse-kv-attention`` rewrites that to ``KVCacheAttention`` (:mod:`flora_graph.ops.kv_attention`)
on the packed ``[b, s, heads*d]`` projections, with the rotary applied to them packed
(``RotaryEmbedding(num_heads=...)``, ``cos``/``sin`` with their head axis squeezed): its three
results replace ``y``, ``present_k`` and ``present_v``. ONNX writes them as one ``Attention``
node from opset 23, so a layer's attention is one node instead of about a dozen.

It fires on a non-causal attention (a boolean mask or none) whose key/value heads equal or
(``enable_gqa``) divide the query heads, whose result and its ``Transpose`` are read by the
packing alone, and whose ``cos``/``sin`` have a head axis of 1; refusals are recorded with the
reason.
"""

from __future__ import annotations

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.shapes import canonical_dim, canonical_shape, dim_product
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["FUSE_KV_ATTENTION", "fuse_kv_attention"]

_HEAD_PERM = (0, 2, 1, 3)


def _split(x: str) -> Pat:
    """``Transpose(Reshape(x))``: ``x [b, s, n*d]`` split into heads ``[b, n, s, d]``."""
    return Pat(Op.TRANSPOSE, (Pat(Op.RESHAPE, (Pat.any(x),), name=f"{x}_split"),), name=f"{x}_heads")


def _maybe_rotated(x: str) -> Pat:
    rotated = Pat(Op.ROTARY_EMBEDDING, (_split(x), Pat.any(f"{x}_cos"), Pat.any(f"{x}_sin")), name=f"{x}_rot")
    return rotated | _split(x)


_ATTENTION = Pat(Op.SDPA, (
    _maybe_rotated("q"),
    Pat(Op.CONCAT, (Pat.any("past_k"), _maybe_rotated("k")), name="k_cat"),
    Pat(Op.CONCAT, (Pat.any("past_v"), _split("v")), name="v_cat"),
), name="attention", extra=True)
PATTERN = Pat(Op.RESHAPE, (Pat(Op.TRANSPOSE, (_ATTENTION,), name="packing"),), name="out")



def _heads(m: Match, x: str) -> int | str:
    """The head count of the split of ``x``, or why it is not a head split."""
    src, split, heads = m[x], m[f"{x}_split"], m[f"{x}_heads"]
    if len(src.shape) != 3 or len(split.shape) != 4 or not all(isinstance(d, int) for d in split.shape[2:]):
        return f"{split.name!r} does not split a rank-3 {x} {src.shape} into heads"
    b, s, width = canonical_shape(src.shape)
    if canonical_shape(split.shape[:2]) != (b, s) or canonical_dim(dim_product(list(split.shape[2:]))) != width:
        return f"{split.name!r} {split.shape} is not {x} {src.shape} split into heads"
    if tuple(heads.attrs["perm"]) != _HEAD_PERM:
        return f"{heads.name!r} has perm {heads.attrs['perm']}, not {_HEAD_PERM}"
    rot = m.get(f"{x}_rot")
    if rot is not None:
        if rot.attrs["num_heads"]:
            return f"{rot.name!r} already rotates packed heads"
        for c in (m[f"{x}_cos"], m[f"{x}_sin"]):
            if len(c.shape) != 4 or c.shape[1] != 1:
                return f"rotary table {c.name!r} {c.shape} is not [b|1, 1, s, d/2]"
    return int(split.shape[2])


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    att, out = m["attention"], m.root
    heads = {x: _heads(m, x) for x in ("q", "k", "v")}
    for why in heads.values():
        if isinstance(why, str):
            return res.fail(why)
    h, kv = heads["q"], heads["k"]
    if heads["v"] != kv or h % kv or (h != kv and not att.attrs["enable_gqa"]):
        return res.fail(f"heads q {h}, k {kv}, v {heads['v']} are not grouped-query heads")
    if att.attrs["is_causal"]:
        return res.fail("a causal attention (its cache offset is not known to the mask)")
    for cat, past in (("k_cat", "past_k"), ("v_cat", "past_v")):
        c = m[cat]
        if c.attrs["axis"] % 4 != 2 or len(m[past].shape) != 4:
            return res.fail(f"{c.name!r} does not append to a [b, heads, past, d] cache along axis 2")
    if len(att.inputs) >= 4 and (att.inputs[3].dtype != "bool" or len(att.inputs[3].shape) > 4):
        return res.fail(f"mask {att.inputs[3].name!r} is not a boolean mask of rank <= 4")
    if tuple(m["packing"].attrs["perm"]) != _HEAD_PERM:
        return res.fail(f"{m['packing'].name!r} does not move the heads back next to the head size")
    b, s = canonical_shape(m["q"].shape[:2])
    if len(out.shape) != 3 or canonical_shape(out.shape[:2]) != (b, s):
        return res.fail(f"{out.name!r} {out.shape} does not pack the heads of the attention")
    for node, reader in ((att, m["packing"]), (m["packing"], out)):
        if others := ctx.other_users(node, reader):
            return res.fail(f"{node.name!r} is also read by {others}")
    m.extra.update(h=h, kv=kv)
    return res


def _packed_rotary(m: Match, ctx: RewriteContext, x: str, heads: int) -> ComputationNode:
    rot = m.get(f"{x}_rot")
    if rot is None:
        return m[x]
    tables = [ctx.add(Op.SQUEEZE, [m[f"{x}_{t}"]], {"axes": (1,)}, name=f"{m[f'{x}_{t}'].name}.packed", meta=rot.meta)
              for t in ("cos", "sin")]
    return ctx.add(Op.ROTARY_EMBEDDING, [m[x], *tables], {"num_heads": heads}, name=f"{rot.name}.packed", meta=rot.meta)


def _rewrite(m: Match, ctx: RewriteContext) -> None:
    att, h, kv = m["attention"], m.extra["h"], m.extra["kv"]
    inputs = [_packed_rotary(m, ctx, "q", h), _packed_rotary(m, ctx, "k", kv), m["v"], m["past_k"], m["past_v"],
              *att.inputs[3:]]
    attrs = {"q_heads": h, "kv_heads": kv, "scale": att.attrs["scale"], "softcap": att.attrs["softcap"]}
    fused = [ctx.add(Op.KV_ATTENTION, inputs, {**attrs, "output": i}, name=f"{att.name}.{what}", meta=att.meta)
             for i, what in enumerate(("kv_attention", "present_k", "present_v"))]
    ctx.replace(m.root, fused[0])
    ctx.replace(m["k_cat"], fused[1])
    ctx.replace(m["v_cat"], fused[2])


FUSE_KV_ATTENTION = Rule("fuse-kv-attention", PATTERN, _rewrite, _check,
                         doc="Head split, rotary, cache append, attention and head packing -> KVCacheAttention.")


@register_pass("fuse-kv-attention")
def fuse_kv_attention(graph: Graph) -> PassResult:
    """Rewrite each decoder attention on its key/value cache to ``KVCacheAttention`` (see the module doc)."""
    return RuleSet([FUSE_KV_ATTENTION]).apply(graph)
