"""Mixed-adapter batches: rows that use different adapters, served by one ONNX Runtime call.

The model is a :func:`~flora_graph.serving.export.export_mixed` export. A
:class:`MixedAdapterSession` holds a set of adapters stacked per module
(:func:`stack_adapters`, once per set) and feeds the stacks with a per-row
``adapter_index`` on every call (contiguous numpy arrays cross into ONNX Runtime without
a copy on CPU; pre-made ``OrtValue``\\ s measured no faster). Changing the set restacks
in numpy and swaps one reference, so calls in flight keep the set they started with;
``run`` is thread-safe.

With ``per_row_weights=True`` the session serves the model as :func:`per_row_inputs` rewrites
it: each row's weights are inputs, gathered from the stacks in numpy instead of by the model's
``Gather`` of every slot on every call. A decode loop that keeps its rows for many steps
(:class:`~flora_graph.serving.generate.Generator`) gathers them once per set of rows
(:meth:`MixedAdapterSession.adapter_inputs`), at the price of holding ``rows x`` one adapter's
weights while those rows decode. Those are cut to the largest rank among the rows' adapters (the stacks
are padded to the set's largest), so a batch does not read the zero padding of an adapter it does not use.

With ``group_rows=True`` the ``Linear`` slots run as :func:`~flora_graph.serving.grouped.group_rows` rewrites them:
the rows of one adapter together on its weights, fed once a call however many rows use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from flora_graph.runtimes import huge_pages
from flora_graph.runtimes.onnx_writer import subgraphs
from flora_graph.serving import grouped
from flora_graph.serving.errors import AdapterIndexError, ServingError, UnknownAdapterError
from flora_graph.serving.export import INDEX_INPUT, stack_names, stacked_inputs
from flora_graph.serving.session import AdapterSource, ModelSource, OrtModel, load_params
from flora_graph.serving.slots import LoRASlot, packed_from_metadata, param_spec, slots_from_metadata

__all__ = ["NO_ADAPTER", "ROWS_SUFFIX", "MixedAdapterSession", "per_row_inputs", "stack_adapters"]

NO_ADAPTER = -1
"""The ``adapter_index`` of a row that uses no adapter."""

ROWS_SUFFIX = ".rows"
"""A stack's name + this: the input of the rows' own weights in a :func:`per_row_inputs` model."""


def stack_adapters(slots: Sequence[LoRASlot], adapters: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The stacked inputs of the mixed export for ``adapters`` (validated params, in index order).

    Per slot, ``R`` is the largest rank any adapter gives the module (at least 1) and there
    are ``len(adapters) + 1`` slots, the last all zeros (index ``-1``). A ``Linear`` slot
    stacks ``A.T`` as ``[slots, in, R]`` and ``B.T`` as ``[slots, R, out]`` (an ``Embedding``: ``in`` the vocabulary), and
    a DoRA slot its magnitudes, a slot with a bias its biases, as ``[slots, out]``; an experts slot ``A`` as ``[slots, experts, R, in]`` and ``B`` as
    ``[slots, experts, out, R]``; a ``Conv2d`` slot ``A`` as ``[slots, R, kh*kw*C]`` (taps major, the patch order of
    the export) and ``B`` as ``[slots, out, R]``. Lower
    ranks are zero-padded, which adds exact zeros; an adapter without a module is zeros there.
    """
    out: dict[str, np.ndarray] = {}
    n = len(adapters) + 1
    for s in slots:
        ranks = [int(p[s.a_name].shape[1 if s.kind == "experts" else 0]) for p in adapters if s.a_name in p]
        r = max([1, *ranks])
        dt = np.dtype(s.dtype)
        a_name, b_name = stack_names(s)
        if s.kind == "conv":
            a = np.zeros((n, r, int(np.prod(s.in_dims))), dt)
            b = np.zeros((n, s.out, r), dt)
        elif s.kind == "experts":
            a, b = np.zeros((n, *s.a_shape(r)), dt), np.zeros((n, *s.b_shape(r)), dt)
        else:
            a = np.zeros((n, *s.in_dims, r), dt)
            b = np.zeros((n, r, s.out), dt)
        for k, p in enumerate(adapters):
            if s.a_name not in p:
                continue
            pa, pb = p[s.a_name], p[s.b_name]
            if s.kind == "experts":  # [experts, rk, in] and [experts, out, rk]
                rk = pa.shape[1]
                a[k, :, :rk], b[k, :, :, :rk] = pa, pb
                continue
            rk = pa.shape[0]
            if s.kind == "conv":
                a[k, :rk] = pa.transpose(0, 2, 3, 1).reshape(rk, -1)
                b[k, :, :rk] = pb.reshape(s.out, rk)
            else:
                a[k, :, :rk] = pa.T
                b[k, :rk, :] = pb.T
        out[a_name], out[b_name] = a, b
        for name, stack in zip(s.vector_names, stacked_inputs(s)[2:], strict=True):
            m = np.zeros((n, s.out), dt)  # each adapter's magnitude d or bias c (zeros: an adapter without, the zero slot)
            for k, p in enumerate(adapters):
                if name in p:
                    m[k] = p[name]
            out[stack] = m
    return out


