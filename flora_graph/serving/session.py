"""``AdapterSession``: one ONNX Runtime session, many LoRA adapters, chosen per run.

The model is a swappable export (:func:`~flora_graph.serving.export.export_swappable`, or
any ONNX model whose LoRA weights are overridable initializers). Adapters are loaded as
``onnxruntime.LoraAdapter`` objects and activated per call with
``RunOptions.add_active_adapter``, so switching adapters costs nothing and
``run`` is safe to call from many threads at once: each call builds its own
``RunOptions`` and holds its adapter for the duration of the call, so an adapter unloaded
meanwhile stays valid for the calls already using it.

Adapters are validated against the model when loaded (names, shapes, one rank per module),
so a wrong file fails at ``load_adapter`` with an :class:`AdapterFileError` naming it, not
in the middle of a request. A loaded adapter does not depend on its file: the file is read
into memory once and verified against its checksum
(:func:`~flora_graph.serving.adapter_file.read_adapter_bytes`), and ONNX Runtime maps a
private copy that is deleted as soon as it is open
(:func:`~flora_graph.serving.adapter_file.private_copy`), so truncating, rewriting or
deleting the file afterwards changes nothing the session serves.

Request inputs go through the one input conversion of the package
(:func:`~flora_graph.runtimes.reference.to_array` and ``cast_array``): sparse, meta or
nested tensors and arrays of strings, objects or complex numbers are a :class:`ServingError`
naming the input.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from flora_graph.runtimes.huge_pages import huge_pages as backed_by_huge_pages
from flora_graph.runtimes.huge_pages import zeros as backed_zeros
from flora_graph.runtimes.onnxrt import make_session_options, ort_message
from flora_graph.runtimes.reference import cast_array, to_array
from flora_graph.serving.adapter_file import (
    decode_adapter,
    encode_adapter,
    private_copy,
    read_adapter_bytes,
)
from flora_graph.serving.errors import AdapterFileError, ServingError, UnknownAdapterError
from flora_graph.serving.slots import METADATA_KEY, ParamSpec, check_params, slots_from_metadata

__all__ = ["AdapterSession", "OrtModel", "load_params"]

ModelSource = str | Path | bytes | onnx.ModelProto
AdapterSource = str | Path | Mapping[str, Any]

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def _load(source: AdapterSource, spec: ParamSpec, name: str, require_checksum: bool) -> tuple[dict[str, np.ndarray], bytes | None]:
    """Validated params and, for a file whose params they are, its verified bytes (read once, into memory).

    ``None`` instead of the bytes when validation changed the names (per-module weights packed for the
    model, the adapter flag added or dropped): ONNX Runtime must then get the validated params, not the file.
    """
    if isinstance(source, str | Path):
        data = read_adapter_bytes(source, name=name, require_checksum=require_checksum)
        stored = decode_adapter(data, name=name, where=repr(str(source))).params
        params = check_params(stored, spec, name)
        return params, (data if params.keys() == stored.keys() else None)
    if isinstance(source, Mapping):
        return check_params(source, spec, name, cast=True), None
    raise AdapterFileError(f"adapter {name!r}: expected a path or a mapping of arrays, got {type(source).__name__}")


def load_params(source: AdapterSource, spec: ParamSpec, name: str, *, require_checksum: bool = False) -> dict[str, np.ndarray]:
    """An adapter's validated params from an ``.onnx_adapter`` path (checksum verified) or a ``{name: array}`` mapping."""
    return _load(source, spec, name, require_checksum)[0]


