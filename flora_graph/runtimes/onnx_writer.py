"""The one ONNX file writer: models and lowered graphs to disk, atomically.

:func:`save_onnx` writes a graph (lowered by :func:`~flora_graph.runtimes.onnx_lowering.lower`,
its weights streamed straight from their arrays) or a ``ModelProto``; past
:data:`EXTERNAL_DATA_THRESHOLD` bytes the weights go to ``<name>.data`` beside the model.
:func:`stage_external` writes a model with external data into a fresh temporary folder and
checks it there, for callers that commit a whole folder (Triton's directory form).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from flora_graph.ir.graph import Graph
from flora_graph.ir.serialize import atomic_file, atomic_write_bytes
from flora_graph.runtimes.onnx_lowering import (
    DEFAULT_OPSET,
    OnnxExportError,
    check_model,
    little_endian,
    lower,
    tensor_header,
)

__all__ = ["EXTERNAL_DATA_THRESHOLD", "model_size", "save_onnx", "stage_external"]

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes; past it save_onnx writes weights to "<file>.data"


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` in bytes, estimated without serializing it (inline weights counted)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type != TensorProto.STRING else 1
            total += max(math.prod(t.dims) * itemsize, len(t.string_data)) + 16 + len(t.name)
    small = [*model.graph.node, *model.graph.input, *model.graph.output, *model.graph.value_info]
    return total + sum(p.ByteSize() + 8 for p in small) + 1024


def save_onnx(graph_or_model: Graph | onnx.ModelProto, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write a graph (lowered first) or model to ``path`` atomically; return the path.

    Past :data:`EXTERNAL_DATA_THRESHOLD` bytes the weights go to ``<name>.data`` beside it.
    A graph is checked before anything is written (:func:`check_lowered`) and its weights are
    written straight from its arrays; a model is serialized once and checked (by path when
    it has external data). Raises :class:`OnnxExportError` naming the path when it cannot
    be written; no partial file stays.
    """
    path = Path(path)
    try:
        if isinstance(graph_or_model, Graph):
            model, weights = lower(graph_or_model, opset)
            _write_lowered(model, weights, path)
        elif model_size(graph_or_model) <= EXTERNAL_DATA_THRESHOLD:
            data = graph_or_model.SerializeToString()
            check_model(data, f"model for {str(path)!r}")
            atomic_write_bytes(path, data)
        else:
            _save_external(graph_or_model, path)
    except OSError as exc:
        raise OnnxExportError(f"cannot write ONNX model to {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(field: int, size: int) -> bytes:
    """The key and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(size)


_GRAPH_FIELD, _INITIALIZER_FIELD, _RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def _write_lowered(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], path: Path) -> None:
    """Write the output of :func:`lower` as one ONNX file, or with external data past the threshold.

    One file is ``model``'s bytes followed by a second ``graph`` field holding the weights as
    initializers (protobuf merges repeated occurrences of a message field, so every reader
    sees one graph); each weight's bytes go from its array to the file without a copy.
    """
    head = model.SerializeToString()
    tensors = []
    for name, arr in weights.items():
        header = tensor_header(name, arr).SerializeToString()
        body = len(header) + len(_len_field(_RAW_DATA_FIELD, arr.nbytes)) + arr.nbytes
        tensors.append((header, arr, body))
    chunk = sum(len(_len_field(_INITIALIZER_FIELD, body)) + body for _, _, body in tensors)
    if len(head) + chunk > EXTERNAL_DATA_THRESHOLD:
        _write_external(model, weights, path)
        return
    with atomic_file(path) as fh:
        fh.write(head)
        if tensors:
            fh.write(_len_field(_GRAPH_FIELD, chunk))
        for header, arr, body in tensors:
            fh.write(_len_field(_INITIALIZER_FIELD, body) + header + _len_field(_RAW_DATA_FIELD, arr.nbytes))
            fh.write(little_endian(arr).reshape(-1).view(np.uint8).data)


def _write_external(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], path: Path) -> None:
    """``model`` with ``weights`` as external data in ``<name>.data`` (64-byte aligned), written atomically."""
    data_name = f"{path.name}.data"
    model = _copy_proto(model)
    offset = 0
    with atomic_file(path.parent / data_name) as fh:
        for name, arr in weights.items():
            pad = -offset % 64
            fh.write(b"\0" * pad)
            offset += pad
            t = model.graph.initializer.add()
            t.CopyFrom(tensor_header(name, arr))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            fh.write(little_endian(arr).reshape(-1).view(np.uint8).data)
            offset += arr.nbytes
    try:
        atomic_write_bytes(path, model.SerializeToString())
    except BaseException:
        (path.parent / data_name).unlink(missing_ok=True)
        raise


def _copy_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def stage_external(model: onnx.ModelProto, parent: Path, file_name: str, where: str) -> Path:
    """``model`` saved as ``file_name`` + ``file_name.data`` in a new temporary folder in ``parent``,
    fsynced and checked; return the folder (the caller commits it and removes it)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{file_name}.", suffix=".tmp", dir=parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving with external data empties the tensors it moves out
        onnx.save_model(copy, tmp / file_name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{file_name}.data", size_threshold=1024)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        check_model(tmp / file_name, where)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """Save with external data through a temporary folder beside ``path``; check, then rename both files."""
    data = f"{path.name}.data"
    tmp = stage_external(model, path.parent, path.name, f"model for {str(path)!r}")
    try:
        if (tmp / data).exists():
            os.replace(tmp / data, path.parent / data)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
