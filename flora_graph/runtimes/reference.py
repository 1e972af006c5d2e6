"""The numpy reference interpreter: runs a whole graph on the ops' numpy rules.

Each op's numpy rule, the executable definition every other backend is tested against,
lives with the op in its :mod:`flora_graph.ops` family module; one node is evaluated by
:func:`flora_graph.ops.evaluate.eval_node`. This module is the driver: :func:`check_inputs`
converts and checks the inputs and binds named dims, and :func:`run` walks the nodes in
order (the torch.fx ``Interpreter`` / JAX ``eval_jaxpr`` pattern), keeps values in an
environment and frees each one after its last use.

:func:`to_array` and :func:`cast_array` are the one conversion of data a caller hands in,
shared by every backend (through :func:`check_inputs`), the serving sessions and adapter
weights: anything that is not a dense array of numbers or bools is refused by a typed error
naming the input, never passed on to fail inside numpy, torch or ONNX Runtime. Before a
node runs, :func:`run` computes the size of its result from its declared shape and the
bound dims and refuses, naming the node, one that could never fit in memory; a
``MemoryError`` inside an op is raised as :class:`GraphError` naming the node.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from flora_graph.errors import GraphError, RuntimeInputError, ShapeError
from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op
from flora_graph.ir.shapes import dim_names, dim_terms, format_shape, is_dim_name, linear_rest
from flora_graph.ops.evaluate import eval_dim, eval_node, np_dtype

__all__ = ["cast_array", "check_inputs", "max_result_bytes", "run", "to_array"]


# --------------------------------------------------------------------------- inputs
_KINDS = "biuf"  # bool, ints, floats; "V" only for ml_dtypes' bfloat16 & co (no fields, a dtype name)


def _torch_array(value: Any, what: str, error: type[Exception]) -> np.ndarray:
    """A torch tensor's data as numpy; refuses tensors that hold no dense, readable data."""
    layout = str(value.layout).removeprefix("torch.")
    if value.is_nested:
        raise error(f"{what}: a nested tensor is not supported; pad it to a dense tensor")
    if layout != "strided":
        raise error(f"{what}: a {layout} tensor is not supported; pass a dense tensor (tensor.to_dense())")
    if value.device.type == "meta":
        raise error(f"{what}: a meta tensor has no data")
    if value.is_quantized:
        raise error(f"{what}: a quantized tensor ({value.dtype}) is not supported; dequantize it")
    if value.is_complex():
        raise error(f"{what}: dtype {str(value.dtype).removeprefix('torch.')} (complex) is not supported")
    try:
        t = value.detach().cpu().resolve_neg()
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
    except Exception as exc:  # a dtype numpy has no match for (float8, ...), a tensor subclass, ...
        raise error(f"{what}: cannot read {type(value).__name__} of dtype {value.dtype} as an array "
                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def to_array(value: Any, what: str, error: type[Exception] = RuntimeInputError) -> np.ndarray:
    """``value`` (numpy array, torch tensor or array-like) as a numpy array of bools or numbers.

    Refused with ``error`` naming ``what``: sparse, meta, nested and quantized tensors, and
    anything numpy makes into strings, bytes, objects, complex numbers, records or dates
    (a ragged list, a dict, ``None``), whatever exception the conversion itself raises.
    """
    torch = sys.modules.get("torch")  # never imported here: a tensor exists only if torch is loaded
    if torch is not None and isinstance(value, torch.Tensor):
        arr = _torch_array(value, what, error)
    else:
        try:
            arr = np.asarray(value)
        except Exception as exc:  # ragged lists, objects whose __array__ raises, ...
            msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise error(f"{what}: cannot convert {type(value).__name__} to an array ({msg})") from None
    dt = arr.dtype
    if dt.kind not in _KINDS and not (dt.kind == "V" and dt.names is None and not dt.name.startswith("void")):
        kind = {"U": "strings", "S": "bytes", "O": "Python objects", "c": "complex numbers", "V": "records",
                "M": "dates", "m": "time deltas"}.get(dt.kind, dt.kind)
        raise error(f"{what}: dtype {dt} ({kind}) cannot be cast to numbers or bools, which graphs compute on")
    return arr


def cast_array(arr: np.ndarray, dtype: str | np.dtype, what: str, error: type[Exception] = RuntimeInputError) -> np.ndarray:
    """Cast ``arr`` to ``dtype`` where safe: floats and ints to a float, ints to an int, bools to bool."""
    want = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    kind = arr.dtype.kind
    ok = {"f": "fiu", "V": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(want.kind, "")  # "V": bfloat16
    if kind not in ok and arr.dtype != want:
        raise error(f"{what}: dtype {arr.dtype} cannot be cast to the declared {want.name}")
    return arr.astype(want, copy=False)


def _bind_dim(dims: dict[str, int], dim: int | str, size: int, where: str) -> None:
    if isinstance(dim, int):
        if dim != size:
            raise RuntimeInputError(f"{where} has size {size}, the graph declares {dim}")
    elif dims.setdefault(dim, size) != size:
        raise RuntimeInputError(f"{where} binds dim {dim!r} to {size}, but another input bound it to {dims[dim]}")


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False  # no op may write into the caller's data or the graph's weights
    return view


def check_inputs(graph: Graph, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Convert, cast and shape-check ``inputs``; return arrays by name and the bound named dims.

    An input left out takes its default (``graph.input_defaults``), which is checked and
    binds dims as a given input does; the arrays returned include it.
    """
    if not isinstance(inputs, Mapping):
        raise RuntimeInputError(f"inputs must be a mapping {{input name: array}}, got {type(inputs).__name__}; "
                                f"graph {graph.name!r} takes {[n.name for n in graph.inputs]}")
    declared = {n.name: n for n in graph.inputs}
    unknown = sorted((repr(k) for k in inputs if k not in declared), key=str)
    if unknown:
        raise RuntimeInputError(f"unknown input(s) [{', '.join(unknown)}]; graph {graph.name!r} takes {sorted(declared)}")
    defaults = graph.input_defaults
    missing = [k for k in declared if k not in inputs and k not in defaults]
    if missing:
        raise RuntimeInputError(f"missing input(s) {missing} for graph {graph.name!r}")
    arrays: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    compound: list[tuple[int | str, int, str]] = []
    given = [k for k in declared if k in inputs]
    for name in given + [k for k in declared if k not in inputs]:  # defaults last: a given input binds its dims first
        node = declared[name]
        where = f"input {name!r}"
        arr = cast_array(to_array(inputs[name], where), node.dtype, where) if name in inputs else defaults[name]
        label = where if name in inputs else f"{where} (its default)"
        if arr.ndim != len(node.shape):
            raise RuntimeInputError(
                f"{label} has rank {arr.ndim} (shape {list(arr.shape)}), the graph declares {format_shape(node.shape)}"
            )
        for i, (dim, size) in enumerate(zip(node.shape, arr.shape, strict=True)):
            where = f"{label} dim {i}"
            if isinstance(dim, str) and not is_dim_name(dim):
                compound.append((dim, size, where))
            else:
                _bind_dim(dims, dim, size, where)
        arrays[name] = arr
    for dim, size, where in compound:  # "batch*seq", "past_seq+seq": check once its names are bound
        value = eval_dim(dim, dims)
        if value is None:  # one name unbound, a term of its own ("past_seq+seq" beside "seq"): it is the rest
            for name in sorted({n for _, names in dim_terms(dim) for n in names if n not in dims and is_dim_name(n)}):
                rest = linear_rest(dim, name)
                known = None if rest is None else eval_dim(rest, dims)
                if known is not None:
                    if size < known:
                        raise RuntimeInputError(f"{where} has size {size}: dim {dim!r} is at least {rest!r} = {known}")
                    _bind_dim(dims, name, size - known, where)
                    value = size
                    break
        _bind_dim(dims, dim if value is None else value, size, where)
    _check_dim_bounds(graph, dims)
    return {k: arrays[k] for k in declared}, dims


def _check_dim_bounds(graph: Graph, dims: Mapping[str, int]) -> None:
    """Refuse a named dim bound outside ``[graph.dim_min, graph.dim_max]``, naming the dim, the input and the bound."""
    for dim, size in dims.items():
        lo, hi = graph.dim_min.get(dim, 0), graph.dim_max.get(dim)
        if lo <= size and (hi is None or size <= hi):
            continue
        where = next((f"input {n.name!r} dim {i}" for n in graph.inputs for i, d in enumerate(n.shape) if d == dim), "")
        side, bound = ("past its maximum", hi) if hi is not None and size > hi else ("below its minimum", lo)
        raise RuntimeInputError(
            f"{where}: dim {dim!r} is {size}, {side} {bound} (graph {graph.name!r} takes "
            f"sizes {lo}..{hi if hi is not None else 'any'} of {dim!r}: graph.dim_min/dim_max)"
        )


# --------------------------------------------------------------------------- interpreter
def max_result_bytes() -> int:
    """The largest result one node may have on the numpy backend: this machine's physical memory.

    A larger array can never be materialised; refusing it before the allocation turns an
    out-of-memory kill (or a ``MemoryError``) into a typed error naming the node.
    """
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return 1 << 46


def _check_size(node: ComputationNode, dims: Mapping[str, int], limit: int) -> None:
    """Refuse a node whose declared result (under the bound dims) would exceed ``limit`` bytes."""
    sizes = [eval_dim(d, dims) for d in node.shape]
    if any(s is None for s in sizes):
        return
    count = math.prod(int(s) for s in sizes)  # type: ignore[arg-type]
    nbytes = count * np_dtype(node.dtype).itemsize
    if nbytes > limit:
        bound = {d: dims[d] for d in dims if any(d in dim_names(s) for s in node.shape)}
        raise (RuntimeInputError if bound else GraphError)(
            f"node {node.name!r} ({node.op.value}) would produce shape {sizes} {node.dtype}, {nbytes / 2**30:.3g} GiB, "
            f"more than this machine's memory ({limit / 2**30:.3g} GiB)"
            + (f"; the inputs bind {bound}" if bound else "")
        )


def _check_shape(node: ComputationNode, value: np.ndarray, dims: Mapping[str, int]) -> None:
    want = [eval_dim(d, dims) for d in node.shape]
    if len(want) != value.ndim or any(w is not None and w != s for w, s in zip(want, value.shape, strict=False)):
        raise ShapeError(
            f"node {node.name!r} ({node.op.value}) produced shape {list(value.shape)}, "
            f"its declared shape is {format_shape(node.shape)} with {dict(dims)}"
        )


def run(graph: Graph, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run ``graph`` on named inputs (numpy arrays, torch tensors or array-likes).

    Returns ``{output name: array}``. Only nodes an output depends on are evaluated; each
    value is freed after its last use. Raises :class:`RuntimeInputError` (naming the
    input) for missing, unknown, mis-shaped or mistyped inputs, and :class:`ShapeError`
    when a node's result disagrees with its declared shape.
    """
    arrays, dims = check_inputs(graph, inputs)
    limit = max_result_bytes()
    env = {name: _readonly(arr) for name, arr in arrays.items()}
    order = graph.live_nodes()
    last_use = {i.name: pos for pos, n in enumerate(order) for i in n.inputs}
    keep = {n.name for n in graph.outputs.values()}
    for pos, node in enumerate(order):
        if node.op is Op.INPUT:
            continue
        if node.op is Op.CONST:
            if node.attrs["param"] not in graph.params:
                raise GraphError(f"Const node {node.name!r} refers to unknown param {node.attrs['param']!r}")
            value = _readonly(graph.params[node.attrs["param"]])
        else:
            try:
                args = [env[i.name] for i in node.inputs]
            except KeyError as exc:
                raise GraphError(f"node {node.name!r} reads {exc.args[0]!r} before it is defined") from None
            _check_size(node, dims, limit)
            value = eval_node(node, args, dims)
            for i in node.inputs:
                if last_use[i.name] == pos and i.name not in keep:
                    env.pop(i.name, None)
        _check_shape(node, value, dims)
        env[node.name] = value
    out: dict[str, np.ndarray] = {}
    for key, node in graph.outputs.items():
        value = env[node.name]
        # hand back arrays the caller owns: no views of weights/inputs, no aliasing between outputs
        out[key] = value.copy() if not value.flags.writeable or any(v is value for v in out.values()) else value
    return out
