"""Mixed-adapter batches: rows that use different adapters, served by one ONNX Runtime call.

The model is a :func:`~flora_graph.serving.export.export_mixed` export. A
:class:`MixedAdapterSession` holds a set of adapters stacked per module
(:func:`stack_adapters`, once per set) and feeds the stacks with a per-row
``adapter_index`` on every call (contiguous numpy arrays cross into ONNX Runtime without
a copy on CPU; pre-made ``OrtValue``\\ s measured no faster). Changing the set restacks
in numpy and swaps one reference, so calls in flight keep the set they started with;
``run`` is thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flora_graph.serving.errors import AdapterIndexError, ServingError, UnknownAdapterError
from flora_graph.serving.export import INDEX_INPUT, stack_names
from flora_graph.serving.session import AdapterSource, ModelSource, OrtModel, load_params
from flora_graph.serving.slots import LoRASlot, packed_from_metadata, param_spec, slots_from_metadata

__all__ = ["NO_ADAPTER", "MixedAdapterSession", "stack_adapters"]

NO_ADAPTER = -1
"""The ``adapter_index`` of a row that uses no adapter."""


def stack_adapters(slots: Sequence[LoRASlot], adapters: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The stacked inputs of the mixed export for ``adapters`` (validated params, in index order).

    Per slot, ``R`` is the largest rank any adapter gives the module (at least 1) and there
    are ``len(adapters) + 1`` slots, the last all zeros (index ``-1``). A ``Linear`` slot
    stacks ``A.T`` as ``[slots, in, R]`` and ``B.T`` as ``[slots, R, out]``; a ``Conv2d``
    slot stacks ``A`` as ``[slots, R, kh*kw*C]`` (taps major, the patch order of the
    export) and ``B`` as ``[slots, out, R]``. Lower
    ranks are zero-padded, which adds exact zeros; an adapter without a module is zeros there.
    """
    out: dict[str, np.ndarray] = {}
    n = len(adapters) + 1
    for s in slots:
        ranks = [int(p[s.a_name].shape[0]) for p in adapters if s.a_name in p]
        r = max([1, *ranks])
        dt = np.dtype(s.dtype)
        a_name, b_name = stack_names(s)
        if s.kind == "conv":
            a = np.zeros((n, r, int(np.prod(s.in_dims))), dt)
            b = np.zeros((n, s.out, r), dt)
        else:
            a = np.zeros((n, *s.in_dims, r), dt)
            b = np.zeros((n, r, s.out), dt)
        for k, p in enumerate(adapters):
            if s.a_name not in p:
                continue
            pa, pb = p[s.a_name], p[s.b_name]
            rk = pa.shape[0]
            if s.kind == "conv":
                a[k, :rk] = pa.transpose(0, 2, 3, 1).reshape(rk, -1)
                b[k, :, :rk] = pb.reshape(s.out, rk)
            else:
                a[k, :, :rk] = pa.T
                b[k, :rk, :] = pb.T
        out[a_name], out[b_name] = a, b
    return out


@dataclass(frozen=True)
class _AdapterSet:
    names: tuple[str, ...]
    index: dict[str, int]
    feeds: dict[str, np.ndarray] = field(repr=False)  # the stacked weights


