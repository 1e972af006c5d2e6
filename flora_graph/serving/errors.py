"""Errors of the serving layer, all under :class:`ServingError` (a :class:`~flora_graph.errors.FloraGraphError`).

Every message names the adapter (and the file or parameter) at fault. A session that
raised one of these keeps serving: nothing it holds is changed by a refused request.
"""

from __future__ import annotations

from flora_graph.errors import FloraGraphError

__all__ = ["AdapterChecksumWarning", "AdapterFileError", "AdapterIndexError", "ServingError", "UnknownAdapterError"]


class ServingError(FloraGraphError):
    """A serving export, artifact or request failed (names the adapter, module or file)."""


class AdapterFileError(ServingError):
    """An adapter (file or dict of weights) does not fit the model: unreadable, truncated, wrong names or shapes."""


class UnknownAdapterError(ServingError):
    """A request names an adapter that is not loaded."""


class AdapterIndexError(ServingError):
    """A per-row adapter index is outside ``[-1, n_adapters)`` (``-1``: no adapter)."""


class AdapterChecksumWarning(UserWarning):
    """An ``.onnx_adapter`` file has no checksum file beside it, so corruption cannot be detected.

    Files written before checksums existed, or by other tools, load with this warning;
    ``require_checksum=True`` refuses them instead.
    """
