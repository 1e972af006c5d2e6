"""pack-linears: Sibling ``Linear`` layers with static weights that read one input become one ``Linear`` + ``Split``.

The q/k/v projections of an attention block (and the gate/up projections of a gated MLP)
read the same activation: at decode (one token) three ``MatMul``\\ s cost more in dispatch
than one over the concatenated weight. This pass makes ``Linear(x, W_i, b_i)`` for siblings
``i = 1..n``

``Split(Linear(x, Concat(W_1..W_n), Concat(b_1..b_n)), sizes=(out_1..out_n))``

The weights stay static (the ``Concat`` is folded where the model is written), and each
output is the same dot products as before, so the values are equal up to the summation order
the concatenated ``MatMul`` picks. It is what :mod:`~flora_graph.passes.pack_slots` does for
the base layers of adapter slots; this pass packs the layers outside slots (a model without
adapters, the per-row adapter slots of a mixed export, whose bases are then ``Split`` pieces).

Packed: ``Linear`` nodes of one input, dtype, bias presence and attributes whose weight and
bias are static and that are not a graph output themselves, in groups of at least two; the
packed layer goes where the first member was, so every reader still follows its producer.
"""

from __future__ import annotations

import time

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.passes.adapter_slots import rewire
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import schedule, static_nodes

__all__ = ["concat_linears", "pack_linears"]

_NAME = "pack-linears"


def _groups(graph: Graph) -> list[list[ComputationNode]]:
    """Packable ``Linear`` siblings, grouped by (input, dtype, bias presence, attributes), in graph order."""
    static = static_nodes(graph)
    outputs = {id(n) for n in graph.outputs.values()}
    groups: dict[tuple, list[ComputationNode]] = {}
    for n in graph.nodes:
        if n.op is not Op.LINEAR or id(n) in outputs or not all(w in static for w in n.inputs[1:]):
            continue
        if len(n.shape) < 1 or not isinstance(n.shape[-1], int):
            continue
        key = (id(n.inputs[0]), n.dtype, len(n.inputs), tuple(sorted(n.attrs.items())))
        groups.setdefault(key, []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def concat_linears(graph: Graph, linears: list[ComputationNode], name: str, meta: dict) -> ComputationNode:
    """One ``Linear`` of ``linears[0]``'s input over their weights (and biases) concatenated along the
    output dim (``Concat`` nodes ``<name>.w1``, ``<name>.w2``), named ``name``; the members are left as they are."""
    first = linears[0]
    parts = [graph.add(Op.CONCAT, [n.inputs[k] for n in linears], {"axis": 0}, name=f"{name}.w{k}")
             for k in range(1, len(first.inputs))]
    return graph.add(Op.LINEAR, [first.inputs[0], *parts], first.attrs, name=name, meta=meta)


@register_pass(_NAME)
def pack_linears(graph: Graph) -> PassResult:
    """Pack sibling static ``Linear`` layers; stats ``packed`` lists each packed group's node names."""
    t0 = time.perf_counter()
    repl: dict[ComputationNode, ComputationNode] = {}
    packed: list[list[str]] = []
    for group in _groups(graph):
        joined = concat_linears(graph, group, "+".join(n.name for n in group), dict(group[0].meta))
        sizes = tuple(int(n.shape[-1]) for n in group)
        for i, n in enumerate(group):
            repl[n] = graph.add(Op.SPLIT, [joined], {"axis": -1, "sizes": sizes, "index": i}, name=f"{n.name}.piece",
                                meta=dict(n.meta))
        packed.append([n.name for n in group])
    if repl:
        rewire(graph, repl)
        schedule(graph)
        graph.remove_dead()
    stats = {"fired": {_NAME: len(packed)} if packed else {}, "packed": packed, "time_s": time.perf_counter() - t0}
    return PassResult(graph, bool(packed), stats)
