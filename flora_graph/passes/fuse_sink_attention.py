"""fuse-sink-attention: Attention with sinks spelled out (gpt-oss's eager path) becomes one ``ScaledDotProductAttention``.

gpt-oss gives each query head a learned sink: one more logit in every row's softmax, for a key that reads
no value. transformers writes it in torch ops, since ``F.scaled_dot_product_attention`` takes no sinks::

    s = Add(Mul(MatMul(q, Transpose(k')), scale), Where(mask, 0, lowest))
    c = Concat(s, Expand(Reshape(sinks, [1, -1, 1, 1])), axis=-1)
    y = MatMul(Slice(Softmax(Sub(c, ReduceMax(c, -1))), last axis 0:-1), v')

Rule ``fuse-sink-attention`` rewrites it to ``ScaledDotProductAttention(q, k', v', mask, sinks, scale)``
(whose fifth input is the sinks: :mod:`flora_graph.ops.attention`); ``share-kv-heads`` then takes the
repeated heads ``k'``/``v'`` back to the key/value heads and ``fuse-kv-attention`` makes the cache's
``KVCacheAttention``, which ONNX Runtime runs as ``GroupQueryAttention`` with ``head_sink``.

The arithmetic is the same: subtracting the row's maximum leaves a softmax as it is, and a key the mask drops
with the dtype's lowest value (transformers) weighs exactly 0, as with ``-inf``, beside the sink's finite
logit, even in a row with every key dropped (its sink takes the whole row; the result is 0 in both).
It fires where ``scale`` is a positive scalar constant, the bias is ``Where(bool mask, 0, -inf or the dtype's
lowest value)``, the sinks are a constant of one value per query head, softmax runs over the last axis, the
slice drops just the sink's column, and no intermediate is read elsewhere; refusals are recorded with the reason.
"""

from __future__ import annotations

from flora_graph.ir import Graph, Op
from flora_graph.ir.shapes import canonical_dim
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["FUSE_SINK_ATTENTION", "fuse_sink_attention"]

_DROPPED = -1e30  # a bias at or below this drops its key beside any finite sink: exp(-1e30 - sink) is 0

_SCORES = Pat(Op.MATMUL, (Pat.any("q"), Pat(Op.TRANSPOSE, (Pat.any("k"),), name="k_t")), name="scores")
_BIASED = Pat(Op.ADD, (Pat(Op.MUL, (_SCORES, Pat.weight("scale")), name="scaled"),
                       Pat(Op.WHERE, (Pat.any("mask"), Pat.weight("zero"), Pat.weight("lowest")), name="bias")),
              name="biased")
_SINKS = Pat(Op.EXPAND, (Pat(Op.RESHAPE, (Pat.weight("sinks"),), name="sink_column"),), name="sink_rows")
_LOGITS = Pat(Op.CONCAT, (_BIASED, _SINKS), name="logits")
PATTERN = Pat(Op.MATMUL, (
    Pat(Op.SLICE, (Pat(Op.SOFTMAX, (Pat(Op.SUB, (_LOGITS, Pat(Op.REDUCE_MAX, (Pat.any("logits"),), name="top")),
                                        name="centered"),), name="probs"),), name="kept"),
    Pat.any("v")), name="out")


def _last_axis(axis: int, rank: int) -> bool:
    return axis % rank == rank - 1


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    q, k, v = m["q"], m["k"], m["v"]
    if any(len(x.shape) != 4 for x in (q, k, v)) or tuple(m["k_t"].attrs["perm"]) != (0, 1, 3, 2):
        return res.fail("not a [b, heads, L, d] attention with k transposed on its last two axes")
    heads = canonical_dim(q.shape[1])
    if not isinstance(heads, int) or canonical_dim(k.shape[1]) != heads or canonical_dim(v.shape[1]) != heads:
        return res.fail(f"q {q.shape}, k {k.shape} and v {v.shape} do not have one static head count")
    scale, zero, lowest = (ctx.scalar(m[n]) for n in ("scale", "zero", "lowest"))
    if scale is None or not scale > 0:
        return res.fail(f"scale {scale} is not a positive scalar")
    if zero != 0 or lowest is None or not lowest <= _DROPPED or m["mask"].dtype != "bool":
        return res.fail("the bias is not Where(bool mask, 0, -inf or the dtype's lowest value)")
    sinks = m["sinks"]
    if tuple(canonical_dim(d) for d in sinks.shape) != (heads,) or sinks.dtype != q.dtype:
        return res.fail(f"sinks {sinks.name!r} {sinks.shape} are not one {q.dtype} per query head ({heads})")
    if tuple(m["sink_column"].shape) != (1, heads, 1, 1) or canonical_dim(m["sink_rows"].shape[-1]) != 1:
        return res.fail("the sinks are not one column of each head's logits")
    if not _last_axis(m["logits"].attrs["axis"], 4) or not _last_axis(m["probs"].attrs["axis"], 4):
        return res.fail("the sinks are not appended to, or the softmax not taken over, the keys' axis")
    top = m["top"].attrs
    if tuple(a % 4 for a in top["axes"]) != (3,) or not top["keepdims"]:
        return res.fail(f"{m['top'].name!r} is not the row's maximum")
    sl = m["kept"].attrs
    if (tuple(a % 4 for a in sl["axes"]) != (3,) or tuple(sl["starts"]) != (0,) or tuple(sl["ends"]) != (-1,)
            or tuple(sl.get("steps") or (1,)) != (1,)):
        return res.fail(f"{m['kept'].name!r} does not drop just the sinks' column")
    chain = ("scores", "scaled", "biased", "logits", "centered", "probs", "kept")
    for a, b in zip(chain, (*chain[1:], "out"), strict=True):
        if others := ctx.other_users(m[a], m[b], *([m["top"]] if a == "logits" else [])):
            return res.fail(f"{m[a].name!r} is also read by {others}")
    if others := ctx.other_users(m["top"], m["centered"]):
        return res.fail(f"{m['top'].name!r} is also read by {others}")
    m.extra.update(scale=scale)
    return res


def _rewrite(m: Match, ctx: RewriteContext) -> None:
    att = ctx.add(Op.SDPA, [m["q"], m["k"], m["v"], m["mask"], m["sinks"]], {"scale": m.extra["scale"]},
                  name=f"{m.root.name}.sink_attention", meta=m.root.meta)
    ctx.replace(m.root, att)


FUSE_SINK_ATTENTION = Rule("fuse-sink-attention", PATTERN, _rewrite, _check,
                           doc="Attention with sinks in torch ops -> ScaledDotProductAttention(mask, sinks).")


@register_pass("fuse-sink-attention")
def fuse_sink_attention(graph: Graph) -> PassResult:
    """Rewrite each attention with sinks spelled out in torch ops to one ``ScaledDotProductAttention``
    (see the module doc)."""
    return RuleSet([FUSE_SINK_ATTENTION]).apply(graph)
