"""Key/value caches that are past and present at once, for models whose attention appends in place.

A package model lowered with ``GroupQueryAttention`` (metadata ``flora_graph.cache_padding =
"right"``, :mod:`flora_graph.runtimes.ort_contrib`) reads each row's length from the
attention mask's row sums and, when its past and present cache are one buffer, writes the new
keys and values at each row's own position in that buffer: a decode step copies no cache. This is
what ONNX Runtime GenAI does with ``past_present_share_buffer``; :class:`SharedCache` does it for
:class:`~flora_graph.serving.generate.Batch` on plain ONNX Runtime, through an ``IOBinding`` per
(session, adapter) that binds each layer's buffer as both the past input and the present output.

ONNX Runtime's ``RunOptions`` adapters are not applied to ``IOBinding`` runs, so the binding
also holds the adapter's weights (or the mixed model's stacks and ``adapter_index``) as inputs;
it is made again when the rows, the buffers or the adapter behind it change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from flora_graph.serving.errors import ServingError
from flora_graph.serving.session import _ort_message

__all__ = ["SharedCache"]


class SharedCache:
    """Right-padded caches of a batch, ``[rows, kv_heads, capacity, head_dim]`` per past input.

    Args:
        past: the past input names, one per cache buffer.
        present: the present output names, in the same order.
    """

    def __init__(self, past: list[str], present: list[str]) -> None:
        self.past, self.present = past, present
        self.arrays: list[np.ndarray] = []
        self._values: list[ort.OrtValue] = []
        self._logits: np.ndarray | None = None
        self._bindings: dict[Any, tuple[object, ort.IOBinding, ort.OrtValue, Mapping[str, Any]]] = {}

    @property
    def capacity(self) -> int:
        """Positions each buffer holds (0 when empty)."""
        return int(self.arrays[0].shape[2]) if self.arrays else 0

    def set(self, arrays: list[np.ndarray]) -> None:
        """Use ``arrays`` (C-contiguous, one per past name) as the buffers; forgets every binding."""
        self.arrays = [np.ascontiguousarray(a) for a in arrays]
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # views: no copy
        self._bindings.clear()
        self._logits = None

    def grow(self, capacity: int) -> None:
        """Make the buffers hold at least ``capacity`` positions (zeros after the old ones)."""
        if capacity <= self.capacity:
            return
        self.set([np.concatenate([a, np.zeros((*a.shape[:2], capacity - a.shape[2], a.shape[3]), a.dtype)], axis=2)
                  for a in self.arrays])

    def run(self, session: ort.InferenceSession, key: Any, token: object, inputs: Callable[[], Mapping[str, Any]],
            feeds: Mapping[str, np.ndarray], vocab: tuple[int, np.dtype], where: Callable[[], str]) -> np.ndarray:
        """One call of ``session`` on ``feeds`` (the per-step inputs) with the buffers as past and present.

        ``key`` names the binding to reuse (a session and an adapter, say) and ``token`` the state
        behind it (the loaded adapter object): a binding made for another token is made again,
        binding ``inputs()`` (the adapter weights) once. Returns the logits ``[rows, 1, vocab]``,
        a buffer the next call overwrites. Raises :class:`ServingError` naming ``where()``.
        """
        held = self._bindings.get(key)
        if held is None or held[0] is not token:
            rows = int(self.arrays[0].shape[0])
            if self._logits is None or self._logits.shape[0] != rows:
                self._logits = np.empty((rows, 1, vocab[0]), vocab[1])
            io = session.io_binding()
            # held with the binding, which points at their memory; as OrtValues, since only those bind to
            # an overridable initializer (an adapter weight), which the numpy binding does not find
            bound = {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
                     for name, value in inputs().items()}
            for name, value in bound.items():
                io.bind_ortvalue_input(name, value)
            for past, present, value in zip(self.past, self.present, self._values, strict=True):
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            logits = ort.OrtValue.ortvalue_from_numpy(self._logits)
            io.bind_ortvalue_output("logits", logits)
            held = self._bindings[key] = (token, io, logits, bound)
        io = held[1]
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        try:
            session.run_with_iobinding(io)
        except Exception as exc:  # onnxruntime's pybind errors share no base class
            raise ServingError(f"{where()}: onnxruntime failed: {_ort_message(exc)}") from None
        return self._logits
