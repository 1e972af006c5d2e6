"""Graph files: structure as JSON, weights as safetensors. No pickle anywhere.

A saved graph is a directory holding ``graph.json`` and ``weights.safetensors``. The JSON
records the SHA-256 of the weights file, so an edited pair is caught on load. The folder is
written whole and committed in one step (:func:`flora_graph.storage.staged_folder`): a reader
sees the old graph or the new one, and a failed write raises
:class:`~flora_graph.errors.ArtifactWriteError` and changes nothing. :func:`load_graph` reads
the two files without following symlinks, validates everything it reads and raises
:class:`GraphError` naming the file and the field at fault; it never crashes on bad input.

Input defaults (``Graph.input_defaults``) are stored in the weights file too, each under a
key of its own that no param uses, listed in the optional ``input_defaults`` field of the
JSON (``{input name: key}``); a file without the field (every file written before defaults
existed) loads with none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from flora_graph.errors import GraphError
from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op, schema
from flora_graph.ir.verify import verify
from flora_graph.storage import atomic_file, atomic_write_bytes, read_regular, staged_folder, write_new

__all__ = ["FORMAT", "VERSION", "atomic_file", "atomic_write_bytes", "load_graph", "save_graph"]

FORMAT = "flora_graph"
VERSION = 1
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise GraphError(f"{where}: non-finite float {value} cannot be saved")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise GraphError(f"{where}: value {value!r} of type {type(value).__name__} is not JSON-serializable")


def save_graph(graph: Graph, path: str | Path) -> None:
    """Verify ``graph`` and write it as directory ``path``, committed whole (see the module docstring)."""
    verify(graph)
    unused = set(graph.params) - {n.attrs["param"] for n in graph.nodes if n.op is Op.CONST}
    if unused:  # load_graph refuses such files, so refuse to write one
        raise GraphError(
            f"graph {graph.name!r} holds params no node uses: {sorted(unused)[:5]} (call remove_dead() first)"
        )
    path = Path(path)
    tensors = {k: np.require(v, requirements="C") for k, v in graph.params.items()}  # keeps rank-0 arrays rank 0
    defaults: dict[str, str] = {}
    for name, arr in graph.input_defaults.items():
        key = _free_key(f"{name}{DEFAULT_SUFFIX}", tensors)
        tensors[key] = np.require(arr, requirements="C")
        defaults[name] = key
    weights = st_save(tensors)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "name": graph.name,
        "inputs": [n.name for n in graph.inputs],
        "outputs": {k: v.name for k, v in graph.outputs.items()},
        "nodes": [
            {
                "name": n.name,
                "op": n.op.value,
                "inputs": [i.name for i in n.inputs],
                "attrs": _jsonable(n.attrs, f"node {n.name!r} attrs"),
                "shape": list(n.shape),
                "dtype": n.dtype,
                "meta": _jsonable(n.meta, f"node {n.name!r} meta"),
            }
            for n in graph.nodes
        ],
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights).hexdigest()},
    }
    if defaults:  # optional: files without it have no input defaults
        doc["input_defaults"] = defaults
    if graph.dim_max:  # optional: files without it read as unbounded dims
        doc["dim_max"] = {str(k): int(v) for k, v in graph.dim_max.items()}
    if graph.dim_min:  # optional: files without it read as dims from 0
        doc["dim_min"] = {str(k): int(v) for k, v in graph.dim_min.items()}
    text = json.dumps(doc, indent=1, allow_nan=False).encode()
    with staged_folder(path, what=f"graph {graph.name!r}", last=GRAPH_FILE) as tmp:
        write_new(tmp / WEIGHTS_FILE, weights)
        write_new(tmp / GRAPH_FILE, text)


DEFAULT_SUFFIX = ":default"


def _free_key(key: str, used: dict[str, Any]) -> str:
    """``key``, else ``key_1``, ``key_2``, ...: the first not in ``used``."""
    name, k = key, 0
    while name in used:
        k += 1
        name = f"{key}_{k}"
    return name


def _input_defaults(raw: Any, params: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The optional ``input_defaults`` field (``{input name: weights key}``), its arrays popped from ``params``."""
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: field 'input_defaults' has type {type(raw).__name__}")
    out = {}
    for name, key in raw.items():
        if not isinstance(key, str) or key not in params:
            raise GraphError(f"{where}: input_defaults[{name!r}] = {key!r} is not a tensor of the weights file")
        out[name] = params.pop(key)
    return out


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise GraphError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise GraphError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise GraphError(f"{where}: field {key!r} has type {type(v).__name__}")
    return v


