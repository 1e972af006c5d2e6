"""Typed errors of flora_graph, all under one :class:`FloraGraphError`.

Every message names the node, module or file at fault, so that a user reading a traceback
knows where to look without a debugger.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "ArtifactWriteError",
    "ChunkCountFixedError",
    "FloraGraphError",
    "GraphError",
    "ModelFolderError",
    "RuntimeInputError",
    "ShapeError",
    "UnsafeNameError",
    "UnsupportedOpError",
]


class FloraGraphError(Exception):
    """Base class of every error flora_graph raises on purpose."""


class GraphError(FloraGraphError):
    """A graph is malformed: a cycle, an undefined input, a bad attribute, a corrupt file."""


class ShapeError(GraphError):
    """Shapes or dtypes that do not fit an op's schema."""


class ChunkCountFixedError(ShapeError):
    """torch.export fixed a scan's chunk count (``((seq+63)//64)``) to the example's where capture could not bound
    the dim to it: the program holds up to one chunk, ``chunk`` positions of dim ``dim`` (capture with that
    ``dim_max``, or an example of several chunks where the scan runs over all of them at once)."""

    def __init__(self, message: str, dim: str, chunk: int) -> None:
        super().__init__(message)
        self.dim, self.chunk = dim, chunk


class UnsupportedOpError(FloraGraphError):
    """A model uses ops outside the capture table.

    ``ops`` maps each unsupported op name to the places (module paths or node names)
    where it occurs.
    """

    def __init__(self, message: str, ops: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.ops: dict[str, list[str]] = dict(ops or {})


class AdapterError(FloraGraphError):
    """A LoRA/Flora adapter was configured or used wrongly (names the module)."""


class ModelFolderError(FloraGraphError):
    """A model folder cannot be loaded: no config, no safetensors weights, an unusable ``architectures`` entry, a
    quantized checkpoint it cannot read."""


class RuntimeInputError(FloraGraphError):
    """Inputs handed to a compiled graph are missing, unknown, mis-shaped or mistyped."""


class ArtifactWriteError(FloraGraphError, OSError):
    """An artifact could not be written (disk full, read-only, permission, a file where a folder goes).

    The message names the destination; ``errno``, ``strerror`` and ``filename`` are those of the
    underlying ``OSError``. It is an ``OSError`` too, so callers that catch ``OSError`` keep
    working. The destination holds what it held before the failed write (see
    :mod:`flora_graph.storage`).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsafeNameError(FloraGraphError, ValueError):
    """A name that would become a file or folder name is not one plain path component."""
