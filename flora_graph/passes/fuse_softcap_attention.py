"""fuse-softcap-attention: Soft-capped attention spelled out (Gemma 2's eager path) becomes one ``ScaledDotProductAttention``.

transformers runs Gemma 2's attention in torch ops, since ``F.scaled_dot_product_attention`` takes no soft cap::

    y = MatMul(Softmax(Add(Mul(Tanh(Div(Mul(MatMul(q, Transpose(k')), scale), cap)), cap), Where(mask, 0, -inf))), v')

with ``k'``/``v'`` the key/value heads repeated for the query heads (``repeat_kv``: ``Reshape(Expand(Unsqueeze(k,
axis 2)))``). Rule ``fuse-softcap-attention`` rewrites it to ``ScaledDotProductAttention(q, k, v, mask, scale,
softcap=cap, enable_gqa)`` on the unrepeated heads, the form the sdpa path of other decoders captures as, so
``fuse-kv-attention`` and ONNX Runtime's ``GroupQueryAttention`` (whose ``softcap`` is the same cap) take it too.
The arithmetic is the same: the cap applies before the mask in both.

It fires where ``scale`` and the two caps are scalar constants, the caps equal and positive, the bias is
``Where(bool mask, 0, -inf)``, softmax runs over the last axis, ``k'`` is transposed on its last two axes, the
keys and values are a cache's (``Concat`` of a past input and the new ones), and no intermediate is read
elsewhere. The bias may be transformers' ``Where(mask, 0, dtype's lowest)``, which drops a key as ``-inf`` does
once the scores are capped, except in a row with every key dropped (a left-padded row's padding queries): eager
averages every value there, the fused node gives 0. A cache's padded queries feed only cache entries that every
query masks, so the cache graphs (what packages serve) fuse; a graph without a cache, whose every position is
an output, keeps the spelled-out ops. Refusals are recorded with the reason.
"""

from __future__ import annotations

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.shapes import canonical_dim
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["FUSE_SOFTCAP_ATTENTION", "fuse_softcap_attention"]

_DROPPED = -1e30  # a bias at or below this drops its key: exp(cap - 1e30) is 0 in any float dtype

_SCORES = Pat(Op.MATMUL, (Pat.any("q"), Pat(Op.TRANSPOSE, (Pat.any("k_rep"),), name="k_t")), name="scores")
_CAPPED = Pat(Op.MUL, (Pat(Op.TANH, (Pat(Op.DIV, (Pat(Op.MUL, (_SCORES, Pat.weight("scale")), name="scaled"),
                                                   Pat.weight("cap_in")), name="div"),), name="tanh"),
                       Pat.weight("cap_out")), name="capped")
_BIAS = Pat(Op.WHERE, (Pat.any("mask"), Pat.weight("zero"), Pat.weight("minus_inf")), name="bias")
PATTERN = Pat(Op.MATMUL, (Pat(Op.SOFTMAX, (Pat(Op.ADD, (_CAPPED, _BIAS), name="biased"),), name="probs"),
                          Pat.any("v_rep")), name="out")


