"""The one ONNX file writer: models and lowered graphs to disk, committed atomically.

:func:`save_onnx` writes a graph (lowered by :func:`~flora_graph.runtimes.onnx_lowering.lower`,
its weights streamed straight from their arrays) or a ``ModelProto``; past
:data:`DATA_FILE_BYTES` bytes the weights go to a data file beside the model.

The model file's rename is the single commit point (:mod:`flora_graph.storage`): the data file
is named ``<model>.data`` unless the model now at the destination reads that name, then
``<model>.<16 hex>.data``; it is written and renamed in first, so the old model keeps reading
its own data until the new model replaces it. Data files of the family that the committed
model does not read, and temporaries of killed writes, are removed after each commit.
:func:`write_model_file` and :func:`write_external_files` write a model into a folder being
staged whole (a Triton entry; the directory form under the fixed names ``<file>`` and
``<file>.data``): plain writes, the folder's commit makes them visible. :class:`SharedData`
writes several lowered models into such a folder with one data file that stores each distinct
weight once (a GenAI package's two models share their base weights).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from flora_graph import storage
from flora_graph.ir.graph import Graph
from flora_graph.runtimes.onnx_lowering import (
    DEFAULT_OPSET,
    OnnxExportError,
    check_model,
    little_endian,
    lower,
    tensor_header,
)
from flora_graph.storage import atomic_file

__all__ = ["DATA_FILE_BYTES", "EXTERNAL_DATA_THRESHOLD", "SharedData", "data_files_of", "model_size", "save_lowered", "save_onnx", "subgraphs",
           "write_external_files", "write_model_file"]

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes; past it a model cannot be one protobuf: its weights go to "<file>.data"

DATA_FILE_BYTES = 256 << 20
"""A model file written past this many bytes (or :data:`EXTERNAL_DATA_THRESHOLD`, the lower) keeps its weights in a data
file beside it: ONNX Runtime and ONNX Runtime GenAI load such a model faster than one protobuf to parse (a 2 GB Qwen2
package: 4.7-5.0 s against 7.4-8.9 s in ONNX Runtime, 4.7-5.3 s against 6.8-7.6 s in GenAI)."""


def _external(size: int) -> bool:
    """Whether a model file of ``size`` bytes is written with its weights in a data file."""
    return size > min(EXTERNAL_DATA_THRESHOLD, DATA_FILE_BYTES)


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

    Past :data:`DATA_FILE_BYTES` bytes the weights go to a data file beside it
    (``<name>.data``, or ``<name>.<hex>.data`` when the model being replaced reads that name).
    A graph is checked before anything is written (:func:`check_lowered`) and its weights are
    written straight from its arrays; a model is serialized once and checked (by path when
    it has external data). Raises :class:`OnnxExportError` naming the path when it cannot
    be written; the old model at ``path`` stays whole and no partial file stays.
    """
    if isinstance(graph_or_model, Graph):
        return save_lowered(*lower(graph_or_model, opset), path)
    path = Path(os.path.abspath(path))
    try:
        if not _external(model_size(graph_or_model)):
            data = graph_or_model.SerializeToString()
            check_model(data, f"model for {str(path)!r}")
            _commit(path, lambda fh: fh.write(data))
        else:
            _save_external(graph_or_model, path)
    except OSError as exc:
        raise OnnxExportError(f"cannot write ONNX model to {str(path)!r}: {exc.strerror or exc}") from None
    return path


