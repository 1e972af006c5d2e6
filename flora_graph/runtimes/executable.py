"""One interface for every backend: ``compile(graph, backend) -> Executable``.

An :class:`Executable` is callable on named numpy arrays or torch tensors (one mapping,
keywords, or both) and returns ``{output name: numpy array}``. Inputs are checked against
the graph's declared names, ranks, static dims, named dims (each within its ``graph.dim_max``
bound) and dtypes *before* a backend sees them, so a bad input is a :class:`RuntimeInputError` naming the input, never a
backend's stack dump. Backends register themselves with :func:`register_backend`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flora_graph._lazy import import_on_demand
from flora_graph.errors import FloraGraphError, RuntimeInputError
from flora_graph.ir import Graph, verify
from flora_graph.runtimes.reference import check_inputs

__all__ = ["BACKENDS", "Executable", "check_inputs", "compile", "register_backend"]


class Executable(abc.ABC):
    """A compiled graph: ``exe(x=...)`` or ``exe({"x": ...})`` -> ``{name: np.ndarray}``."""

    backend: str = ""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    @property
    def input_names(self) -> list[str]:
        """Names of the graph inputs, in order."""
        return [n.name for n in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in order."""
        return list(self.graph.outputs)

    def __call__(self, inputs: Mapping[str, Any] | None = None, /, **kwargs: Any) -> dict[str, np.ndarray]:
        """Validate the named inputs, then run the backend."""
        if inputs is not None and not isinstance(inputs, Mapping):
            raise RuntimeInputError(f"inputs must be a mapping {{input name: array}} or keywords, got "
                                    f"{type(inputs).__name__}; graph {self.graph.name!r} takes {self.input_names}")
        both = set(inputs or {}) & set(kwargs)
        if both:
            raise RuntimeInputError(f"input(s) {sorted(both)} given both in the mapping and as keywords")
        arrays, _dims = check_inputs(self.graph, {**(inputs or {}), **kwargs})
        return self._run(arrays)

    @abc.abstractmethod
    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on validated inputs (already cast to the declared dtypes)."""

    @abc.abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the backend's artifact (atomically) and return the path written."""


BackendFactory = Callable[..., Executable]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Register ``factory(graph, **options) -> Executable`` as backend ``name``."""

    def deco(factory: BackendFactory) -> BackendFactory:
        BACKENDS[name] = factory
        return factory

    return deco


_BUILTIN = {
    "numpy": "flora_graph.runtimes.numpy_backend",
    "onnxruntime": "flora_graph.runtimes.onnxrt",
    "torchscript": "flora_graph.runtimes.torch_backend",
    "torch-export": "flora_graph.runtimes.torch_backend",
}


def compile(graph: Graph, backend: str = "numpy", **options: Any) -> Executable:
    """Lower a verified ``graph`` for ``backend`` (``numpy``, ``onnxruntime``, ``torchscript``, ``torch-export``).

    A built-in backend's module is imported on first use (it registers itself), so using
    one backend never imports another's dependencies.
    """
    if backend not in BACKENDS and backend in _BUILTIN:
        import_on_demand(_BUILTIN[backend])
    if backend not in BACKENDS:
        raise FloraGraphError(f"unknown backend {backend!r}; available: {sorted(set(BACKENDS) | set(_BUILTIN))}")
    verify(graph)
    return BACKENDS[backend](graph, **options)
