"""reassociate-low-rank: Replaces ``Linear(Linear(x, A), B)`` with ``Linear(x, B@A)``, or back, whichever costs less.

Per matched branch a FLOP/byte cost model (:func:`branch_costs`) compares the low-rank
form ``(x A^T) B^T`` with the product form ``x (B A)^T``; the choice and both costs are
recorded in ``stats["decisions"]``. The product ``B@A`` is a new param, or with
``swappable=True`` an in-graph ``MatMul(B, A)`` computed on every run (its cost counted),
which the reverse rule can turn back into the low-rank form. ``Conv2d`` branches are
left alone (refused with a reason). Adapter slots are never matched: their ``A``/``B`` are
graph inputs, not weights (:mod:`~flora_graph.passes.adapter_slots`).
"""

from __future__ import annotations

import math
from typing import Any

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.lora_pattern import LORA_BRANCH, LoRAMatch
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["PRODUCT", "REASSOCIATE_TO_LOW_RANK", "REASSOCIATE_TO_PRODUCT", "branch_costs", "reassociate_low_rank"]

PRODUCT = Pat(Op.LINEAR, (Pat.any("x"), Pat(Op.MATMUL, (Pat.weight("B"), Pat.weight("A")), name="BA")), name="lin")
"""``Linear(x, MatMul(B, A))``: the product form built in-graph."""


def _rows(shape: tuple, dynamic: int) -> int:
    """Rows of ``x`` (all dims but the last); a named dim counts ``dynamic`` per factor."""
    n = 1
    for d in shape[:-1]:
        n *= d if isinstance(d, int) else dynamic ** (str(d).count("*") + 1)
    return n


def branch_costs(rows: int, d_in: int, d_out: int, rank: int, itemsize: int, *, product_static: bool,
                 peak_flops: float = 1e11, bandwidth: float = 2e10) -> dict[str, Any]:
    """Estimated seconds of both forms: ``flops / peak_flops + bytes / bandwidth`` each.

    low-rank: ``2·N·r·(in + out)`` FLOPs; bytes ``e·(N·in + r·in + 2·N·r + r·out + N·out)``.
    product:  ``2·N·in·out`` FLOPs; bytes ``e·(N·in + out·in + N·out)``; plus, unless the
    product is a static weight, ``2·out·r·in`` FLOPs and ``e·(out·r + r·in + out·in)`` bytes
    to form ``B@A`` on every run.
    """
    n, i, o, r, e = rows, d_in, d_out, rank, itemsize
    lr_flops, lr_bytes = 2 * n * r * (i + o), e * (n * i + r * i + 2 * n * r + r * o + n * o)
    pr_flops, pr_bytes = 2 * n * i * o, e * (n * i + o * i + n * o)
    if not product_static:
        pr_flops += 2 * o * r * i
        pr_bytes += e * (o * r + r * i + o * i)
    return {
        "low_rank": lr_flops / peak_flops + lr_bytes / bandwidth,
        "product": pr_flops / peak_flops + pr_bytes / bandwidth,
        "low_rank_flops": lr_flops, "low_rank_bytes": lr_bytes, "product_flops": pr_flops, "product_bytes": pr_bytes,
        "rows": n, "in": i, "out": o, "rank": r,
    }


def _costs(x: ComputationNode, a: ComputationNode, b: ComputationNode, ctx: RewriteContext) -> dict[str, Any]:
    o = ctx.options
    return branch_costs(_rows(tuple(x.shape), o["dynamic_dim_size"]), int(a.shape[1]), int(b.shape[0]), int(a.shape[0]),
                        _itemsize(x.dtype), product_static=not ctx.swappable, peak_flops=o["peak_flops"],
                        bandwidth=o["bandwidth"])


def _itemsize(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float64": 8}.get(dtype, 4)


def _decide(node: ComputationNode, costs: dict[str, Any], ctx: RewriteContext) -> str:
    choice = "product" if costs["product"] < costs["low_rank"] else "low_rank"
    ctx.stats.setdefault("decisions", {})[node.name] = {"choice": choice, **costs}
    return choice


def _retag(meta: dict[str, Any], role: str) -> dict[str, Any]:
    """A tagged node's meta with a new role; an untagged node's stays empty."""
    return {**meta, "role": role} if meta else {}


def _check_low_rank(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    lm = LoRAMatch.from_match(m)
    if lm.op is not Op.LINEAR:
        return res.fail("Conv2d branches are not reassociated (Linear only)")
    if others := ctx.other_users(lm.down, lm.up):
        return res.fail(f"lora_down {lm.down.name!r} is also read by {others}")
    costs = _costs(lm.x, lm.A, lm.B, ctx)
    if _decide(lm.up, costs, ctx) != "product":
        return res.fail(f"low-rank form is cheaper ({costs['low_rank']:.3g} s <= product {costs['product']:.3g} s)")
    return res


def _to_product(m: Match, ctx: RewriteContext):
    lm = LoRAMatch.from_match(m)
    ba = ctx.weight(Op.MATMUL, [lm.B, lm.A], name=f"{lm.module}.lora_product")
    return ctx.add(Op.LINEAR, [lm.x, ba], name=f"{lm.up.name}.product", meta=_retag(lm.up.meta, "lora_product"))


def _check_product(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    costs = _costs(m["x"], m["A"], m["B"], ctx)
    if _decide(m.root, costs, ctx) != "low_rank":
        return res.fail(f"product form is cheaper ({costs['product']:.3g} s <= low-rank {costs['low_rank']:.3g} s)")
    return res


def _to_low_rank(m: Match, ctx: RewriteContext):
    lin = m.root
    h = ctx.add(Op.LINEAR, [m["x"], m["A"]], name=f"{lin.name}.down", meta=_retag(lin.meta, "lora_down"))
    return ctx.add(Op.LINEAR, [h, m["B"]], name=f"{lin.name}.up", meta=_retag(lin.meta, "lora_up"))


REASSOCIATE_TO_PRODUCT = Rule("reassociate-to-product", LORA_BRANCH, _to_product, _check_low_rank,
                              doc="Replaces Linear(Linear(x, A), B) with Linear(x, B@A) when cheaper.")
REASSOCIATE_TO_LOW_RANK = Rule("reassociate-to-low-rank", PRODUCT, _to_low_rank, _check_product,
                               doc="Replaces Linear(x, MatMul(B, A)) with Linear(Linear(x, A), B) when cheaper.")


@register_pass("reassociate-low-rank")
def reassociate_low_rank(graph: Graph, *, swappable: bool = False, peak_flops: float = 1e11,
                         bandwidth: float = 2e10, dynamic_dim_size: int = 32) -> PassResult:
    """Pick the cheaper association of each low-rank product; ``dynamic_dim_size`` stands for a named dim."""
    if not (peak_flops > 0 and bandwidth > 0 and dynamic_dim_size >= 1 and math.isfinite(peak_flops * bandwidth)):
        raise ValueError("reassociate-low-rank: peak_flops and bandwidth must be positive, dynamic_dim_size >= 1")
    opts = {"swappable": swappable, "peak_flops": peak_flops, "bandwidth": bandwidth, "dynamic_dim_size": dynamic_dim_size}
    return RuleSet([REASSOCIATE_TO_PRODUCT, REASSOCIATE_TO_LOW_RANK]).apply(graph, opts)