def save_lowered(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write :func:`~flora_graph.runtimes.onnx_lowering.lower`'s ``(model, weights)`` to ``path`` atomically, each
    weight's bytes from its array to the file (no copy in memory), with external data past
    :data:`DATA_FILE_BYTES`; return the path. ``model`` may have changed since (its nodes, metadata,
    small initializers) as long as it reads the weights by their names. Raises :class:`OnnxExportError` as
    :func:`save_onnx` does."""
    path = Path(os.path.abspath(path))
    try:
        _write_lowered(model, weights, path)
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
    if _external(len(head) + chunk):
        _write_external(model, weights, path)
        return

    def write(fh: BinaryIO) -> None:
        fh.write(head)
        if tensors:
            fh.write(_len_field(_GRAPH_FIELD, chunk))
        for header, arr, body in tensors:
            fh.write(_len_field(_INITIALIZER_FIELD, body) + header + _len_field(_RAW_DATA_FIELD, arr.nbytes))
            fh.write(little_endian(arr).reshape(-1).view(np.uint8).data)

    _commit(path, write)


def _write_external(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], path: Path) -> None:
    """``model`` with ``weights`` as external data (64-byte aligned), committed by the model's rename."""
    model = _copy_proto(model)

    def write_data(fh: BinaryIO, data_name: str) -> None:
        offset = 0
        for name, arr in weights.items():
            pad = -offset % 64
            fh.write(b"\0" * pad)
            offset += pad
            t = model.graph.initializer.add()
            t.CopyFrom(tensor_header(name, arr))
            _point(t, data_name, offset, arr.nbytes)
            fh.write(little_endian(arr).reshape(-1).view(np.uint8).data)
            offset += arr.nbytes

    _commit(path, lambda fh: fh.write(model.SerializeToString()), write_data)


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """A ``ModelProto`` past the threshold: initializers of 1 KiB or more go to the data file; checked by path."""
    model = _copy_proto(model)  # the caller's model keeps its weights
    big = [t for t in _tensors(model.graph)
           if t.data_location != TensorProto.EXTERNAL and t.HasField("raw_data") and len(t.raw_data) >= 1024]

    def write_data(fh: BinaryIO, data_name: str) -> None:
        offset = 0
        for t in big:
            pad = -offset % 64
            fh.write(b"\0" * pad)
            offset += pad
            raw = t.raw_data
            _point(t, data_name, offset, len(raw))
            fh.write(raw)
            t.ClearField("raw_data")
            offset += len(raw)

    _commit(path, lambda fh: fh.write(model.SerializeToString()), write_data,
            check=lambda tmp: check_model(tmp, f"model for {str(path)!r}"))


def _point(t: TensorProto, data_name: str, offset: int, length: int) -> None:
    """Make ``t`` read ``length`` bytes at ``offset`` of ``data_name``."""
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


class SharedData:
    """Lowered models written into a folder being staged whole, their weights in one data file that holds each
    distinct weight once: a weight equal, byte for byte, to one already written is read from there.

    ``with SharedData(folder, "model.onnx.data") as data: data.write(model, weights, "model.onnx"); ...``: each
    :meth:`write` takes :func:`save_lowered`'s arguments (``weights`` as arrays, the model reading them by name),
    appends the weights not yet stored (64-byte aligned) and writes the model file pointing into the data file
    (unchecked, as :func:`save_lowered` writes a lowered model). Plain writes: the folder's commit
    (:func:`flora_graph.storage.staged_folder`) makes them visible together.
    """

    def __init__(self, folder: str | Path, data_name: str) -> None:
        self.folder, self.data_name = Path(folder), data_name
        self.stored = 0  # bytes in the data file (padding included)
        self.shared = 0  # bytes of weights read from where an earlier weight stored them
        self._fh: BinaryIO | None = None
        self._stack: contextlib.ExitStack | None = None
        self._placed: dict[tuple, list[tuple[np.ndarray, int]]] = {}

    def __enter__(self) -> SharedData:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self._fh = self._stack.enter_context(storage.new_file(self.folder / self.data_name))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.close()  # the data file flushed and fsynced

    def write(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray], file_name: str) -> Path:
        """``model`` as ``folder/file_name``, its ``weights`` in the shared data file; the model's path."""
        assert self._fh is not None, "SharedData.write outside its with block"
        model = _copy_proto(model)
        for name, arr in weights.items():
            offset = self._find(arr)
            if offset is None:
                pad = -self.stored % 64
                self._fh.write(b"\0" * pad)
                offset = self.stored + pad
                self._fh.write(little_endian(arr).reshape(-1).view(np.uint8).data)
                self.stored = offset + arr.nbytes
                self._placed.setdefault(_content_key(arr), []).append((arr, offset))
            else:
                self.shared += arr.nbytes
            t = model.graph.initializer.add()
            t.CopyFrom(tensor_header(name, arr))
            _point(t, self.data_name, offset, arr.nbytes)
        path = self.folder / file_name
        storage.write_new(path, model.SerializeToString())
        return path

    def _find(self, arr: np.ndarray) -> int | None:
        """The offset of a stored weight with ``arr``'s dtype, shape and bytes, or ``None``."""
        for held, offset in self._placed.get(_content_key(arr), ()):
            if _same_bytes(held, arr):
                return offset
        return None


def _content_key(arr: np.ndarray) -> tuple:
    """dtype, shape and a few sampled values (as raw bits) of ``arr``: equal arrays have equal keys."""
    if arr.ndim == 0 or arr.size == 0:
        return arr.dtype.str, arr.shape, arr.tobytes()
    picks = np.unique(np.linspace(0, arr.size - 1, num=min(arr.size, 16)).astype(np.int64))
    return arr.dtype.str, arr.shape, _bits(arr)[np.unravel_index(picks, arr.shape)].tobytes()  # any strides, no copy