class OrtModel:
    """An ``InferenceSession`` with its required inputs, outputs and overridable (LoRA) inputs.

    Shared by :class:`AdapterSession` and :class:`~flora_graph.serving.mixed.MixedAdapterSession`.
    Options are those of :func:`~flora_graph.runtimes.onnxrt.make_session_options`, plus ``providers``,
    ``where`` (how messages name the model; default its path), ``external_data_dir`` (the folder of
    the external weights of a model given as bytes or a ``ModelProto``) and ``huge_pages`` (default
    ``True``: the memory the session allocates as it loads, its weights above all, is collapsed into
    huge pages where Linux can, :func:`~flora_graph.runtimes.huge_pages.huge_pages`; :attr:`huge_pages`
    says what was, :attr:`asks_huge_pages` whether it was asked; an :class:`AdapterSession` over the model
    also lays out each adapter's weights for ``IOBinding`` runs side by side in huge pages, and a
    :class:`~flora_graph.serving.mixed.MixedAdapterSession` its rows' weights,
    :func:`~flora_graph.runtimes.huge_pages.zeros`).
    """

    def __init__(self, model: ModelSource, *, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization_level: str = "all", allow_spinning: bool = False,
                 providers: Sequence[str] | None = None, where: str | None = None,
                 external_data_dir: str | Path | None = None, huge_pages: bool = True) -> None:
        opts = make_session_options(intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                                    graph_optimization_level=graph_optimization_level, allow_spinning=allow_spinning)
        opts.log_severity_level = 3  # LoRA inputs are initializers by design; ORT warns about each otherwise
        if external_data_dir is not None:  # a model given in memory whose weights are files beside its path
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
        where = where or (str(model) if isinstance(model, str | Path) else "model")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        self.asks_huge_pages = huge_pages  # the sessions over this model lay out their own step arrays as it asks
        try:
            with backed_by_huge_pages(huge_pages) as self.huge_pages:
                self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                                    sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime's pybind errors share no base class
            raise ServingError(f"onnxruntime cannot load {where}: {ort_message(exc)}") from None
        self.where = where
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.inputs = {i.name: (tuple(i.shape), _ORT_TYPES.get(i.type)) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.spec = ParamSpec({
            i.name: (tuple(d if isinstance(d, int | str) else None for d in i.shape), np.dtype(_ORT_TYPES[i.type]))
            for i in self.session.get_overridable_initializers() if i.type in _ORT_TYPES
        })
        if METADATA_KEY in self.metadata:  # packed slots take adapters per member module (see slots.pack_params)
            self.spec.packs = tuple(s for s in slots_from_metadata(self.metadata, where)[1] if s.members)

    def feeds(self, inputs: Mapping[str, Any], want: Sequence[str] | None = None) -> dict[str, Any]:
        """The ``want`` inputs (default: all) as arrays of the declared dtypes; ``ServingError`` for a missing or unknown name."""
        want = list(self.inputs) if want is None else want
        if not isinstance(inputs, Mapping):
            raise ServingError(f"{self.where}: inputs must be a mapping {{input name: array}}, got "
                               f"{type(inputs).__name__}; the model takes {list(want)}")
        if len(inputs) != len(want) or any(n not in inputs for n in want):
            missing = [n for n in want if n not in inputs]
            unknown = [n for n in inputs if n not in want]
            hint = " (adapter weights are loaded with load_adapter, not passed as inputs)" if set(unknown) & set(self.spec) else ""
            raise ServingError(f"{self.where}: inputs must be {list(want)}; missing {missing}, unknown {unknown}{hint}")
        out: dict[str, Any] = {}
        for name in want:
            value, dtype = inputs[name], self.inputs[name][1]
            if type(value) is np.ndarray and value.dtype == dtype and value.flags.c_contiguous:
                out[name] = value  # already what ONNX Runtime takes (a decode loop's arrays): no checks to pay
                continue
            what = f"{self.where}: input {name!r}"
            arr = to_array(value, what, ServingError)
            out[name] = np.ascontiguousarray(arr if dtype is None else cast_array(arr, dtype, what, ServingError))
        return out

    def run(self, feeds: Mapping[str, Any], run_options: ort.RunOptions | None,
            who: Callable[[], str]) -> dict[str, np.ndarray]:
        """``session.run``; an onnxruntime failure becomes ``ServingError`` naming ``who()``."""
        try:
            values = self.session.run(self.output_names, feeds, run_options)
        except Exception as exc:  # onnxruntime's pybind errors share no base class
            raise ServingError(f"{who()}: onnxruntime failed running {self.where}: {ort_message(exc)}") from None
        return dict(zip(self.output_names, values, strict=True))


@dataclass
class _Loaded:
    lora: ort.LoraAdapter
    ranks: dict[str, int]
    options: ort.RunOptions  # with the adapter active, made once: a fresh RunOptions per call cost 0.1-0.2 ms
    inputs: dict[str, ort.OrtValue]  # the same weights as model inputs, for IOBinding runs (which RunOptions adapters skip)


class AdapterSession:
    """An ONNX Runtime session over a swappable export, serving any loaded adapter per call.

    Args:
        model: the swappable ONNX model (path, bytes or ``ModelProto``), or an :class:`OrtModel` of it loaded
            already (``options`` are then its own).
        require_checksum: refuse adapter files without a checksum file (default: load them
            with an :class:`~flora_graph.serving.errors.AdapterChecksumWarning`).
        **options: ``intra_op_threads``, ``inter_op_threads``, ``graph_optimization_level``,
            ``allow_spinning`` (default ``False``), ``providers``, ``huge_pages`` (default ``True``; see :class:`OrtModel`).

    Raises:
        ServingError: the model cannot be loaded, or has no overridable LoRA inputs.
    """

    def __init__(self, model: ModelSource, *, require_checksum: bool = False, **options: Any) -> None:
        self.require_checksum = require_checksum
        self.model = model if isinstance(model, OrtModel) else OrtModel(model, **options)  # loaded already: as it is
        if not self.model.spec:
            raise ServingError(f"{self.model.where} has no overridable initializers (LoRA inputs); "
                               "export it with export_swappable")
        self._adapters: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        with self._lock:
            return list(self._adapters)

    @property
    def input_names(self) -> list[str]:
        """The inputs a request must give (LoRA weights excluded)."""
        return list(self.model.inputs)

    @property
    def output_names(self) -> list[str]:
        """The outputs every run returns."""
        return list(self.model.output_names)

    def load_adapter(self, name: str, source: AdapterSource, *, replace: bool = False) -> dict[str, int]:
        """Load adapter ``name`` from an ``.onnx_adapter`` path or a ``{param: array}`` mapping.

        The adapter is validated against the model before it becomes visible to ``run``;
        returns its rank per module. A file is read once and checked against its checksum;
        the session never reads it again. Raises :class:`AdapterFileError` naming the adapter
        for a missing, truncated, corrupt or foreign file (or one without a checksum file when
        ``require_checksum``), and :class:`ServingError` when ``name`` is already loaded and
        ``replace`` is false.
        """
        if not isinstance(name, str) or not name:
            raise ServingError(f"adapter name must be a non-empty str, got {name!r}")
        with self._lock:
            if name in self._adapters and not replace:
                raise ServingError(f"adapter {name!r} is already loaded; unload it first or pass replace=True")
        params, data = _load(source, self.model.spec, name, self.require_checksum)
        if data is None:  # from arrays, or a file whose params validation renamed: the bytes of the params
            data = encode_adapter(params, label=name)
        lora = ort.LoraAdapter()
        try:
            with private_copy(data) as copy:  # ORT maps the copy; it is deleted, and nothing else can reach it
                lora.Load(str(copy))
        except Exception as exc:
            where = repr(str(source)) if isinstance(source, str | Path) else "its weights"
            raise AdapterFileError(f"adapter {name!r}: onnxruntime cannot load {where}: {ort_message(exc)}") from None
        ranks = {k.removesuffix(".lora_A"): int(v.shape[0]) for k, v in params.items() if k.endswith(".lora_A")}
        with self._lock:
            old = self._adapters.get(name)
            if old is not None and not replace:
                raise ServingError(f"adapter {name!r} is already loaded; unload it first or pass replace=True")
            options = ort.RunOptions()
            options.add_active_adapter(lora)
            # side by side in huge pages where they fill one, as the session's own weights (each OrtValue holds its view)
            arrays = backed_zeros({k: (np.shape(v), np.asarray(v).dtype) for k, v in params.items()},
                                  self.model.asks_huge_pages)
            for k, v in params.items():
                arrays[k][...] = v
            inputs = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
            self._adapters[name] = _Loaded(lora, ranks, options, inputs)
        return ranks

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; runs already using it finish with it. Unknown names raise."""
        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded; loaded: {sorted(self._adapters)}")
            del self._adapters[name]

    def _loaded(self, adapter: str) -> _Loaded:
        """The loaded ``adapter``; :class:`UnknownAdapterError` naming the loaded ones otherwise."""
        with self._lock:
            loaded = self._adapters.get(adapter)
            if loaded is None:
                known = sorted(self._adapters)
        if loaded is None:
            raise UnknownAdapterError(f"adapter {adapter!r} is not loaded; loaded: {known}")
        return loaded

    def adapter_inputs(self, adapter: str | None) -> tuple[object, dict[str, ort.OrtValue]]:
        """``(token, {input: value})``: ``adapter``'s weights as model inputs (``None``: none, the defaults
        serve), for an ``IOBinding`` run, to which ONNX Runtime does not apply ``RunOptions`` adapters.
        ``token`` is a new object whenever the adapter is loaded again. Raises :class:`UnknownAdapterError`."""
        if adapter is None:
            return self, {}
        return (loaded := self._loaded(adapter)), loaded.inputs

    def run(self, inputs: Mapping[str, Any], adapter: str | None = None, *, prepared: bool = False) -> dict[str, np.ndarray]:
        """Run on named inputs with ``adapter`` active (``None``: the base model); thread-safe.

        ``prepared``: ``inputs`` are exactly the model's inputs, contiguous numpy arrays of the
        declared dtypes (a decode loop's own arrays), passed on unchecked; onnxruntime still
        refuses a wrong one, as a :class:`ServingError`.

        Raises :class:`UnknownAdapterError` for an adapter that is not loaded and
        :class:`ServingError` naming the adapter for bad inputs or a failed run.
        """
        feeds = inputs if prepared else self.model.feeds(inputs)
        options = None  # ORT reads run options without changing them, so one object serves concurrent runs
        loaded = None
        if adapter is not None:
            loaded = self._loaded(adapter)
            options = loaded.options
        out = self.model.run(feeds, options, lambda: f"adapter {adapter!r}" if adapter else "base model (no adapter)")
        del loaded  # held until here: an unload during the run cannot free it
        return out
