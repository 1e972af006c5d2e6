"""share-kv-heads: grouped-query attention without copying the key/value heads.

Hugging Face's Llama-family attention (``repeat_kv``) widens the ``kv`` key/value heads to the
``h = kv * g`` query heads before attention: ``Unsqueeze`` at axis 2, ``Expand`` to
``[b, kv, g, T, d]``, ``Reshape`` to ``[b, h, T, d]``. With a KV cache that copies the whole cache
twice per layer and decode step. Grouped-query attention computes the same from the ``kv``
heads themselves:

    ScaledDotProductAttention(q [b, h, s, d], k, v [b, kv, T, d], mask, enable_gqa=1) -> [b, h, s, dv]

(query head ``i * g + j`` reads key head ``i`` in both), which ONNX writes as one ``Attention``
node from opset 23 and otherwise as attention of the query heads grouped ``[b, kv, g, s, d]``
broadcasting over ``[b, kv, 1, T, d]`` keys (:mod:`flora_graph.ops.attention`). Rule
``share-kv-heads`` fires on an attention whose key and value are both widened that way with the
same ``g > 1``; otherwise the reason is recorded as for the other passes.
"""

from __future__ import annotations

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.shapes import canonical_dim, canonical_shape, dim_product
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["SHARE_KV_HEADS", "share_kv_heads"]


def _widened(x: str) -> Pat:
    """``Reshape(Expand(Unsqueeze(x)))``, the widening of ``repeat_kv``, bound under ``x``."""
    unsq = Pat(Op.UNSQUEEZE, (Pat.any(x),), name=f"{x}_unsqueeze")
    return Pat(Op.RESHAPE, (Pat(Op.EXPAND, (unsq,), name=f"{x}_expand"),), name=f"{x}_wide")


PATTERN = Pat(Op.SDPA, (Pat.any("q"), _widened("k"), _widened("v")), name="attention", extra=True)



def _group(m: Match, x: str) -> int | str:
    """The repeat count ``g`` of the widening of ``x``, or why it is not ``repeat_kv``'s."""
    src, unsq, wide = m[x], m[f"{x}_unsqueeze"], m[f"{x}_wide"]
    if len(src.shape) != 4:
        return f"{x} {src.name!r} has rank {len(src.shape)}, not 4"
    if tuple(a % 5 for a in unsq.attrs["axes"]) != (2,):
        return f"{unsq.name!r} inserts axes {unsq.attrs['axes']}, not axis 2"
    b, kv, t, d = canonical_shape(src.shape)
    g = m[f"{x}_expand"].shape[2]
    if not isinstance(g, int) or g < 2 or canonical_shape(m[f"{x}_expand"].shape) != (b, kv, g, t, d):
        return f"{m[f'{x}_expand'].name!r} does not widen {src.name!r} along a new axis 2"
    if canonical_shape(wide.shape) != (b, canonical_dim(dim_product([kv, g])), t, d):
        return f"{wide.name!r} does not fold the new axis into the heads"
    return g


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    gk, gv = _group(m, "k"), _group(m, "v")
    for g in (gk, gv):
        if isinstance(g, str):
            return res.fail(g)
    if gk != gv or canonical_shape(m["k"].shape[:2]) != canonical_shape(m["v"].shape[:2]):
        return res.fail("key and value are widened differently")
    q = m["q"]
    if len(q.shape) != 4 or canonical_dim(q.shape[1]) != canonical_dim(m["k_wide"].shape[1]):
        return res.fail(f"query {q.name!r} {q.shape} does not have the widened head count")
    return res


def _rewrite(m: Match, ctx: RewriteContext) -> ComputationNode:
    att = m.root
    inputs = [m["q"], m["k"], m["v"], *att.inputs[3:]]
    return ctx.add(Op.SDPA, inputs, {**att.attrs, "enable_gqa": 1}, name=f"{att.name}.grouped", meta=att.meta)


SHARE_KV_HEADS = Rule("share-kv-heads", PATTERN, _rewrite, _check,
                      doc="Attention on repeat_kv-widened keys/values groups the query heads instead (no copy).")


@register_pass("share-kv-heads")
def share_kv_heads(graph: Graph) -> PassResult:
    """Rewrite each grouped-query attention on widened keys/values to broadcast over the kv heads."""
    return RuleSet([SHARE_KV_HEADS]).apply(graph)