def _bits(arr: np.ndarray) -> np.ndarray:
    """``arr`` viewed as unsigned integers of its item size (``0.0`` and ``-0.0`` differ, NaNs compare equal)."""
    kinds = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
    arr = arr if arr.ndim else arr.reshape(1)
    return arr.view(kinds[arr.dtype.itemsize]) if arr.dtype.itemsize in kinds else arr


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides:
        return True  # the same memory
    return bool(np.array_equal(_bits(a), _bits(b)))


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs ``node`` holds as attributes (an ``If``'s branches, a ``Loop``'s body)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def reads(node: onnx.NodeProto) -> Iterator[str]:
    """The value names ``node`` reads: its inputs, and every name the nodes of its subgraphs read (a ``Loop`` body
    reads values of the graph around it by name; names made inside a subgraph are fresh, so the extra ones
    match nothing outside)."""
    yield from node.input
    for g in subgraphs(node):
        for inner in g.node:
            yield from reads(inner)


def _tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """The initializers of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for g in subgraphs(node):
            yield from _tensors(g)


_PARSE_LIMIT = 64 << 20  # a model file past this is not parsed to find its data files (a fresh name is used)


def _data_read_by(path: Path) -> set[str] | None:
    """The data files the model now at ``path`` reads (``None``: it cannot be told)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return set()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _PARSE_LIMIT:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a corrupt or foreign file: protobuf's DecodeError, OSError, ...
        return None
    return {e.value for t in _tensors(model.graph) if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def _data_name(path: Path) -> str:
    """``<name>.data``, or a fresh ``<name>.<hex>.data`` when the model at ``path`` may read ``<name>.data``."""
    conventional = f"{path.name}.data"
    used = _data_read_by(path)
    if used is not None and conventional not in used:
        return conventional
    return f"{path.name}.{secrets.token_hex(8)}.data"


def data_files_of(model_name: str) -> re.Pattern[str]:
    """The names the data files of the model file ``model_name`` take (``<name>.data``, ``<name>.<16 hex>.data``)."""
    return re.compile(rf"{re.escape(model_name)}(?:\.[0-9a-f]{{16}})?\.data")


def _tidy(path: Path, keep: str | None) -> None:
    """After a commit: remove the family's data files the model does not read and the temporaries of killed writes."""
    name = re.escape(path.name)
    family = data_files_of(path.name)
    temps = re.compile(rf"\.{name}(?:\.[0-9a-f]{{16}})?\.data\.tmp-[0-9a-f]{{12}}")
    for entry in os.scandir(path.parent):
        if entry.name != keep and family.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
            (path.parent / entry.name).unlink(missing_ok=True)
    storage.remove_leftovers(path.parent, path.name, extra=temps)


def _commit(path: Path, write_model: Callable[[BinaryIO], object],
            write_data: Callable[[BinaryIO, str], None] | None = None,
            check: Callable[[Path], None] | None = None) -> None:
    """Write the data file (if any) under a name the current model does not read, then commit the model file."""
    with storage.writing(path, "ONNX model"), storage.parents(path.parent):
        data_name = None
        if write_data is not None:
            data_name = _data_name(path)
            data_path = path.parent / data_name
            try:
                with atomic_file(data_path, what="ONNX external data") as fh:
                    write_data(fh, data_name)
                with atomic_file(path, what="ONNX model", before_commit=check) as fh:
                    write_model(fh)
            except BaseException:
                data_path.unlink(missing_ok=True)  # no model reads it: its name was chosen so
                raise
        else:
            with atomic_file(path, what="ONNX model", before_commit=check) as fh:
                write_model(fh)
        _tidy(path, data_name)
        storage.boundary("onnx:tidied")


def _copy_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def write_model_file(model: onnx.ModelProto, path: Path, where: str) -> Path:
    """``model`` checked, then written as the new file ``path`` in a folder being staged whole."""
    data = model.SerializeToString()
    check_model(data, where)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_new(path, data)
    return path


def write_external_files(model: onnx.ModelProto, folder: Path, file_name: str, where: str) -> Path:
    """``model`` saved as ``folder/file_name`` + ``file_name.data`` and checked; return the model's path.

    For a folder being staged whole (:func:`flora_graph.storage.staged_folder`, which fsyncs and
    commits it): the files are written in place, under fixed names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    copy = _copy_proto(model)  # saving with external data empties the tensors it moves out
    onnx.save_model(copy, folder / file_name, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{file_name}.data", size_threshold=1024)
    check_model(folder / file_name, where)
    return folder / file_name
