"""``verify(graph)``: the graph's lint. Raises ``GraphError`` naming the node at fault."""

from __future__ import annotations

import networkx as nx
import numpy as np

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir.graph import Graph, check_default, infer_node
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import DTYPES, Op, schema
from flora_graph.ir.shapes import canonical_dim, format_shape

__all__ = ["verify"]


def verify(graph: Graph) -> Graph:
    """Check acyclicity, defined inputs, arity, attributes, shapes, dtypes, weights and input defaults.

    Returns the graph so calls can be chained; raises :class:`GraphError` (or its
    subclass :class:`ShapeError`) whose message names the node at fault.
    """
    members = {id(n): n for n in graph.nodes}
    names: set[str] = set()
    for n in graph.nodes:
        if not isinstance(n, ComputationNode) or not isinstance(n.op, Op):
            raise GraphError(f"graph {graph.name!r}: {n!r} is not a ComputationNode with an Op")
        if n.name in names:
            raise GraphError(f"node name {n.name!r} is used twice")
        names.add(n.name)
        for i in n.inputs:
            if id(i) not in members:
                raise GraphError(f"node {n.name!r} reads {getattr(i, 'name', i)!r}, which is not defined in the graph")
    # Nodes in topological order make the graph acyclic; only when the order breaks is a
    # cycle search (networkx) needed, to tell a cycle from nodes out of order.
    seen: set[int] = set()
    for n in graph.nodes:
        for i in n.inputs:
            if id(i) not in seen:
                _check_acyclic(graph)
                raise GraphError(f"node {n.name!r} reads {i.name!r} before it is defined (nodes out of order)")
        seen.add(id(n))
    for n in graph.nodes:
        _check_node(graph, n)
    listed: set[int] = set()
    for inp in graph.inputs:
        if id(inp) not in members or inp.op is not Op.INPUT:
            raise GraphError(f"graph input {getattr(inp, 'name', inp)!r} is not an Input node of the graph")
        if id(inp) in listed:
            raise GraphError(f"graph input {inp.name!r} is listed twice in graph.inputs")
        listed.add(id(inp))
    for n in graph.nodes:
        if n.op is Op.INPUT and id(n) not in listed:
            raise GraphError(f"Input node {n.name!r} is not listed in graph.inputs")
    by_name = {n.name: n for n in graph.inputs}
    for name, default in graph.input_defaults.items():
        if name not in by_name:
            raise GraphError(f"graph {graph.name!r} has a default for {name!r}, which is not one of its inputs")
        check_default(by_name[name], default)
    if not graph.outputs:
        raise GraphError(f"graph {graph.name!r} has no outputs")
    for out_name, n in graph.outputs.items():
        if id(n) not in members:
            raise GraphError(f"output {out_name!r} refers to node {getattr(n, 'name', n)!r}, not in the graph")
    return graph


def _check_acyclic(graph: Graph) -> None:
    g = nx.DiGraph()
    g.add_nodes_from(id(n) for n in graph.nodes)
    by_id = {id(n): n for n in graph.nodes}
    for n in graph.nodes:
        g.add_edges_from((id(i), id(n)) for i in n.inputs)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = " -> ".join(by_id[a].name for a, _ in cycle)
    raise GraphError(f"graph has a cycle: {path} -> {by_id[cycle[0][0]].name}")


def _check_node(graph: Graph, n: ComputationNode) -> None:
    if n.dtype not in DTYPES:
        raise GraphError(f"node {n.name!r}: unknown dtype {n.dtype!r}")
    try:
        shape = tuple(canonical_dim(d) for d in n.shape)
    except ShapeError as exc:
        raise ShapeError(f"node {n.name!r}: {exc}") from None
    if n.op is Op.INPUT:
        schema(n.op).check_arity(len(n.inputs), n.name)
        if n.attrs:
            raise GraphError(f"Input node {n.name!r} takes no attributes, has {sorted(n.attrs)}")
        return
    if n.op is Op.CONST:
        schema(n.op).check_arity(len(n.inputs), n.name)
        attrs = schema(n.op).normalize_attrs(n.attrs, n.name)
        param = attrs["param"]
        if param not in graph.params:
            raise GraphError(f"Const node {n.name!r} refers to unknown param {param!r}")
        arr = graph.params[param]
        if not isinstance(arr, np.ndarray):
            raise GraphError(f"param {param!r} of node {n.name!r} is not a numpy array")
        if tuple(arr.shape) != shape or str(arr.dtype) != n.dtype:
            raise ShapeError(
                f"Const node {n.name!r} declares {n.dtype}{format_shape(shape)} but param {param!r} "
                f"is {arr.dtype}{format_shape(arr.shape)}"
            )
        return
    attrs, want_shape, want_dtype = infer_node(n.op, n.inputs, n.attrs, n.name)
    if attrs != n.attrs:
        raise GraphError(f"node {n.name!r}: attributes {n.attrs} are not normalized (expected {attrs})")
    if want_shape != shape:
        raise ShapeError(
            f"node {n.name!r} ({n.op.value}) declares shape {format_shape(n.shape)}, "
            f"its inputs give {format_shape(want_shape)}"
        )
    if want_dtype != n.dtype:
        raise ShapeError(f"node {n.name!r} ({n.op.value}) declares dtype {n.dtype}, its inputs give {want_dtype}")
