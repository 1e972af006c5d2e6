"""fuse-lora-siblings: Replaces LoRA-A projections that read one input with one projection + a ``Split`` each.

``down_i = Linear(x, A_i)`` for siblings ``i = 1..n`` (for example the q/k/v adapters of
one attention block) become ``Linear(x, Concat(A_1..A_n))`` followed by
``Split(axis=-1, sizes=(r_1..r_n), index=i)`` per sibling (``Conv2d`` siblings with equal
attributes likewise, split along channels). A down projection is recognised by the LoRA
branch pattern (no bias, a weight, feeding an up projection), with or without tags. The
concatenated weight is a new param, or with ``swappable=True`` an in-graph ``Concat`` so
each ``A_i`` stays a separate weight. An adapter slot's down projection is inside the slot
op and its ``A`` a graph input, so slots are never fused (:mod:`~flora_graph.passes.adapter_slots`).
"""

from __future__ import annotations

import time
from typing import Any

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.lora_pattern import LORA_BRANCH, LoRAMatch
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match

__all__ = ["fuse_lora_siblings"]

_NAME = "fuse-lora-siblings"


def _groups(ctx: RewriteContext) -> dict[tuple, list[LoRAMatch]]:
    """Down projections by (input, op, attributes, dtype), each once, in graph order."""
    groups: dict[tuple, list[LoRAMatch]] = {}
    seen: set[ComputationNode] = set()
    for n in ctx.graph.nodes:
        if n.op not in (Op.LINEAR, Op.CONV2D):
            continue
        for b in LORA_BRANCH.match(n, ctx.static):
            lm = LoRAMatch.from_match(Match(n, b))
            if lm.down not in seen:
                seen.add(lm.down)
                key = (id(lm.x), lm.op, tuple(sorted(lm.down.attrs.items())), lm.down.dtype)
                groups.setdefault(key, []).append(lm)
            break
    return groups


def _fuse(group: list[LoRAMatch], ctx: RewriteContext) -> None:
    x, op = group[0].x, group[0].op
    downs = [lm.down for lm in group]
    a_cat = ctx.weight(Op.CONCAT, [lm.A for lm in group], {"axis": 0}, name=f"{x.name}.lora_A_fused")
    modules = ",".join(lm.module for lm in group)
    meta: dict[str, Any] = {"role": "lora_down_fused", "modules": modules} if any(d.meta for d in downs) else {}
    fused = ctx.add(op, [x, a_cat], downs[0].attrs, name=f"{x.name}.lora_down_fused", meta=meta)
    sizes = tuple(lm.rank for lm in group)
    axis = -1 if op is Op.LINEAR else 1
    for i, d in enumerate(downs):
        piece = ctx.add(Op.SPLIT, [fused], {"axis": axis, "sizes": sizes, "index": i}, name=f"{d.name}.split", meta=d.meta)
        ctx.replace(d, piece)


@register_pass(_NAME)
def fuse_lora_siblings(graph: Graph, *, swappable: bool = False) -> PassResult:
    """Fuse sibling LoRA-A projections; stats ``fused`` lists each group's down nodes."""
    t0 = time.perf_counter()
    ctx = RewriteContext(graph, {"swappable": swappable})
    fused: list[list[str]] = []
    refused: dict[str, str] = {}
    for group in _groups(ctx).values():
        if len(group) < 2:
            lm = group[0]
            refused[lm.down.name] = f"{_NAME}: only one LoRA-A projection of its kind reads {lm.x.name!r}"
            continue
        fused.append([lm.down.name for lm in group])
        _fuse(group, ctx)
    changed = ctx.commit()
    stats = {"fired": {_NAME: len(fused)} if fused else {}, "refused": refused, "fused": fused,
             "time_s": time.perf_counter() - t0}
    return PassResult(graph, changed, stats)