def _all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (which may read the graph's values)."""
    for n in graph.node:
        yield n
        for sub in subgraphs(n):
            yield from _all_nodes(sub)


def per_row_inputs(model: onnx.ModelProto, stacks: Collection[str]) -> dict[str, str]:
    """Rewrite mixed export ``model`` in place to take each row's adapter weights as inputs.

    Every ``Gather`` (axis 0) by ``adapter_index`` of a stack input in ``stacks`` (directly or through
    ``Cast``\\ s that only it reads, as a float16 graph casts its stacks) is removed; what read its
    output reads a new input ``<stack>.rows`` (:data:`ROWS_SUFFIX`) of shape ``[batch,
    *stack.shape[1:]]``, through the same ``Cast``\\ s, to be fed ``stack[adapter_index]``: the same
    values, so the outputs are the same bit for bit. Stacks and ``adapter_index`` that nothing reads
    any more stop being inputs. Returns ``{rows input: stack}``; :class:`ServingError` when the
    model gathers no stack by index.
    """
    g = model.graph
    inputs = {i.name: i for i in g.input}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in _all_nodes(g):
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    rename: dict[str, str] = {}
    rows: dict[str, str] = {}
    recast: list[tuple[onnx.NodeProto, str]] = []  # (the Cast that read a stack, the rows input it reads instead)
    keep = []
    for n in g.node:
        axis = next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and len(n.input) == 2 and n.input[1] == INDEX_INPUT \
                and axis == 0:
            casts, data = [], n.input[0]  # Gather(Cast(stack)) is Cast(Gather(stack)): the casts move to the rows
            while data not in inputs and data in producer and producer[data].op_type == "Cast" and uses[data] == 1:
                casts.append(producer[data])
                data = producer[data].input[0]
            if data in stacks and data in inputs:
                rows_name = data + ROWS_SUFFIX
                rows[rows_name] = data
                if casts:
                    recast.append((casts[-1], rows_name))
                    rename[n.output[0]] = n.input[0]
                else:
                    rename[n.output[0]] = rows_name
                continue
        keep.append(n)
    # checked before anything changes
    if not rows:
        raise ServingError(f"model {g.name!r} gathers no adapter stack by {INDEX_INPUT!r}: not a mixed export")
    if leaked := sorted(o.name for o in g.output if o.name in rename):
        raise ServingError(f"model {g.name!r}: outputs {leaked} are gathered adapter weights; cannot take them per row")
    if taken := sorted(set(rows) & (set(inputs) | set(producer))):
        raise ServingError(f"model {g.name!r} already has values named {taken}; cannot add them as per-row inputs")
    for cast, rows_name in recast:
        cast.input[0] = rows_name
    del g.node[:]
    g.node.extend(keep)
    read = set()
    for n in _all_nodes(g):
        n.input[:] = [rename.get(i, i) for i in n.input]
        read.update(n.input)
    index_dim = onnx.TensorShapeProto.Dimension()  # the batch dim adapter_index declares (unknown without one)
    if INDEX_INPUT in inputs and inputs[INDEX_INPUT].type.tensor_type.shape.dim:
        index_dim.CopyFrom(inputs[INDEX_INPUT].type.tensor_type.shape.dim[0])
    replace_stack_inputs(g, rows, read, lambda dims: dims[0].CopyFrom(index_dim))
    return rows


def replace_stack_inputs(graph: onnx.GraphProto, derived: Mapping[str, str], read: Collection[str],
                         shape: Callable[[Any], None]) -> None:
    """Declare each input of ``derived`` (``{new input: stack}``) just before its stack among ``graph``'s inputs, as a
    copy of the stack's declaration whose dims ``shape`` edits in place; then drop the stacks of ``derived`` and
    ``adapter_index`` where nothing reads them (``read``: the names the graph's nodes read), inputs and initializers
    (a stack's one-slot default) both."""
    drop = {*derived.values(), INDEX_INPUT}
    new_inputs = []
    for i in graph.input:
        for name in (k for k, stack in derived.items() if stack == i.name):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(i)
            vi.name = name
            shape(vi.type.tensor_type.shape.dim)
            new_inputs.append(vi)
        if i.name in read or i.name not in drop:
            new_inputs.append(i)
    del graph.input[:]
    graph.input.extend(new_inputs)
    kept = [t for t in graph.initializer if t.name in read or t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _read_model(model: ModelSource) -> tuple[onnx.ModelProto, str, Path | None]:
    """``(a ModelProto to change, how messages name it, the folder of its external weights)``;
    external weights stay on disk (ONNX Runtime reads them from the folder)."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, "model", None
    where = str(model) if isinstance(model, str | Path) else "model"
    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model), where, None
        return onnx.load(str(model), load_external_data=False), where, Path(model).resolve().parent
    except Exception as exc:  # onnx raises OSError, DecodeError, ValueError...
        raise ServingError(f"cannot read {where} as an ONNX model ({type(exc).__name__}: {exc})") from None


@dataclass
class _Layout:
    """One session of a mixed model and what its calls feed: ``rows`` ``{rows input: stack}`` (each row's own
    weights), ``groups`` ``{groups input: stack}`` (each adapter's, once a call), ``reads`` its inputs (``None``: the
    model as exported, every stack and ``adapter_index``), ``stacked`` the stacks it reads whole."""

    model: OrtModel
    rows: dict[str, str]
    groups: dict[str, str]
    reads: set[str] | None
    stacked: list[str] = field(default_factory=list)
    takes_index: bool = True


@dataclass(frozen=True)
class _AdapterSet:
    names: tuple[str, ...]
    index: dict[str, int]
    feeds: dict[str, np.ndarray] = field(repr=False)  # the stacked weights
    # per stack: each slot's rank (the zero slot last, rank 0), and the axis of the stack that holds the rank
    ranks: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict, repr=False)
    # the last rows asked for: {their adapters: (adapter_index, adapter inputs)}, one entry (a decode loop
    # asks for the same rows every step)
    bound: dict[tuple[str | None, ...], tuple[np.ndarray, dict[str, np.ndarray]]] = field(
        default_factory=dict, repr=False, compare=False)


def _cut(current: _AdapterSet, stack: str, which: np.ndarray) -> np.ndarray:
    """``stack`` of set ``current`` cut to the largest rank among its entries ``which`` (a view): the rest of the
    padding is exact zeros. An embedding's ``B`` keeps every rank (its ``A`` stack is read whole)."""
    whole = current.feeds[stack]
    if stack not in current.ranks:
        return whole
    ranks, axis = current.ranks[stack]
    keep = max(1, int(ranks[which].max())) if len(which) else 1
    return whole[(slice(None),) * axis + (slice(0, keep),)] if keep < whole.shape[axis] else whole


class MixedAdapterSession:
    """An ONNX Runtime session over a mixed export; each row of a call names its adapter.

    Args:
        model: the mixed ONNX model (path, bytes or ``ModelProto``); its slots come from its metadata.
        adapters: ``{name: .onnx_adapter path or {param: array}}``, in index order.
        require_checksum: refuse adapter files without a checksum file (as for ``AdapterSession``).
        per_row_weights: serve the model rewritten by :func:`per_row_inputs`: each call gathers the rows'
            weights in numpy, and :meth:`adapter_inputs` once per set of rows, so a decode loop binding
            them skips the per-slot ``Gather`` of every step (measured 16% off an 8-row step of the
            deployable-LLM benchmark's model) and holds ``rows x`` one adapter's weights meanwhile.
        group_rows: serve the ``Linear`` slots as :func:`~flora_graph.serving.grouped.group_rows` rewrites
            them: the rows that use one adapter run together on that adapter's weights, read once a call however
            many rows use it (the other slots as ``per_row_weights`` says).
        distinct_rows_per_row: with ``group_rows`` and ``per_row_weights``, also hold the model as
            ``per_row_weights`` alone rewrites it, a second session, and serve it a call whose rows each use another
            adapter (or none): grouping reads nothing less there and costs two gathers a slot (8% of an 8-row step
            over 8 adapters of the deployable-LLM benchmark's model). The model's weights are held twice.
        **options: session options as for :class:`~flora_graph.serving.session.AdapterSession`.
    """

    def __init__(self, model: ModelSource, adapters: Mapping[str, AdapterSource] | None = None, *,
                 require_checksum: bool = False, per_row_weights: bool = False, group_rows: bool = False,
                 distinct_rows_per_row: bool = False, **options: Any) -> None:
        self.require_checksum = require_checksum
        self._rows: dict[str, str] = {}  # {rows input: stack} of a per_row_weights session
        self._groups: dict[str, str] = {}  # {groups input: stack} of a group_rows session
        self._twin: _Layout | None = None  # distinct_rows_per_row: the per-row session, for rows that share no adapter
        if per_row_weights or group_rows:  # the graph is read (weights left on disk) and rewritten before a session exists
            proto, where, folder = _read_model(model)
            metadata, inputs = {p.key: p.value for p in proto.metadata_props}, {i.name for i in proto.graph.input}
        else:
            self.model = OrtModel(model, **options)
            metadata, where, inputs = self.model.metadata, self.model.where, set(self.model.inputs)
        kind, self.slots = slots_from_metadata(metadata, where)
        if kind != "mixed" or INDEX_INPUT not in inputs:
            raise ServingError(f"{where} is a {kind!r} export, not a mixed one (export_mixed)")
        still = None  # what the rewritten model reads besides the rows' weights
        if per_row_weights or group_rows:
            weighted = {n for s in self.slots if s.kind != "experts" for n in stacked_inputs(s)}
            twin = None
            if distinct_rows_per_row and group_rows and per_row_weights and weighted:
                twin = onnx.ModelProto()
                twin.CopyFrom(proto)
            if group_rows:  # Linear slots on groups of rows, one per adapter of the call
                self._groups = grouped.group_rows(proto, self.slots)
            # the other slots, with per_row_weights: each row's own weights (experts slots read their stacks whole:
            # each pair picks its expert of its row's adapter)
            left = weighted - set(self._groups.values())
            if per_row_weights and left:
                self._rows = per_row_inputs(proto, left)
            if self._rows or self._groups:
                still = {i.name for i in proto.graph.input}
            self.model = OrtModel(proto.SerializeToString(), where=where, external_data_dir=folder, **options)
            if twin is not None and self._groups:  # every slot on the rows' own weights, as per_row_weights alone
                rows = per_row_inputs(twin, weighted)
                self._twin = _Layout(OrtModel(twin.SerializeToString(), where=where, external_data_dir=folder,
                                              **options), rows, {}, {i.name for i in twin.graph.input})
        self.spec = param_spec(self.slots)
        self.spec.unpacks = packed_from_metadata(self.model.metadata, self.model.where)  # files packed for model.onnx
        # what each call feeds besides the request: the stacks (inputs with a one-slot default) and the
        # index, where the model reads them, and the rows' own weights
        stacked = [n for s in self.slots for n in stacked_inputs(s)]
        self._main = _Layout(self.model, self._rows, self._groups, still)
        for layout in (self._main, self._twin):
            if layout is not None:
                layout.stacked = stacked if layout.reads is None else [n for n in stacked if n in layout.reads]
                layout.takes_index = layout.reads is None or INDEX_INPUT in layout.reads
        self._request = [n for n in self.model.inputs if n != INDEX_INPUT and n not in stacked and n not in self._rows
                         and n not in self._groups and n not in (grouped.ROWS_INPUT, grouped.PLACES_INPUT)]
        self._lock = threading.Lock()
        self._set = self._build({})
        if adapters:
            self.set_adapters(adapters)

    def _build(self, params: Mapping[str, Mapping[str, np.ndarray]]) -> _AdapterSet:
        feeds = stack_adapters(self.slots, list(params.values()))
        names = tuple(params)
        ranks: dict[str, tuple[np.ndarray, int]] = {}
        for s in self.slots:
            if s.kind == "experts":  # its stacks are read whole (pairs index them by expert): not cut per row
                continue
            r = np.array([int(p[s.a_name].shape[0]) if s.a_name in p else 0 for p in params.values()] + [0])
            a_name, b_name = stack_names(s)  # the rank axis: A [slots, in, R] / B [slots, R, out]; conv A [slots, R, ...]
            ranks[a_name], ranks[b_name] = (r, 1 if s.kind == "conv" else 2), (r, 2 if s.kind == "conv" else 1)
            if s.kind == "embedding":  # its A stack is read whole (rows index it by id): B keeps every rank too
                del ranks[a_name], ranks[b_name]
        return _AdapterSet(names, {n: i for i, n in enumerate(names)}, feeds, ranks)

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
        return self._indices(self._set, self._row_names(adapters, rows))

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
            layout = self._layout(idx)
            feeds.update(self._weights(current, idx, layout))
        else:
            idx, weights, layout = self._rows_of(current, self._row_names(adapters, rows))
            feeds.update(weights)
        return layout.model.run(feeds, None,
                                lambda: f"mixed batch with adapters {sorted({current.names[i] for i in idx if i >= 0})}")

    def adapter_inputs(self, adapters: Sequence[str | None]) -> tuple[object, dict[str, np.ndarray]]:
        """``(token, {input: array})``: the adapter inputs of rows using ``adapters`` (the stacks and
        ``adapter_index``, or the rows' own weights), for an ``IOBinding`` run of :meth:`model_for` those rows;
        ``token`` is the adapter set (a new object after :meth:`set_adapters`). The last answer is kept for the next
        call with the same rows. Raises :class:`UnknownAdapterError` naming the row."""
        current = self._set
        return current, self._rows_of(current, list(adapters))[1]

    def model_for(self, adapters: Sequence[str | None]) -> OrtModel:
        """The session that serves rows using ``adapters``: :attr:`model`, or with ``distinct_rows_per_row`` the
        per-row one where no two rows share an adapter (the answer :meth:`adapter_inputs` keeps for those rows,
        looked up, not worked out again each decode step). Raises :class:`UnknownAdapterError` naming the row."""
        return self._rows_of(self._set, list(adapters))[2].model

    def _layout(self, idx: np.ndarray) -> _Layout:
        """The layout that serves rows ``idx``: the per-row twin where it is held and no two rows share an index."""
        return self._twin if self._twin is not None and len(np.unique(idx)) == len(idx) else self._main

    def _rows_of(self, current: _AdapterSet, names: list[str | None]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], _Layout]:
        """``(adapter_index, adapter inputs, the layout they are for)`` of rows using ``names``; the last answer is
        kept on the set."""
        key = tuple(names)
        hit = current.bound.get(key)
        if hit is None:
            idx = self._indices(current, names)
            layout = self._layout(idx)
            hit = (idx, self._weights(current, idx, layout), layout)
            current.bound.clear()
            current.bound[key] = hit
        return hit

    def _weights(self, current: _AdapterSet, idx: np.ndarray, layout: _Layout) -> dict[str, np.ndarray]:
        """The adapter inputs of rows ``idx`` of set ``current``, as ``layout`` reads them."""
        out = {n: current.feeds[n] for n in layout.stacked}
        if layout.takes_index:
            out[INDEX_INPUT] = idx
        # entries of the stacks (-1: the last, zero slot, as Gather reads it), cut to the largest rank among them
        taken = {name: (_cut(current, stack, idx), idx) for name, stack in layout.rows.items()}
        if layout.groups:  # one entry per adapter of the call, [groups, 1, ...]: broadcast over each group's rows
            slots, out[grouped.ROWS_INPUT], out[grouped.PLACES_INPUT] = grouped.row_groups(idx)
            taken.update({name: (_cut(current, stack, slots), slots) for name, stack in layout.groups.items()})
        # side by side in huge pages: a decode step reads them all, as it reads the model's weights
        arrays = huge_pages.zeros({name: ((len(which), *src.shape[1:]), src.dtype) for name, (src, which) in taken.items()},
                                  layout.model.asks_huge_pages)
        for name, (src, which) in taken.items():
            np.take(src, which, axis=0, out=arrays[name])
            out[name] = arrays[name][:, None] if name in layout.groups else arrays[name]
        return out

    @staticmethod
    def _row_names(adapters: str | Sequence[str | None] | None, rows: int) -> list[str | None]:
        """Each row's adapter name (``None``: no adapter; one name or ``None``: every row)."""
        names = [adapters] * rows if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(names) != rows:
            raise ServingError(f"{len(names)} adapter names for a batch of {rows} rows")
        return names

    @staticmethod
    def _indices(current: _AdapterSet, names: Sequence[str | None]) -> np.ndarray:
        out = np.empty(len(names), np.int64)
        for row, name in enumerate(names):
            if name is None:
                out[row] = NO_ADAPTER
            elif name in current.index:
                out[row] = current.index[name]
            else:
                raise UnknownAdapterError(f"row {row}: adapter {name!r} is not in this session's set {list(current.names)}")
        return out
