"""Serving-runtime artifacts: a Triton model repository and a TorchScript archive with an I/O description.

* :func:`package_triton` writes ``<out_dir>/<model>/config.pbtxt`` (backend
  ``"onnxruntime"``, dynamic dims as ``-1``) and ``<out_dir>/<model>/1/model.onnx``. A model
  past protobuf's limit (or ``external_data=True``) is written as Triton's directory form,
  ``1/model.onnx/model.onnx`` beside its ``.data`` file. Inputs that are overridable
  initializers (the LoRA weights of a swappable export) are listed ``optional: true``.
* :func:`export_torchscript` writes ``<name>.pt`` (``torch.jit.load`` runs it without
  flora_graph) and ``<name>.json`` naming the inputs and outputs with dtypes and shapes
  (``-1`` for a dynamic dim); the module takes the inputs positionally, in that order, and
  returns a tuple in the outputs' order.

Every file is written through a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from flora_graph.ir import Graph
from flora_graph.ir.serialize import atomic_write_bytes
from flora_graph.runtimes import onnx_writer
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.onnx_writer import model_size, save_onnx, stage_external
from flora_graph.serving.errors import ServingError

__all__ = ["TRITON_DTYPES", "export_torchscript", "io_description", "package_triton", "triton_config"]

TRITON_DTYPES = {
    TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL",
}
"""ONNX element type -> Triton ``data_type``."""


def _dims(vi: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def _tensor_entry(vi: onnx.ValueInfoProto, where: str, *, drop_batch: bool, optional: bool) -> str:
    elem = vi.type.tensor_type.elem_type
    if elem not in TRITON_DTYPES:
        raise ServingError(f"{where}: tensor {vi.name!r} has ONNX type {TensorProto.DataType.Name(elem)}, which Triton lacks")
    dims = _dims(vi)
    if drop_batch:
        if not dims or dims[0] != -1:
            raise ServingError(f"{where}: max_batch_size > 0 needs a dynamic first dim on {vi.name!r}, got {dims}")
        dims = dims[1:]
    lines = [f'    name: "{vi.name}"', f"    data_type: {TRITON_DTYPES[elem]}", f"    dims: [ {', '.join(map(str, dims))} ]"]
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def triton_config(model: onnx.ModelProto, model_name: str, *, max_batch_size: int = 0) -> str:
    """The ``config.pbtxt`` text for ``model`` (``max_batch_size > 0`` drops the batch dim and batches dynamically)."""
    where = f"Triton model {model_name!r}"
    init = {t.name for t in model.graph.initializer}
    drop = max_batch_size > 0
    if drop and init & {v.name for v in model.graph.input}:
        raise ServingError(f"{where}: max_batch_size > 0 gives every input a batch dim, but the model has weight "
                           "inputs (LoRA slots); package it with max_batch_size=0")
    ins = [_tensor_entry(v, where, drop_batch=drop and v.name not in init, optional=v.name in init) for v in model.graph.input]
    outs = [_tensor_entry(v, where, drop_batch=drop, optional=False) for v in model.graph.output]
    parts = [f'name: "{model_name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join(ins) + "\n]", "output [\n" + ",\n".join(outs) + "\n]"]
    if drop:
        parts.append("dynamic_batching { }")
    return "\n".join(parts) + "\n"


def _load(graph_or_onnx: Graph | onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(graph_or_onnx, Graph):
        return to_onnx(graph_or_onnx)
    if isinstance(graph_or_onnx, onnx.ModelProto):
        return graph_or_onnx
    path = Path(graph_or_onnx)
    if path.is_dir() and (path / "graph.json").is_file():
        return to_onnx(Graph.load(path))
    try:
        return onnx.load(str(path))
    except Exception as exc:  # OSError, protobuf's DecodeError
        raise ServingError(f"cannot read ONNX model {str(path)!r}: {exc}") from None


def _write_external_dir(model: onnx.ModelProto, target: Path) -> None:
    """Triton's directory form ``target/model.onnx`` + ``model.onnx.data``, swapped in as a whole."""
    tmp = stage_external(model, target.parent, "model.onnx", f"model for {str(target)!r}")
    try:
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old.{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def package_triton(graph_or_onnx: Graph | onnx.ModelProto | str | Path, out_dir: str | Path, model_name: str, *,
                   version: int = 1, max_batch_size: int = 0, external_data: bool | None = None) -> Path:
    """Write a Triton model repository entry for ``graph_or_onnx``; return ``<out_dir>/<model_name>``.

    ``graph_or_onnx`` is a :class:`Graph` (lowered with ``to_onnx``), an ONNX model, a path
    to a ``.onnx`` file or a saved graph directory. ``external_data=None`` picks the
    directory form only past the 2 GB limit. Raises :class:`ServingError` for a name or
    type Triton cannot take.
    """
    if not model_name or any(c in model_name for c in '/\\"') or model_name in (".", ".."):
        raise ServingError(f"Triton model name {model_name!r} must be a plain directory name")
    if max_batch_size < 0 or version < 1:
        raise ServingError(f"max_batch_size must be >= 0 and version >= 1, got {max_batch_size}, {version}")
    model = _load(graph_or_onnx)
    config = triton_config(model, model_name, max_batch_size=max_batch_size)
    root = Path(out_dir) / model_name
    target = root / str(version) / "model.onnx"
    big = model_size(model) > onnx_writer.EXTERNAL_DATA_THRESHOLD
    if external_data or (external_data is None and big):
        _write_external_dir(model, target)
    else:
        if target.is_dir():
            shutil.rmtree(target)
        save_onnx(model, target)
    atomic_write_bytes(root / "config.pbtxt", config.encode())
    return root


def io_description(graph: Graph) -> dict[str, Any]:
    """``{"inputs": [...], "outputs": [...]}``: name, dtype, shape (``-1`` dynamic) and dim names of each tensor."""

    def entry(name: str, shape: tuple[Any, ...], dtype: str) -> dict[str, Any]:
        return {"name": name, "dtype": dtype, "shape": [d if isinstance(d, int) else -1 for d in shape],
                "dims": [d if isinstance(d, int) else str(d) for d in shape]}

    return {"inputs": [entry(n.name, n.shape, n.dtype) for n in graph.inputs],
            "outputs": [entry(k, n.shape, n.dtype) for k, n in graph.outputs.items()]}


def export_torchscript(graph: Graph, out_dir: str | Path, name: str = "model",
                       options: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.pt`` (TorchScript) and ``<out_dir>/<name>.json`` (I/O); return both paths.

    The JSON records ``format``, the ``.pt`` file name, ``call`` (positional inputs in the
    listed order, a tuple of outputs) and :func:`io_description`. ``options`` go to the
    ``torchscript`` backend (``optimize``, ``num_threads``).
    """
    from flora_graph.runtimes import compile as compile_graph

    out = Path(out_dir)
    exe = compile_graph(graph, "torchscript", **dict(options or {}))
    pt = exe.save(out / f"{name}.pt")
    doc = {"format": "flora_graph.torchscript", "version": 1, "file": pt.name, "graph": graph.name,
           "call": "module(*inputs in order) -> tuple of outputs in order", **io_description(graph)}
    meta = out / f"{name}.json"
    atomic_write_bytes(meta, (json.dumps(doc, indent=1) + "\n").encode())
    return pt, meta
