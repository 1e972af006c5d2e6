"""``.onnx_adapter`` files: write and read LoRA weights in ONNX Runtime's adapter format.

:func:`write_adapter` takes any ``{param name: array}`` (numpy arrays or torch tensors),
optionally validated against the model it is for (a swappable export, its slots, or a
:data:`~flora_graph.serving.slots.ParamSpec`), and writes it with
``onnxruntime.AdapterFormat``. ``model_version`` defaults to a 31-bit signature of the slot
layout when the model is known (``0`` otherwise), so a file records which layout it was
written for.

**Checksums.** The format has no checksum, so a flipped byte in a weight loads as another
weight. Beside ``NAME.onnx_adapter`` :func:`write_adapter` writes ``NAME.onnx_adapter.sha256``
(``<hex digest>  NAME.onnx_adapter``, the ``sha256sum`` format) and :func:`read_adapter`
verifies it, raising :class:`AdapterFileError` naming the file on a mismatch. The pair is
committed in three single-file steps, each atomic (:func:`flora_graph.storage.atomic_write_bytes`):
the checksum file first lists the new digest *and* the old one (of the adapter in place, when
its checksum file vouches for it), then the adapter is renamed into place, then the checksum
file keeps only the new digest. A reader accepts an adapter
whose digest is listed, so at every instant (and after a kill between the steps) the pair
on disk verifies; a reader that races a whole write between its two reads re-reads them.
A file without a checksum (written before checksums existed, or by another tool such as
``AdapterFormat.export_adapter``) is accepted with an :class:`AdapterChecksumWarning`, or
refused with ``require_checksum=True``.

**Reading.** A file is read into this process's memory once (:func:`read_adapter_bytes`),
verified, and decoded from that copy; nothing keeps reading the file afterwards, so
truncating or rewriting it in place cannot change (or crash) what was loaded. ONNX Runtime
only opens adapters by path, so the bytes go through :func:`private_copy`: a file in a
fresh 0700 temporary folder that is deleted as soon as ONNX Runtime has opened it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from flora_graph.runtimes.reference import to_array
from flora_graph.serving.base_branch import has_adapter_flag
from flora_graph.serving.errors import AdapterChecksumWarning, AdapterFileError
from flora_graph.serving.slots import LoRASlot, ParamSpec, check_params, param_spec, slots_from_metadata
from flora_graph.storage import atomic_write_bytes

__all__ = [
    "CHECKSUM_SUFFIX",
    "AdapterFile",
    "checksum_path",
    "decode_adapter",
    "encode_adapter",
    "layout_signature",
    "private_copy",
    "read_adapter",
    "read_adapter_bytes",
    "spec_of",
    "write_adapter",
]

ADAPTER_SUFFIX = ".onnx_adapter"
CHECKSUM_SUFFIX = ".sha256"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_READ_TRIES = 5  # reads of a pair that fails its checksum while it keeps changing (a writer at work)

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
        return param_spec(slots, flag=has_adapter_flag(model))
    if isinstance(model, Mapping):
        return dict(model)
    return param_spec(list(model))


def checksum_path(path: str | Path) -> Path:
    """The checksum file of adapter ``path``: ``NAME.onnx_adapter.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


@contextlib.contextmanager
def private_copy(data: bytes, name: str = "adapter.onnx_adapter") -> Iterator[Path]:
    """``data`` as a file that only this process knows (a fresh 0700 temporary folder), removed when the block ends.

    For ONNX Runtime, which opens adapters by path only: a memory map of the file survives its
    removal on POSIX, and nothing else can truncate or rewrite a file nobody else can reach.
    """
    folder = tempfile.mkdtemp(prefix="flora_graph_adapter_")
    try:
        path = Path(folder) / name
        with open(path, "wb") as f:
            f.write(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ort_first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].split(") ")[-1][:500] if text else type(exc).__name__


def encode_adapter(arrays: Mapping[str, np.ndarray], *, adapter_version: int = 1, model_version: int = 0,
                   label: str = "adapter") -> bytes:
    """The ``.onnx_adapter`` bytes of ``arrays`` (contiguous numpy arrays); :class:`AdapterFileError` naming ``label``."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    try:
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
        with tempfile.TemporaryDirectory(prefix="flora_graph_adapter_") as tmp:
            staged = Path(tmp) / "adapter.onnx_adapter"
            fmt.export_adapter(str(staged))
            return staged.read_bytes()
    except Exception as exc:  # onnxruntime's pybind errors share no base class
        raise AdapterFileError(f"adapter {label!r}: onnxruntime cannot write it: {_ort_first_line(exc)}") from None


def write_adapter(path: str | Path, params: Mapping[str, Any], *, model: ModelRef | None = None,
                  adapter_version: int = 1, model_version: int | None = None, name: str | None = None) -> Path:
    """Write ``params`` (``{name: array}``, ``B`` with its scale folded) as an ``.onnx_adapter`` file and its checksum.

    With ``model`` the params are validated (names, shapes, one rank per module) and cast
    to the model's dtype first, so a file that will not load is never written. The checksum
    file ``NAME.onnx_adapter.sha256`` is committed with it (see the module docstring).
    Raises :class:`AdapterFileError` naming the adapter (``name``, else the file name).
    """
    path = Path(path)
    label = name or path.stem
    if model is not None:
        spec = spec_of(model)
        arrays = check_params(params, spec, label, cast=True)
        version = layout_signature(spec) if model_version is None else model_version
    else:
        arrays = {k: np.ascontiguousarray(to_array(v, f"adapter {label!r}: parameter {k!r}", AdapterFileError))
                  for k, v in params.items()}
        if not arrays:
            raise AdapterFileError(f"adapter {label!r} holds no parameters")
        version = 0 if model_version is None else model_version
    data = encode_adapter(arrays, adapter_version=adapter_version, model_version=version, label=label)
    digest = hashlib.sha256(data).hexdigest()
    sums = checksum_path(path)
    line = f"{digest}  {path.name}\n"
    old = _vouched_digest(path, sums)
    keep = [] if old in (None, digest) else [f"{old}  {path.name}\n"]
    try:
        atomic_write_bytes(sums, (line + "".join(keep)).encode(), what="adapter checksum")
        atomic_write_bytes(path, data, what="adapter")
        if keep:
            atomic_write_bytes(sums, line.encode(), what="adapter checksum")
    except OSError as exc:
        raise AdapterFileError(f"adapter {label!r}: cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _read_file(path: Path) -> bytes:
    """The bytes of regular file ``path`` (symlinks followed; a FIFO or device is refused, never blocks)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{str(path)!r} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _vouched_digest(path: Path, sums: Path) -> str | None:
    """The digest of the adapter now at ``path`` if its checksum file lists it (or it has none), else ``None``.

    While a write is between its steps the checksum file lists this digest too, so the file
    a reader may still find there verifies.
    """
    try:
        current = hashlib.sha256(_read_file(path)).hexdigest()
    except OSError:
        return None
    try:
        listed = _listed_digests(sums)
    except ValueError:  # a malformed checksum file vouches for nothing
        return None
    return current if listed is None or current in listed else None


