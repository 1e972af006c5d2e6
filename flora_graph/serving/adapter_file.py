"""``.onnx_adapter`` files: write and read LoRA weights in ONNX Runtime's adapter format.

:func:`write_adapter` takes any ``{param name: array}`` (numpy arrays or torch tensors),
optionally validated against the model it is for (a swappable export, its slots, or a
:data:`~flora_graph.serving.slots.ParamSpec`), and writes it with
``onnxruntime.AdapterFormat`` through a temporary file and an atomic rename.
``model_version`` defaults to a 31-bit signature of the slot layout when the model is
known (``0`` otherwise), so a file records which layout it was written for.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from flora_graph.ir.serialize import atomic_write_bytes
from flora_graph.serving.errors import AdapterFileError
from flora_graph.serving.slots import LoRASlot, ParamSpec, check_params, param_spec, slots_from_metadata

__all__ = ["AdapterFile", "layout_signature", "read_adapter", "spec_of", "write_adapter"]

ADAPTER_SUFFIX = ".onnx_adapter"

ModelRef = onnx.ModelProto | str | Path | Sequence[LoRASlot] | Mapping[str, Any]


@dataclass
class AdapterFile:
    """What an adapter file holds: its parameters and the two version numbers."""

    params: dict[str, np.ndarray]
    adapter_version: int
    model_version: int


def layout_signature(spec: ParamSpec) -> int:
    """A 31-bit number identifying the names, dims and dtypes of ``spec`` (``AdapterFormat.model_version``)."""
    doc = json.dumps(sorted((k, [str(d) for d in dims], str(dt)) for k, (dims, dt) in spec.items()))
    return int.from_bytes(hashlib.sha256(doc.encode()).digest()[:4], "big") & 0x7FFFFFFF


def spec_of(model: ModelRef) -> ParamSpec:
    """The :data:`ParamSpec` of a swappable export (model or path), its slots, or a spec itself."""
    if isinstance(model, str | Path):
        model = onnx.load(str(model), load_external_data=False)
    if isinstance(model, onnx.ModelProto):
        _, slots = slots_from_metadata({p.key: p.value for p in model.metadata_props}, f"model {model.graph.name!r}")
        return param_spec(slots)
    if isinstance(model, Mapping):
        return dict(model)
    return param_spec(list(model))


def write_adapter(path: str | Path, params: Mapping[str, Any], *, model: ModelRef | None = None,
                  adapter_version: int = 1, model_version: int | None = None, name: str | None = None) -> Path:
    """Write ``params`` (``{name: array}``, ``B`` with its scale folded) as an ``.onnx_adapter`` file.

    With ``model`` the params are validated (names, shapes, one rank per module) and cast
    to the model's dtype first, so a file that will not load is never written. Raises
    :class:`AdapterFileError` naming the adapter (``name``, else the file name).
    """
    path = Path(path)
    label = name or path.stem
    if model is not None:
        spec = spec_of(model)
        arrays = check_params(params, spec, label, cast=True)
        version = layout_signature(spec) if model_version is None else model_version
    else:
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                  for k, v in params.items()}
        if not arrays:
            raise AdapterFileError(f"adapter {label!r} holds no parameters")
        version = 0 if model_version is None else model_version
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(version))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    with tempfile.TemporaryDirectory(prefix="flora_graph_adapter_") as tmp:
        staged = Path(tmp) / "adapter.onnx_adapter"
        try:
            fmt.export_adapter(str(staged))
            data = staged.read_bytes()
        except Exception as exc:  # onnxruntime's pybind errors share no base class
            raise AdapterFileError(f"adapter {label!r}: onnxruntime cannot write it: {str(exc).splitlines()[0]}") from None
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise AdapterFileError(f"adapter {label!r}: cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path


def read_adapter(path: str | Path, *, name: str | None = None) -> AdapterFile:
    """Read an ``.onnx_adapter`` file; :class:`AdapterFileError` naming the adapter if it is missing or corrupt."""
    path = Path(path)
    label = name or path.stem
    if not path.is_file():
        raise AdapterFileError(f"adapter {label!r}: no file at {str(path)!r}")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
        return AdapterFile(params, int(fmt.get_adapter_version()), int(fmt.get_model_version()))
    except Exception as exc:  # onnxruntime raises RuntimeError for a truncated or foreign file
        msg = str(exc).strip().splitlines()[0].split(") ")[-1] if str(exc).strip() else type(exc).__name__
        raise AdapterFileError(f"adapter {label!r}: {str(path)!r} is not a readable .onnx_adapter file "
                               f"(truncated or another format): {msg}") from None
