"""flora_graph: a LoRA-aware graph compiler for PyTorch models."""

from __future__ import annotations

from flora_graph import ops  # noqa: F401  (declares every op; the IR holds only the leaves)
from flora_graph._lazy import lazy_exports
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


# ``flora_graph.jit`` is a function (the JIT package is ``flora_graph.torch_jit``), imported on first use: it pulls in
# torch, which ``import flora_graph`` does not
__getattr__, __dir__ = lazy_exports(__name__, {"jit": "flora_graph.torch_jit.module"})
