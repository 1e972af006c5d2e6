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


def __getattr__(name: str):
    """``flora_graph.jit`` is imported on first use: it pulls in torch, which ``import flora_graph`` does not."""
    if name == "jit":
        from flora_graph.jit.module import jit

        globals()["jit"] = jit  # importing the subpackage bound its module here; the function wins
        return jit
    raise AttributeError(f"module 'flora_graph' has no attribute {name!r}")
