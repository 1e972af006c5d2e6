"""Runtimes: backends that execute a :class:`~flora_graph.ir.Graph`.

``reference`` is the numpy interpreter, the executable definition of every op;
``compile(graph, backend)`` gives every backend one interface (:class:`Executable`).
"""

from __future__ import annotations

from flora_graph.runtimes.executable import BACKENDS, Executable, compile, register_backend
from flora_graph.runtimes.numpy_backend import ReferenceExecutable
from flora_graph.runtimes.reference import NUMPY_IMPLS, check_inputs, run

__all__ = [
    "BACKENDS",
    "NUMPY_IMPLS",
    "Executable",
    "ReferenceExecutable",
    "check_inputs",
    "compile",
    "register_backend",
    "run",
]