def _listed_digests(sums: Path) -> list[str] | None:
    """The digests a checksum file lists (``None``: no such file); ``ValueError`` when it is malformed."""
    try:
        text = _read_file(sums)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc})") from None
    if len(text) > 4096:
        raise ValueError("it is too long for a checksum file")
    try:
        lines = [ln.split()[0].lower() for ln in text.decode("ascii").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise ValueError("it is not text") from None
    if not lines or not all(_DIGEST.fullmatch(d) for d in lines):
        raise ValueError("it does not hold SHA-256 hex digests ('<64 hex digits>  NAME' per line)")
    return lines


def read_adapter_bytes(path: str | Path, *, name: str | None = None, require_checksum: bool = False) -> bytes:
    """The bytes of adapter file ``path``, read once into memory and verified against its checksum file.

    Raises :class:`AdapterFileError` naming the adapter for a missing or unreadable file, a
    malformed checksum file, or a digest mismatch (a corrupt file, or one changed after it was
    written); a missing checksum file warns (:class:`AdapterChecksumWarning`), or raises with
    ``require_checksum``.
    """
    path = Path(path)
    label = name or path.stem
    sums = checksum_path(path)
    seen: tuple[str, list[str]] | None = None
    for _ in range(_READ_TRIES):
        try:
            data = _read_file(path)
        except FileNotFoundError:
            raise AdapterFileError(f"adapter {label!r}: no file at {str(path)!r}") from None
        except OSError as exc:
            raise AdapterFileError(f"adapter {label!r}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
        try:
            listed = _listed_digests(sums)
        except ValueError as exc:
            raise AdapterFileError(f"adapter {label!r}: checksum file {str(sums)!r} is malformed: {exc}") from None
        if listed is None:
            if require_checksum:
                raise AdapterFileError(f"adapter {label!r}: {str(path)!r} has no checksum file {sums.name!r} "
                                       "(require_checksum=True); rewrite it with write_adapter")
            warnings.warn(f"adapter {label!r}: {str(path)!r} has no checksum file {sums.name!r}, so corruption "
                          "cannot be detected; rewrite it with write_adapter", AdapterChecksumWarning, stacklevel=3)
            return data
        digest = hashlib.sha256(data).hexdigest()
        if digest in listed:
            return data
        if seen == (digest, listed):  # read twice, unchanged: not a writer between its steps
            break
        seen = (digest, listed)
        time.sleep(0.01)  # the pair changed under us (a writer at work): read it again
    raise AdapterFileError(f"adapter {label!r}: {str(path)!r} does not match its checksum file {sums.name!r} "
                           f"(SHA-256 {digest[:16]}..., listed {', '.join(d[:16] + '...' for d in listed)}): "
                           "the file is corrupt or was changed after it was written")


def decode_adapter(data: bytes, *, name: str = "adapter", where: str = "") -> AdapterFile:
    """Decode ``.onnx_adapter`` bytes; :class:`AdapterFileError` naming ``name`` (and ``where``) if they are not one."""
    where = where or "its data"
    try:
        with private_copy(data) as tmp:
            fmt = ort.AdapterFormat.read_adapter(str(tmp))
            params = {str(k): np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
            return AdapterFile(params, int(fmt.get_adapter_version()), int(fmt.get_model_version()))
    except Exception as exc:  # onnxruntime raises RuntimeError for a truncated or foreign file
        raise AdapterFileError(f"adapter {name!r}: {where} is not a readable .onnx_adapter file "
                               f"(truncated or another format): {_ort_first_line(exc)}") from None


def read_adapter(path: str | Path, *, name: str | None = None, require_checksum: bool = False) -> AdapterFile:
    """Read an ``.onnx_adapter`` file (:func:`read_adapter_bytes`, then :func:`decode_adapter`).

    Raises :class:`AdapterFileError` naming the adapter if it is missing, corrupt or fails its checksum.
    """
    path = Path(path)
    label = name or path.stem
    data = read_adapter_bytes(path, name=label, require_checksum=require_checksum)
    return decode_adapter(data, name=label, where=repr(str(path)))
