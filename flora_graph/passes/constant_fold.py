"""constant-fold: Replaces a node whose inputs are all ``Const`` with a ``Const`` of its value.

Values come from the numpy reference implementations (the living spec of each op), so a
folded graph computes what the unfolded one did. Chains fold in one walk. A result with
more than ``max_elements`` values is left alone (refused with the reason). An adapter slot
reads graph inputs (its weights), so it never folds.
"""

from __future__ import annotations

import time

import numpy as np

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.shapes import is_static
from flora_graph.ops import eval_node
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext

__all__ = ["constant_fold"]


@register_pass("constant-fold")
def constant_fold(graph: Graph, *, max_elements: int = 1 << 24) -> PassResult:
    """Fold every all-``Const`` node into a new param named after the node; stats ``folded``."""
    t0 = time.perf_counter()
    ctx = RewriteContext(graph)
    values: dict[ComputationNode, np.ndarray] = {}
    refused: dict[str, str] = {}
    folded = 0
    for n in list(graph.nodes):
        if n.op is Op.CONST:
            values[n] = graph.params[n.attrs["param"]]
            continue
        if n.op is Op.INPUT or not n.inputs or not all(i in values for i in n.inputs):
            continue
        if not is_static(n.shape):  # Expand(Const, ("batch", 4)): its size comes from the inputs at run time
            continue
        size = int(np.prod([int(d) for d in n.shape], dtype=np.int64))
        if size > max_elements:
            refused[n.name] = f"constant-fold: result has {size} values > max_elements={max_elements}"
            continue
        value = eval_node(n, [values[i] for i in n.inputs])
        const = ctx.new_const(n.name, value, **n.meta)
        values[n] = values[const] = value
        ctx.replace(n, const)
        folded += 1
    changed = ctx.commit()
    stats = {"fired": {"constant-fold": folded} if folded else {}, "refused": refused, "folded": folded,
             "time_s": time.perf_counter() - t0}
    return PassResult(graph, changed, stats)
