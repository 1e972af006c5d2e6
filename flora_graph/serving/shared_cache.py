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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from flora_graph.runtimes.onnxrt import ort_message
from flora_graph.serving.errors import ServingError

__all__ = ["SharedCache"]


class SharedCache:
    """Right-padded caches of a batch, ``[rows, kv_heads, capacity, head_dim]`` per past input, and the
    step inputs that go with them, all bound once per (session, adapter) and updated in place.

    The attention mask is ``[rows, capacity]`` with ones on each row's filled positions: the model
    reads its row sums (the lengths) and its width (the buffers' length), so a step writes one 1
    per row instead of growing the mask, and writes each row's token into ``input_ids``.

    Args:
        past: the past input names, one per cache buffer.
        present: the present output names, in the same order.
        id_dtype, mask_dtype: the dtypes of ``input_ids`` and ``attention_mask``.
        position_dtype: that of ``position_ids`` (fed as each row's length), or ``None`` when the
            model does not take them (its attention applies the rotary embedding itself).
    """

    def __init__(self, past: list[str], present: list[str], id_dtype: np.dtype, mask_dtype: np.dtype,
                 position_dtype: np.dtype | None = None) -> None:
        self.past, self.present = past, present
        self._dtypes = (id_dtype, mask_dtype, position_dtype)
        self.arrays: list[np.ndarray] = []
        self._values: list[ort.OrtValue] = []
        self._step: dict[str, np.ndarray] = {}
        self._rows = np.arange(0)  # row indices, for writing one mask position per row
        self._logits: np.ndarray | None = None
        self._bindings: dict[Any, tuple[object, ort.IOBinding, tuple[Any, ...]]] = {}

    @property
    def capacity(self) -> int:
        """Positions each buffer holds (0 when empty)."""
        return int(self.arrays[0].shape[2]) if self.arrays else 0

    def set(self, arrays: list[np.ndarray], lengths: Sequence[int]) -> None:
        """Use ``arrays`` (one per past name, row ``i`` filled up to ``lengths[i]``) as the buffers;
        forgets every binding."""
        self.arrays = [np.ascontiguousarray(a) for a in arrays]
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # views: no copy
        rows, ids, masks, positions = len(lengths), *self._dtypes
        self._step = {"input_ids": np.zeros((rows, 1), ids),
                      "attention_mask": (np.arange(self.capacity)[None, :] < np.asarray(lengths)[:, None]).astype(masks)}
        if positions is not None:
            self._step["position_ids"] = np.zeros((rows, 1), positions)
        self._rows = np.arange(rows)
        self._bindings.clear()
        self._logits = None

    def run(self, session: ort.InferenceSession, key: Any, token: object, inputs: Callable[[], Mapping[str, Any]],
            tokens: list[int], lengths: Sequence[int], vocab: tuple[int, np.dtype], where: Callable[[], str]) -> np.ndarray:
        """One call of ``session``: row ``i`` feeds ``tokens[i]`` at position ``lengths[i]``, the buffers
        are past and present. The buffers must have room (``lengths < capacity``, see :meth:`set`).

        ``key`` names the binding to reuse (a session and an adapter, say) and ``token`` the state
        behind it (the loaded adapter object): a binding made for another token is made again,
        binding ``inputs()`` (the adapter weights) once. Returns the logits ``[rows, 1, vocab]``,
        a buffer the next call overwrites. Raises :class:`ServingError` naming ``where()``.
        """
        held = self._bindings.get(key)
        if held is None or held[0] is not token:
            if self._logits is None:
                self._logits = np.empty((len(self._rows), 1, vocab[0]), vocab[1])
            io = session.io_binding()
            # held with the binding, which points at their memory; as OrtValues, since only those bind to
            # an overridable initializer (an adapter weight), which the numpy binding does not find
            bound = {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
                     for name, value in {**inputs(), **self._step}.items()}
            for name, value in bound.items():
                io.bind_ortvalue_input(name, value)
            for past, present, value in zip(self.past, self.present, self._values, strict=True):
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            logits = ort.OrtValue.ortvalue_from_numpy(self._logits)
            io.bind_ortvalue_output("logits", logits)
            held = self._bindings[key] = (token, io, (bound, logits))
        step = self._step
        if len(tokens) == 1:  # one row: scalar writes, a few times cheaper than the indexed ones
            n = lengths[0]
            step["input_ids"][0, 0] = tokens[0]
            step["attention_mask"][0, n] = 1
            if "position_ids" in step:
                step["position_ids"][0, 0] = n
        else:
            step["input_ids"][:, 0] = tokens
            step["attention_mask"][self._rows, lengths] = 1
            if "position_ids" in step:
                step["position_ids"][:, 0] = lengths
        try:
            session.run_with_iobinding(held[1])
        except Exception as exc:  # onnxruntime's pybind errors share no base class
            raise ServingError(f"{where()}: onnxruntime failed: {ort_message(exc)}") from None
        return self._logits
