"""flora_graph: a LoRA-aware graph compiler for PyTorch models."""

from __future__ import annotations

from flora_graph.errors import (
    AdapterError,
    FloraGraphError,
    GraphError,
    RuntimeInputError,
    ShapeError,
    UnsupportedOpError,
)
from flora_graph.ir import ComputationNode, Graph, Op, verify
from flora_graph.jit import jit

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ComputationNode",
    "FloraGraphError",
    "Graph",
    "GraphError",
    "Op",
    "RuntimeInputError",
    "ShapeError",
    "UnsupportedOpError",
    "__version__",
    "jit",
    "verify",
]
