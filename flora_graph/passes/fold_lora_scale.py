"""fold-lora-scale: Replaces ``Mul(up(h, B), s)`` with ``up(h, s·B)`` (``up`` a ``Linear`` or ``Conv2d``).

The scaled weight is a new param ``f"{B}.scaled"`` (``B`` itself is never edited, another
node may read it); with ``swappable=True`` it is the in-graph expression ``Mul(B, s)`` so
``B`` and ``s`` stay separate, swappable weights. An adapter slot has its scale folded into
its ``B`` input already and is never matched (:mod:`~flora_graph.passes.adapter_slots`).
"""

from __future__ import annotations

import numpy as np

from flora_graph.ir import Graph, Op
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.lora_pattern import SCALED_BRANCH, LoRAMatch
from flora_graph.passes.rewrite import RewriteContext, weight_label
from flora_graph.passes.rules import Match, MatchResult, Rule, RuleSet

__all__ = ["FOLD_LORA_SCALE", "fold_lora_scale"]


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    lm = LoRAMatch.from_match(m)
    assert lm.s is not None and lm.scale is not None
    others = ctx.other_users(lm.up, lm.scale)
    if others:
        return res.fail(f"lora_up {lm.up.name!r} is also read by {others}; folding would compute it twice")
    if len(lm.s.shape) > len(lm.B.shape):
        return res.fail(f"scale {lm.s.name!r} has rank {len(lm.s.shape)} > rank of B {lm.B.name!r}")
    if not ctx.swappable:
        b = np.asarray(ctx.value(lm.B))
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = (b.astype(np.float32) * np.float32(lm.scale_value(ctx))).astype(b.dtype)
        if not np.all(np.isfinite(scaled.astype(np.float32))):
            return res.fail(f"s·B of {lm.up.name!r} is not finite in {b.dtype}")
    return res


def _rewrite(m: Match, ctx: RewriteContext):
    lm = LoRAMatch.from_match(m)
    assert lm.s is not None
    b2 = ctx.weight(Op.MUL, [lm.B, lm.s], name=f"{weight_label(lm.B)}.scaled")
    return ctx.add(lm.op, [lm.down, b2], lm.up.attrs, name=f"{lm.up.name}.scaled", meta=lm.up.meta)


FOLD_LORA_SCALE = Rule("fold-lora-scale", SCALED_BRANCH, _rewrite, _check,
                       doc="Replaces Mul(up(h, B), s) with up(h, s·B).")


@register_pass("fold-lora-scale")
def fold_lora_scale(graph: Graph, *, swappable: bool = False) -> PassResult:
    """Fold each LoRA branch's scalar scale into its up-projection weight."""
    return RuleSet([FOLD_LORA_SCALE]).apply(graph, {"swappable": swappable})
