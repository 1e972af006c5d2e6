"""Runtimes: the backend drivers that execute or lower a :class:`~flora_graph.ir.Graph`.

Every op's rules live with the op in :mod:`flora_graph.ops`; this package holds only the
drivers: ``reference`` (the numpy interpreter loop), ``onnx_lowering`` (the ONNX lowering
context), ``onnx_writer`` (the one ONNX file writer), ``torch_lowering`` (the torch code
generator) and the backends over them. ``compile(graph, backend)`` gives every backend one
interface (:class:`Executable`). No backend runs a pass.
"""

from __future__ import annotations

from flora_graph.runtimes.executable import BACKENDS, Executable, compile, register_backend
from flora_graph.runtimes.numpy_backend import ReferenceExecutable
from flora_graph.runtimes.reference import check_inputs, run

__all__ = [
    "BACKENDS",
    "Executable",
    "ReferenceExecutable",
    "check_inputs",
    "compile",
    "register_backend",
    "run",
]