def _unrepeated(x: ComputationNode) -> tuple[ComputationNode, int] | None:
    """``(heads, group)`` when ``x`` is ``repeat_kv(heads)``: ``Reshape(Expand(Unsqueeze(heads, axis 2)))`` of
    ``[b, kv, S, d]`` to ``[b, kv * group, S, d]``; ``(x, 1)`` when it is not a repeat at all; ``None`` for a
    ``Reshape(Expand(...))`` of another kind."""
    if x.op is not Op.RESHAPE:
        return x, 1
    exp = x.inputs[0]
    unsq = exp.inputs[0] if exp.op is Op.EXPAND else None
    if unsq is None or unsq.op is not Op.UNSQUEEZE or tuple(unsq.attrs["axes"]) not in ((2,), (-3,)):
        return None
    heads = unsq.inputs[0]
    if len(heads.shape) != 4 or len(exp.shape) != 5 or len(x.shape) != 4:
        return None
    kv, group = exp.shape[1], exp.shape[2]
    if not (isinstance(kv, int) and isinstance(group, int) and heads.shape[1] == kv and x.shape[1] == kv * group
            and all(canonical_dim(a) == canonical_dim(b) for a, b in zip(exp.shape[3:], heads.shape[2:], strict=True))):
        return None
    return heads, group


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    q, k_rep = m["q"], m["k_rep"]
    if len(q.shape) != 4 or len(k_rep.shape) != 4 or tuple(m["k_t"].attrs["perm"]) != (0, 1, 3, 2):
        return res.fail("not a [b, heads, L, d] attention with k transposed on its last two axes")
    if m["probs"].attrs["axis"] not in (-1, 3):
        return res.fail(f"softmax over axis {m['probs'].attrs['axis']}, not the keys")
    scale, cap_in, cap_out, zero, minus_inf = (ctx.scalar(m[n]) for n in ("scale", "cap_in", "cap_out", "zero", "minus_inf"))
    if scale is None or not scale > 0 or cap_in is None or cap_in != cap_out or not cap_in > 0:
        return res.fail(f"scale {scale} and caps {cap_in}, {cap_out} are not a positive scale and one positive cap")
    # transformers masks with the dtype's lowest value: after the cap (scores within +-cap) it drops a key as -inf
    # does; only a row with every key dropped differs (uniform there, 0 with -inf), a padded query nothing reads
    if zero != 0 or minus_inf is None or not minus_inf <= _DROPPED or m["mask"].dtype != "bool":
        return res.fail("the bias is not Where(bool mask, 0, -inf or the dtype's lowest value)")
    k, v = _unrepeated(k_rep), _unrepeated(m["v_rep"])
    if k is None or v is None or k[1] != v[1]:
        return res.fail("keys and values are not repeated alike for the query heads")
    if not all(x[0].op is Op.CONCAT and x[0].inputs[0].op is Op.INPUT for x in (k, v)):
        # a query that sees no key (a left-padded row's padding) averages every value in eager, as the bias is a
        # finite lowest value, and comes out 0 from the fused node: only a cache's reader, whose padded queries
        # nothing reads, is the same
        return res.fail("the keys and values are not a cache's (Concat of a past input and the new ones)")
    heads = canonical_dim(k[0].shape[1])
    if not isinstance(heads, int) or heads * k[1] != canonical_dim(q.shape[1]) or len(v[0].shape) != 4:
        return res.fail(f"{k[0].shape[1]} key heads repeated {k[1]} times do not give the {q.shape[1]} query heads")
    chain = ("scores", "scaled", "div", "tanh", "capped", "biased", "probs")
    for a, b in zip(chain, (*chain[1:], "out"), strict=True):
        if others := ctx.other_users(m[a], m[b]):
            return res.fail(f"{m[a].name!r} is also read by {others}")
    m.extra.update(k=k[0], v=v[0], gqa=int(k[1] > 1), scale=scale, cap=cap_in)
    return res


def _rewrite(m: Match, ctx: RewriteContext) -> None:
    e = m.extra
    att = ctx.add(Op.SDPA, [m["q"], e["k"], e["v"], m["mask"]],
                  {"scale": e["scale"], "softcap": e["cap"], "enable_gqa": e["gqa"]},
                  name=f"{m.root.name}.softcap_attention", meta=m.root.meta)
    ctx.replace(m.root, att)


FUSE_SOFTCAP_ATTENTION = Rule("fuse-softcap-attention", PATTERN, _rewrite, _check,
                              doc="Soft-capped attention in torch ops -> ScaledDotProductAttention(softcap).")


@register_pass("fuse-softcap-attention")
def fuse_softcap_attention(graph: Graph) -> PassResult:
    """Rewrite each soft-capped attention spelled out in torch ops to one ``ScaledDotProductAttention``
    (see the module doc)."""
    return RuleSet([FUSE_SOFTCAP_ATTENTION]).apply(graph)