def _dim_bounds(raw: Any, where: str, field: str = "dim_max", least: int = 1) -> dict[str, int]:
    """The optional ``dim_max`` / ``dim_min`` field: ``{dim name: int >= least}``."""
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: field {field!r} has type {type(raw).__name__}")
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise GraphError(f"{where}: {field}[{k!r}] = {v!r} is not an int >= {least}")
    return dict(raw)


def load_graph(path: str | Path) -> Graph:
    """Read and validate a graph directory written by :func:`save_graph`."""
    path = Path(path)
    gfile, wfile = path / GRAPH_FILE, path / WEIGHTS_FILE
    try:
        raw = read_regular(gfile)  # a symlink is refused, not followed; a FIFO never blocks
        wraw = read_regular(wfile)
    except OSError as exc:
        raise GraphError(f"cannot read graph at {os.fspath(path)}: {exc}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise GraphError(f"{gfile}: not valid JSON ({exc})") from None
    return _from_doc(doc, wraw, str(gfile))


def _from_doc(doc: Any, wraw: bytes, where: str) -> Graph:
    if _get(doc, "format", str, where) != FORMAT:
        raise GraphError(f"{where}: not a flora_graph file (format {doc.get('format')!r})")
    if _get(doc, "version", int, where) != VERSION:
        raise GraphError(f"{where}: unsupported version {doc['version']!r} (this build reads {VERSION})")
    winfo = _get(doc, "weights", dict, where)
    want = _get(winfo, "sha256", str, f"{where} weights")
    if hashlib.sha256(wraw).hexdigest() != want:
        raise GraphError(f"{where}: weights file does not match its recorded SHA-256 (truncated or edited)")
    try:
        params = dict(st_load(wraw))
    except (SafetensorError, ValueError, TypeError, OSError, KeyError) as exc:  # KeyError: dtype numpy lacks (BF16, F8)
        raise GraphError(f"{where}: weights are not valid safetensors ({exc})") from None
    g = Graph(_get(doc, "name", str, where))
    defaults = _input_defaults(doc.get("input_defaults", {}), params, where)
    g.params = params
    g.dim_max = _dim_bounds(doc.get("dim_max", {}), where)
    g.dim_min = _dim_bounds(doc.get("dim_min", {}), where, "dim_min", 0)
    by_name: dict[str, ComputationNode] = {}
    input_names = _get(doc, "inputs", list, where)
    for k, nd in enumerate(_get(doc, "nodes", list, where)):
        nw = f"{where} node #{k}"
        name = _get(nd, "name", str, nw)
        nw = f"{where} node {name!r}"
        try:
            op = Op(_get(nd, "op", str, nw))
        except ValueError:
            raise GraphError(f"{nw}: unknown op {nd['op']!r}") from None
        ins = []
        for i in _get(nd, "inputs", list, nw):
            if not isinstance(i, str) or i not in by_name:
                raise GraphError(f"{nw}: input {i!r} is not defined before it")
            ins.append(by_name[i])
        attrs = schema(op).normalize_attrs(_get(nd, "attrs", dict, nw), name)
        shape = _get(nd, "shape", list, nw)
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, int | str):
                raise GraphError(f"{nw}: bad dim {d!r}")
        node = ComputationNode(
            name, op, ins, attrs, tuple(shape), _get(nd, "dtype", str, nw), _get(nd, "meta", dict, nw)
        )
        g._append(node)
        by_name[name] = node
    for n in input_names:
        if not isinstance(n, str) or n not in by_name:
            raise GraphError(f"{where}: graph input {n!r} is not a node")
        g.inputs.append(by_name[n])
    for out, n in _get(doc, "outputs", dict, where).items():
        if not isinstance(n, str) or n not in by_name:
            raise GraphError(f"{where}: output {out!r} refers to unknown node {n!r}")
        g.outputs[out] = by_name[n]
    for name, arr in defaults.items():
        arr.flags.writeable = False
        g.input_defaults[name] = arr
    try:
        verify(g)
    except GraphError as exc:
        raise GraphError(f"{where}: {exc}") from None
    unused = set(g.params) - {n.attrs["param"] for n in g.nodes if n.op is Op.CONST}
    if unused:
        raise GraphError(f"{where}: weights file holds params no node uses: {sorted(unused)[:5]}")
    return g
