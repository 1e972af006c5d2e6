"""The ``numpy`` backend: the reference interpreter behind the common ``Executable`` interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flora_graph.ir import Graph
from flora_graph.runtimes.executable import Executable, register_backend
from flora_graph.runtimes.reference import run

__all__ = ["ReferenceExecutable"]


class ReferenceExecutable(Executable):
    """Runs a graph with the numpy reference interpreter; ``save`` writes the graph itself."""

    backend = "numpy"

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self.graph, inputs)

    def save(self, path: str | Path) -> Path:
        """Write the graph (``graph.json`` + ``weights.safetensors``) into directory ``path``."""
        self.graph.save(path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceExecutable:
        """An executable over the graph saved at ``path``."""
        return cls(Graph.load(path))


@register_backend("numpy")
def _factory(graph: Graph, **options: Any) -> ReferenceExecutable:
    if options:
        raise TypeError(f"the numpy backend takes no options, got {sorted(options)}")
    return ReferenceExecutable(graph)
