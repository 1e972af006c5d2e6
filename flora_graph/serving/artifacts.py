"""Serving-runtime artifacts: a Triton model repository and a TorchScript archive with an I/O description.

* :func:`package_triton` writes ``<out_dir>/<model>/config.pbtxt`` (backend
  ``"onnxruntime"``, dynamic dims as ``-1``) and ``<out_dir>/<model>/1/model.onnx``. A model
  past protobuf's limit (or ``external_data=True``) is written as Triton's directory form,
  ``1/model.onnx/model.onnx`` beside its ``.data`` file. Inputs that are overridable
  initializers (the LoRA weights of a swappable export) are listed ``optional: true``.
  The entry ``<out_dir>/<model>`` is committed whole (config and model together; the other
  versions in it are kept) by :func:`flora_graph.storage.staged_folder`.
* :func:`export_torchscript` writes ``<name>.pt`` (``torch.jit.load`` runs it without
  flora_graph) and ``<name>.json`` naming the inputs and outputs with dtypes and shapes
  (``-1`` for a dynamic dim); the module takes the inputs positionally, in that order, and
  returns a tuple in the outputs' order.
* :func:`package_torchscript` writes a Triton ``pytorch_libtorch`` entry:
  ``<out_dir>/<model>/config.pbtxt`` (tensors named ``<name>__<index>``, as Triton's PyTorch
  backend binds them) and ``<out_dir>/<model>/1/model.pt``.

Every file is written through a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from flora_graph.ir import Graph
from flora_graph.runtimes import onnx_writer
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.onnx_writer import model_size, write_external_files, write_model_file
from flora_graph.serving.errors import ServingError
from flora_graph.storage import check_name, staged_folder, write_new

__all__ = [
    "GRAPH_TRITON_DTYPES",
    "TRITON_DTYPES",
    "export_torchscript",
    "io_description",
    "libtorch_names",
    "package_torchscript",
    "package_triton",
    "torchscript_triton_config",
    "triton_config",
]

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


def package_triton(graph_or_onnx: Graph | onnx.ModelProto | str | Path, out_dir: str | Path, model_name: str, *,
                   version: int = 1, max_batch_size: int = 0, external_data: bool | None = None) -> Path:
    """Write a Triton model repository entry for ``graph_or_onnx``; return ``<out_dir>/<model_name>``.

    ``graph_or_onnx`` is a :class:`Graph` (lowered with ``to_onnx``), an ONNX model, a path
    to a ``.onnx`` file or a saved graph directory. ``external_data=None`` picks the
    directory form only past the 2 GB limit. Raises :class:`ServingError` for a name or
    type Triton cannot take.
    """
    _check_entry(model_name, version, max_batch_size)
    model = _load(graph_or_onnx)
    config = triton_config(model, model_name, max_batch_size=max_batch_size)
    root = Path(out_dir) / model_name
    big = model_size(model) > onnx_writer.EXTERNAL_DATA_THRESHOLD
    with staged_folder(root, what=f"Triton model {model_name!r}", last="config.pbtxt") as tmp:
        target = tmp / str(version) / "model.onnx"
        where = f"model for {str(root / str(version) / 'model.onnx')!r}"
        if external_data or (external_data is None and big):
            write_external_files(model, target, "model.onnx", where)
        else:
            write_model_file(model, target, where)
        write_new(tmp / "config.pbtxt", config.encode())
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

    check_name(name, "TorchScript file name", error=ServingError)
    out = Path(out_dir)
    exe = compile_graph(graph, "torchscript", **dict(options or {}))
    doc = {"format": "flora_graph.torchscript", "version": 1, "file": f"{name}.pt", "graph": graph.name,
           "call": "module(*inputs in order) -> tuple of outputs in order", **io_description(graph)}
    # the pair is one artifact: both files are staged and committed with the folder (other entries kept)
    with staged_folder(out, what=f"TorchScript model {name!r}", last=f"{name}.json") as tmp:
        exe.save(tmp / f"{name}.pt")
        write_new(tmp / f"{name}.json", (json.dumps(doc, indent=1) + "\n").encode())
    return out / f"{name}.pt", out / f"{name}.json"


GRAPH_TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
"""Graph dtype -> Triton ``data_type`` (the TorchScript entry)."""


def _check_entry(model_name: str, version: int, max_batch_size: int) -> None:
    """The checks every Triton entry makes before it writes anything."""
    check_name(model_name, "Triton model name", error=ServingError)
    if '"' in model_name:  # config.pbtxt quotes it
        raise ServingError(f"Triton model name {model_name!r} must be a plain directory name without '\"'")
    if max_batch_size < 0 or version < 1:
        raise ServingError(f"max_batch_size must be >= 0 and version >= 1, got {max_batch_size}, {version}")


def libtorch_names(graph: Graph) -> tuple[list[str], list[str]]:
    """The Triton names of ``graph``'s inputs and outputs in a ``pytorch_libtorch`` entry.

    Triton's PyTorch backend binds tensors by position through the ``<name>__<index>``
    convention (a TorchScript file keeps no I/O names): input ``i`` is the ``i``-th
    positional argument of ``forward``, output ``i`` the ``i``-th element of its tuple.
    ``<name>`` is the graph's tensor name with every character other than a letter, digit
    or ``_`` replaced by ``_``.
    """

    def name(raw: str, i: int) -> str:
        return f"{re.sub(r'[^0-9A-Za-z_]', '_', raw)}__{i}"

    return ([name(n.name, i) for i, n in enumerate(graph.inputs)],
            [name(k, i) for i, k in enumerate(graph.outputs)])


def torchscript_triton_config(graph: Graph, model_name: str, *, max_batch_size: int = 0) -> str:
    """The ``config.pbtxt`` text of a ``pytorch_libtorch`` entry for ``graph`` (see :func:`libtorch_names`)."""
    where = f"Triton model {model_name!r}"
    drop = max_batch_size > 0

    def entry(triton_name: str, graph_name: str, shape: tuple[Any, ...], dtype: str) -> str:
        if dtype not in GRAPH_TRITON_DTYPES:
            raise ServingError(f"{where}: tensor {graph_name!r} has dtype {dtype}, which Triton lacks")
        dims = [d if isinstance(d, int) else -1 for d in shape]
        if drop:
            if not dims or dims[0] != -1:
                raise ServingError(f"{where}: max_batch_size > 0 needs a dynamic first dim on {graph_name!r}, got {dims}")
            dims = dims[1:]
        return (f'  {{\n    name: "{triton_name}"\n    data_type: {GRAPH_TRITON_DTYPES[dtype]}\n'
                f"    dims: [ {', '.join(map(str, dims))} ]\n  }}")

    in_names, out_names = libtorch_names(graph)
    ins = [entry(t, n.name, n.shape, n.dtype) for t, n in zip(in_names, graph.inputs, strict=True)]
    outs = [entry(t, k, n.shape, n.dtype) for t, (k, n) in zip(out_names, graph.outputs.items(), strict=True)]
    parts = [f'name: "{model_name}"', 'platform: "pytorch_libtorch"', f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join(ins) + "\n]", "output [\n" + ",\n".join(outs) + "\n]"]
    if drop:
        parts.append("dynamic_batching { }")
    return "\n".join(parts) + "\n"


def package_torchscript(graph: Graph, out_dir: str | Path, model_name: str, *, version: int = 1,
                        max_batch_size: int = 0, archive_name: str | None = None,
                        options: Mapping[str, Any] | None = None) -> Path:
    """Write a Triton ``pytorch_libtorch`` model repository entry for ``graph``; return ``<out_dir>/<model_name>``.

    The entry is the layout Triton requires: ``<model_name>/config.pbtxt`` (platform
    ``"pytorch_libtorch"``, tensors named ``<name>__<index>``, see :func:`libtorch_names`;
    dynamic dims ``-1``) and ``<model_name>/<version>/model.pt``. With ``archive_name``, the
    entry also holds ``<archive_name>.pt`` (the same archive, hard-linked where the file
    system allows) and ``<archive_name>.json`` (:func:`io_description` plus the Triton name of
    each tensor), which Triton ignores. Everything is checked, and the module scripted, before
    the first file is written; the entry is committed whole, as :func:`package_triton`'s is
    (:func:`flora_graph.storage.staged_folder`). Raises :class:`ServingError` for a name,
    batch size or dtype Triton cannot take.
    """
    from flora_graph.runtimes import compile as compile_graph

    _check_entry(model_name, version, max_batch_size)
    if archive_name is not None:
        check_name(archive_name, "archive name", error=ServingError)
    config = torchscript_triton_config(graph, model_name, max_batch_size=max_batch_size)
    exe = compile_graph(graph, "torchscript", **dict(options or {}))
    root = Path(out_dir) / model_name
    with staged_folder(root, what=f"Triton model {model_name!r}", last="config.pbtxt") as tmp:
        pt = exe.save(tmp / str(version) / "model.pt")
        if archive_name is not None:
            archive = tmp / f"{archive_name}.pt"
            try:
                os.link(pt, archive)
            except OSError:  # a file system without hard links
                shutil.copyfile(pt, archive)
            in_names, out_names = libtorch_names(graph)
            io = io_description(graph)
            for entries, names in ((io["inputs"], in_names), (io["outputs"], out_names)):
                for e, t in zip(entries, names, strict=True):
                    e["triton_name"] = t
            doc = {"format": "flora_graph.torchscript", "version": 1, "file": archive.name, "graph": graph.name,
                   "call": "module(*inputs in order) -> tuple of outputs in order", **io}
            write_new(tmp / f"{archive_name}.json", (json.dumps(doc, indent=1) + "\n").encode())
        write_new(tmp / "config.pbtxt", config.encode())
    return root
