"""dce: Replaces the graph with the part its outputs depend on (dead nodes and unused params dropped).

Graph inputs always stay, even when nothing reads them (they are the graph's signature);
the stats record them under ``refused``.
"""

from __future__ import annotations

import time

from flora_graph.ir import Graph
from flora_graph.passes.base import PassResult, register_pass

__all__ = ["dce"]


@register_pass("dce")
def dce(graph: Graph) -> PassResult:
    """Remove nodes no output depends on and params no ``Const`` reads; stats count both."""
    t0 = time.perf_counter()
    params = len(graph.params)
    read = {id(i) for n in graph.nodes for i in n.inputs} | {id(n) for n in graph.outputs.values()}
    refused = {n.name: "dce: graph inputs stay even when unused" for n in graph.inputs if id(n) not in read}
    removed = graph.remove_dead()
    dropped = params - len(graph.params)
    stats = {"fired": {"dce": removed} if removed else {}, "refused": refused, "removed_nodes": removed,
             "removed_params": dropped, "time_s": time.perf_counter() - t0}
    return PassResult(graph, bool(removed or dropped), stats)
