"""fuse-base-and-down: Replaces ``base(x, W, b)`` and ``down(x, A)`` with one ``base(x, [W; A], [b; 0])`` + two ``Split``.

Both read the same ``x`` (the LoRA pattern guarantees it), so one wider projection
computes both; ``Split`` piece 0 replaces the base and piece 1 the down projection
(along the last axis for ``Linear``, along channels for ``Conv2d``, which needs the down
projection to share the base's attributes and kernel). The stacked weight is a new param,
or with ``swappable=True`` an in-graph ``Concat``. Not in the ``fused`` preset by default
(``optimize(..., fuse_base_and_down=True)``): whether it is faster depends on the backend and
the op, so ``only="Conv2d"`` (or ``"Linear"``) fuses that op's sites alone and refuses the
others with the reason (``optimize(..., fuse_base_and_down="Conv2d")``). The base layer of an
adapter slot is not stacked: the slot's ``A`` is a graph input, not a weight
(:mod:`~flora_graph.passes.adapter_slots`).
"""

from __future__ import annotations

import numpy as np

from flora_graph.ir import Graph, Op
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.lora_pattern import LORA, LoRAMatch
from flora_graph.passes.rewrite import RewriteContext, weight_label
from flora_graph.passes.rules import Match, MatchResult, Rule, RuleSet

__all__ = ["FUSE_BASE_AND_DOWN", "fuse_base_and_down"]


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    lm = LoRAMatch.from_match(m)
    assert lm.base is not None and lm.W is not None
    only = ctx.options.get("only")
    if only is not None and lm.op.value != only:
        return res.fail(f"{lm.op.value} sites are left unfused (only={only!r}: measured slower fused on this backend)")
    if lm.op is Op.CONV2D:
        if lm.base.attrs != lm.down.attrs:
            return res.fail(f"lora_down {lm.down.name!r} attributes {lm.down.attrs} differ from the base's {lm.base.attrs}")
        if tuple(lm.A.shape[1:]) != tuple(lm.W.shape[1:]):
            return res.fail(f"lora_down kernel {tuple(lm.A.shape)} does not stack onto the base's {tuple(lm.W.shape)}")
    if lm.bias is not None and lm.bias not in ctx.static:
        return res.fail(f"bias of {lm.base.name!r} is not a weight")
    return res


def _rewrite(m: Match, ctx: RewriteContext):
    lm = LoRAMatch.from_match(m)
    assert lm.base is not None and lm.W is not None
    w_cat = ctx.weight(Op.CONCAT, [lm.W, lm.A], {"axis": 0}, name=f"{lm.module}.base_and_down_weight")
    ins = [lm.x, w_cat]
    if lm.bias is not None:
        zeros = ctx.new_const(f"{weight_label(lm.A)}.zero_bias", np.zeros(lm.rank, dtype=ctx.value(lm.bias).dtype))
        ins.append(ctx.weight(Op.CONCAT, [lm.bias, zeros], {"axis": 0}, name=f"{lm.module}.base_and_down_bias"))
    meta = {**lm.base.meta, "role": "base_and_down"} if lm.base.meta else {}
    fused = ctx.add(lm.op, ins, lm.base.attrs, name=f"{lm.module}.base_and_down", meta=meta)
    axis = -1 if lm.op is Op.LINEAR else 1
    sizes = (int(lm.W.shape[0]), lm.rank)
    for i, old in enumerate((lm.base, lm.down)):
        piece = ctx.add(Op.SPLIT, [fused], {"axis": axis, "sizes": sizes, "index": i}, name=f"{old.name}.split",
                        meta=old.meta)
        ctx.replace(old, piece)
    return None


FUSE_BASE_AND_DOWN = Rule("fuse-base-and-down", LORA, _rewrite, _check,
                          doc="Replaces base(x, W, b) and down(x, A) with base(x, [W; A], [b; 0]) + Split.")


@register_pass("fuse-base-and-down")
def fuse_base_and_down(graph: Graph, *, swappable: bool = False, only: str | None = None) -> PassResult:
    """Stack each adapter's down projection onto its base layer (``only``: ``"Linear"`` or ``"Conv2d"``
    sites alone)."""
    if only not in (None, Op.LINEAR.value, Op.CONV2D.value):
        raise ValueError(f"fuse-base-and-down: only={only!r}; expected None, 'Linear' or 'Conv2d'")
    return RuleSet([FUSE_BASE_AND_DOWN]).apply(graph, {"swappable": swappable, "only": only})
