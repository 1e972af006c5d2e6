"""constant-fold: Replaces a node whose inputs are all ``Const`` with a ``Const`` of its value.

Values come from the numpy reference implementations (the living spec of each op), so a
folded graph computes what the unfolded one did. Chains fold in one walk. A result with
more than ``max_elements`` values is left alone (refused with the reason). An adapter slot
reads graph inputs (its weights), so it never folds.
"""

from __future__ import annotations

import time

from flora_graph.ir import Graph, Op
from flora_graph.ops.evaluate import fold_static
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext

__all__ = ["constant_fold"]


@register_pass("constant-fold")
def constant_fold(graph: Graph, *, max_elements: int = 1 << 24) -> PassResult:
    """Fold every all-``Const`` node into a new param named after the node; stats ``folded``."""
    t0 = time.perf_counter()
    ctx = RewriteContext(graph)
    values, refused = fold_static(graph.params, list(graph.nodes), max_elements)
    folded = 0
    for n, value in values.items():
        if n.op is Op.CONST:
            continue
        ctx.replace(n, ctx.new_const(n.name, value, **n.meta))
        folded += 1
    changed = ctx.commit()
    stats = {"fired": {"constant-fold": folded} if folded else {}, "refused": refused, "folded": folded,
             "time_s": time.perf_counter() - t0}
    return PassResult(graph, changed, stats)