class MixedAdapterSession:
    """An ONNX Runtime session over a mixed export; each row of a call names its adapter.

    Args:
        model: the mixed ONNX model (path, bytes or ``ModelProto``); its slots come from its metadata.
        adapters: ``{name: .onnx_adapter path or {param: array}}``, in index order.
        require_checksum: refuse adapter files without a checksum file (as for ``AdapterSession``).
        **options: session options as for :class:`~flora_graph.serving.session.AdapterSession`.
    """

    def __init__(self, model: ModelSource, adapters: Mapping[str, AdapterSource] | None = None, *,
                 require_checksum: bool = False, **options: Any) -> None:
        self.require_checksum = require_checksum
        self.model = OrtModel(model, **options)
        kind, self.slots = slots_from_metadata(self.model.metadata, self.model.where)
        if kind != "mixed" or INDEX_INPUT not in self.model.inputs:
            raise ServingError(f"{self.model.where} is a {kind!r} export, not a mixed one (export_mixed)")
        self.spec = param_spec(self.slots)
        self.spec.unpacks = packed_from_metadata(self.model.metadata, self.model.where)  # files packed for model.onnx
        self._stacked = {n for s in self.slots for n in stack_names(s)}
        self._request = [n for n in self.model.inputs if n != INDEX_INPUT and n not in self._stacked]
        self._lock = threading.Lock()
        self._set = self._build({})
        if adapters:
            self.set_adapters(adapters)

    def _build(self, params: Mapping[str, Mapping[str, np.ndarray]]) -> _AdapterSet:
        feeds = stack_adapters(self.slots, list(params.values()))
        names = tuple(params)
        return _AdapterSet(names, {n: i for i, n in enumerate(names)}, feeds)

    @property
    def adapter_names(self) -> list[str]:
        """The adapters of the current set, in index order."""
        return list(self._set.names)

    @property
    def input_names(self) -> list[str]:
        """The inputs a request gives (``adapter_index`` and stacked weights excluded)."""
        return list(self._request)

    def set_adapters(self, adapters: Mapping[str, AdapterSource]) -> None:
        """Replace the adapter set (index order = mapping order); validated before anything changes.

        Raises :class:`~flora_graph.serving.errors.AdapterFileError` naming the adapter that
        does not fit; the previous set keeps serving.
        """
        params = {}
        for name, source in adapters.items():
            if not isinstance(name, str) or not name:
                raise ServingError(f"adapter name must be a non-empty str, got {name!r}")
            params[name] = load_params(source, self.spec, name, require_checksum=self.require_checksum)
        new = self._build(params)
        with self._lock:
            self._set = new

    def indices(self, adapters: str | Sequence[str | None] | None, rows: int) -> np.ndarray:
        """Per-row ``adapter_index`` for adapter names (``None``: no adapter; one name: every row)."""
        return self._indices(self._set, adapters, rows)

    def run(self, inputs: Mapping[str, Any], adapters: str | Sequence[str | None] | None = None, *,
            adapter_index: Sequence[int] | np.ndarray | None = None, prepared: bool = False) -> dict[str, np.ndarray]:
        """Run one batch whose row ``i`` uses ``adapters[i]`` (a name or ``None``), or raw ``adapter_index``.

        ``prepared``: ``inputs`` are exactly the request inputs, contiguous numpy arrays of the
        declared dtypes, passed on unchecked (as for :meth:`.AdapterSession.run`).

        Raises :class:`UnknownAdapterError` / :class:`AdapterIndexError` naming the row and
        adapter, :class:`ServingError` for bad inputs; the session keeps serving afterwards.
        """
        current = self._set  # one read: a concurrent set_adapters does not mix two sets in one call
        feeds = dict(inputs) if prepared else self.model.feeds(inputs, self._request)
        first = next(iter(feeds.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        if adapter_index is not None:
            if adapters is not None:
                raise ServingError("give adapter names or adapter_index, not both")
            idx = np.asarray(adapter_index)
            if idx.shape != (rows,) or idx.dtype.kind not in "iu":
                raise AdapterIndexError(f"adapter_index must be {rows} ints (one per row), got {idx.dtype} {list(idx.shape)}")
            bad = np.flatnonzero((idx < NO_ADAPTER) | (idx >= len(current.names)))
            if bad.size:
                row = int(bad[0])
                raise AdapterIndexError(f"row {row}: adapter index {int(idx[row])} is out of range; this session's "
                                        f"{len(current.names)} adapters {list(current.names)} take 0..{len(current.names) - 1} "
                                        f"(-1: no adapter)")
            idx = idx.astype(np.int64)
        else:
            idx = self._indices(current, adapters, rows)
        feeds[INDEX_INPUT] = idx
        feeds.update(current.feeds)
        return self.model.run(feeds, None, lambda: f"mixed batch with adapters {sorted({current.names[i] for i in idx if i >= 0})}")

    def adapter_inputs(self, adapters: Sequence[str | None]) -> tuple[object, dict[str, np.ndarray]]:
        """``(token, {input: array})``: the stacked weights and the ``adapter_index`` of rows using
        ``adapters``, for an ``IOBinding`` run; ``token`` is the adapter set (a new object after
        :meth:`set_adapters`). Raises :class:`UnknownAdapterError` naming the row."""
        current = self._set
        return current, {INDEX_INPUT: self._indices(current, list(adapters), len(adapters)), **current.feeds}

    def _indices(self, current: _AdapterSet, adapters: str | Sequence[str | None] | None, rows: int) -> np.ndarray:
        if adapters is None or isinstance(adapters, str):
            adapters = [adapters] * rows
        if len(adapters) != rows:
            raise ServingError(f"{len(adapters)} adapter names for a batch of {rows} rows")
        out = np.empty(rows, np.int64)
        for row, name in enumerate(adapters):
            if name is None:
                out[row] = NO_ADAPTER
            elif name in current.index:
                out[row] = current.index[name]
            else:
                raise UnknownAdapterError(f"row {row}: adapter {name!r} is not in this session's set {list(current.names)}")
        return out
