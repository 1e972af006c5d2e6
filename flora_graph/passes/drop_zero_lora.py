"""drop-zero-lora: Replaces ``Add(base, s·B(A(x)))`` with ``base`` when ``B``, ``A`` or ``s`` is all zeros.

The branch then adds exactly zero (for finite inputs), so the ``Add`` is replaced by the
base node and the branch becomes dead. A freshly initialised adapter (``B = 0``) is the
common case. An adapter slot is never dropped: its zero default is replaced by an adapter
at run time (:mod:`~flora_graph.passes.adapter_slots`).
"""

from __future__ import annotations

import numpy as np

from flora_graph.ir import Graph
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.lora_pattern import LORA, LoRAMatch
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Rule, RuleSet

__all__ = ["DROP_ZERO_LORA", "drop_zero_lora"]


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    lm = LoRAMatch.from_match(m)
    assert lm.add is not None and lm.base is not None
    if tuple(lm.base.shape) != tuple(lm.add.shape) or lm.base.dtype != lm.add.dtype:
        return res.fail(f"Add {lm.add.name!r} broadcasts base {lm.base.name!r}; replacing it would change its shape")
    factors = {"B": lm.B, "A": lm.A, "s": lm.s}
    zero = [k for k, n in factors.items() if n is not None and not np.any(ctx.value(n))]
    if not zero:
        return res.fail("A, B and s are nonzero")
    m.extra["zero"] = zero
    return res


def _rewrite(m: Match, ctx: RewriteContext):
    lm = LoRAMatch.from_match(m)
    ctx.stats.setdefault("dropped", {})[lm.module] = m.extra["zero"]
    return lm.base


DROP_ZERO_LORA = Rule("drop-zero-lora", LORA, _rewrite, _check,
                      doc="Replaces Add(base, s·B(A(x))) with base when B, A or s is all zeros.")


@register_pass("drop-zero-lora")
def drop_zero_lora(graph: Graph) -> PassResult:
    """Remove every LoRA branch that adds exactly zero; stats ``dropped`` maps module -> the zero factors."""
    return RuleSet([DROP_ZERO_LORA]).apply(graph)
