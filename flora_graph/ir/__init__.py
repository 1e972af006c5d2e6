"""The IR: ``ComputationNode``, ``Graph``, the ``Op`` set with schemas, ``verify``, files."""

from __future__ import annotations

from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import DTYPES, FLOAT_DTYPES, SCHEMAS, Op, OpGroup, OpSchema, schema
from flora_graph.ir.printer import format_graph
from flora_graph.ir.serialize import load_graph, save_graph
from flora_graph.ir.shapes import Dim, Shape, broadcast_shapes, canonical_dim
from flora_graph.ir.verify import verify

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "SCHEMAS",
    "ComputationNode",
    "Dim",
    "Graph",
    "Op",
    "OpGroup",
    "OpSchema",
    "Shape",
    "broadcast_shapes",
    "canonical_dim",
    "format_graph",
    "load_graph",
    "save_graph",
    "schema",
    "verify",
]
