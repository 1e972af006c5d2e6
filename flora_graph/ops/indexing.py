"""Indexing by integer tensors: ``Gather``, ``GatherElements``, ``Index``, and their scatters
``IndexPut`` and ``ScatterElements``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. Indices are int32 or int64; a
negative index counts from the end (as ONNX); one outside ``[-size, size)`` is an error.
All are in ``OpGroup.Movement``. A scatter that writes (not adds) two values to one place has
no defined result (torch and ONNX leave the order open): the reference raises on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import broadcast_shapes, canonical_dim, format_shape, normalize_axis
from flora_graph.ops._onnx import ONNX_DTYPES, dims_tensor, int64, simple
from flora_graph.ops._torch import dim_expr, dim_source
from flora_graph.ops.registry import define

__all__: list[str] = []

INDEX_DTYPES = frozenset({"int32", "int64"})
"""The dtypes an index input may have."""
_MOVEMENT = ("Movement",)


# --------------------------------------------------------------------------- Gather
def _infer_gather(shapes, dtypes, attrs):
    """ONNX ``Gather``: ``data[:axis] + indices + data[axis+1:]``."""
    data, idx = shapes
    if not data:
        raise ShapeError("Gather: data must have rank >= 1")
    if dtypes[1] not in INDEX_DTYPES:
        raise ShapeError(f"Gather: indices must be int32 or int64, got {dtypes[1]}")
    axis = normalize_axis(attrs["axis"], len(data))
    return (*data[:axis], *idx, *data[axis + 1 :]), dtypes[0]


def _numpy_gather(data: np.ndarray, indices: np.ndarray, *, axis: int) -> np.ndarray:
    size = data.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"indices must lie in [{-size}, {size}), got {indices.min()}..{indices.max()}")
    return np.take(data, indices, axis=axis)


def _torch_gather(node: ComputationNode, args: list[str]) -> str:
    x, idx = args
    data, ind = node.inputs[0].shape, node.inputs[1].shape
    axis = node.attrs["axis"] % len(data)
    size = dim_source(x, data, axis)
    if node.inputs[1].dtype != "int64":
        idx = f"{idx}.to(torch.int64)"
    wrapped = f"torch.where({idx} < 0, {idx} + {size}, {idx})"  # ONNX: a negative index counts from the end
    if axis == 0 and len(data) == 2:
        return f"F.embedding({wrapped}, {x})"
    if len(ind) == 1:
        return f"torch.index_select({x}, {axis}, {wrapped})"
    picked = f"torch.index_select({x}, {axis}, {wrapped}.reshape([-1]))"
    if not ind:
        return f"{picked}.squeeze({axis})"
    local = [(x, data), (args[1], ind)]
    return f"{picked}.reshape([{', '.join(dim_expr(d, node, local) for d in node.shape)}])"


define(
    "GATHER", "Gather", (2, 2), {"axis": AttrSpec("int", 0)},
    infer=_infer_gather,
    doc="ONNX Gather: data[..., indices, ...] along axis (negative indices count from the end); Embedding is axis 0.",
    numpy=_numpy_gather, onnx=simple("Gather", axis="axis"), torch=_torch_gather, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- GatherElements
def _infer_gather_elements(shapes, dtypes, attrs):
    """``GatherElements``: data and indices of one rank; the result has the indices' shape."""
    data, idx = shapes
    if dtypes[1] not in INDEX_DTYPES:
        raise ShapeError(f"GatherElements: indices must be int32 or int64, got {dtypes[1]}")
    if len(data) != len(idx) or not data:
        raise ShapeError(f"GatherElements: data {format_shape(data)} and indices {format_shape(idx)} need one rank >= 1")
    normalize_axis(attrs["axis"], len(data))
    return tuple(idx), dtypes[0]


def _numpy_gather_elements(data: np.ndarray, indices: np.ndarray, *, axis: int) -> np.ndarray:
    size = data.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"indices must lie in [{-size}, {size}), got {indices.min()}..{indices.max()}")
    axis %= data.ndim
    if any(i > d for k, (i, d) in enumerate(zip(indices.shape, data.shape, strict=True)) if k != axis):
        raise IndexError(f"indices {indices.shape} exceed data {data.shape} off axis {axis}")
    window = data[tuple(slice(0, n) if k != axis else slice(None) for k, n in enumerate(indices.shape))]
    return np.take_along_axis(window, np.where(indices < 0, indices + size, indices), axis=axis)


def _torch_gather_elements(node: ComputationNode, args: list[str]) -> str:
    x, idx = args
    shape = node.inputs[0].shape
    axis = node.attrs["axis"] % len(shape)
    if node.inputs[1].dtype != "int64":
        idx = f"{idx}.to(torch.int64)"
    size = dim_source(x, shape, axis)
    return f"torch.gather({x}, {axis}, torch.where({idx} < 0, {idx} + {size}, {idx}))"


define(
    "GATHER_ELEMENTS", "GatherElements", (2, 2), {"axis": AttrSpec("int", 0)},
    infer=_infer_gather_elements,
    doc="ONNX GatherElements / torch.gather: out[i][j] = data[index[i][j]][j] (axis 0); the result has the index's shape.",
    numpy=_numpy_gather_elements, onnx=simple("GatherElements", axis="axis"), torch=_torch_gather_elements,
    groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Index
def _infer_index(shapes, dtypes, attrs):
    """``x[(:,) * axis + (i0, i1, ...)]``: ``x[:axis] + broadcast(i0, i1, ...) + x[axis + k:]``."""
    x, indices = shapes[0], shapes[1:]
    if any(d not in INDEX_DTYPES for d in dtypes[1:]):
        raise ShapeError(f"Index: indices must be int32 or int64, got {list(dtypes[1:])}")
    axis = normalize_axis(attrs["axis"], len(x)) if x else 0
    if axis + len(indices) > len(x):
        raise ShapeError(f"Index: {len(indices)} indices from axis {attrs['axis']} exceed the rank of {format_shape(x)}")
    return (*x[:axis], *broadcast_shapes(*indices), *x[axis + len(indices) :]), dtypes[0]


def _numpy_index(x: np.ndarray, *indices: np.ndarray, axis: int) -> np.ndarray:
    for k, idx in enumerate(indices):
        size = x.shape[axis + k]
        if idx.size and (idx.min() < -size or idx.max() >= size):
            raise IndexError(f"index {k} must lie in [{-size}, {size}), got {idx.min()}..{idx.max()}")
    return x[(slice(None),) * (axis % x.ndim) + tuple(indices)]


def _stacked_indices(ctx: Any, node: ComputationNode, first: int, bshape: tuple) -> str:
    """The index inputs ``node.inputs[first:]`` broadcast to ``bshape``, cast to int64 and stacked on a
    new last axis: the ``indices`` input of ``GatherND`` / ``ScatterND``."""
    target = dims_tensor(ctx, bshape, node, "broadcast")
    last = int64(ctx, [-1], f"{node.name}/axes")
    count = len(node.inputs) - first
    stacked = [ctx.emit("Unsqueeze", [ctx.emit("Expand", [ctx.arg(node, i), target]), last])
               for i in range(first, first + count)]
    if any(i.dtype != "int64" for i in node.inputs[first:]):
        stacked = [ctx.emit("Cast", [s], to=ONNX_DTYPES["int64"]) for s in stacked]
    return ctx.emit("Concat", stacked, axis=-1) if count > 1 else stacked[0]


def _onnx_index(ctx: Any, node: ComputationNode, out: str) -> None:
    """``GatherND`` over the indices broadcast to one shape and stacked on a last axis; axes before
    ``axis`` are moved behind the indexed ones first and back after."""
    x, k = node.inputs[0], len(node.inputs) - 1
    rank, axis = len(x.shape), node.attrs["axis"] % len(x.shape)
    bshape = node.shape[axis : len(node.shape) - (rank - axis - k)]
    idx = _stacked_indices(ctx, node, 1, bshape)
    data = ctx.arg(node, 0)
    if axis == 0:
        ctx.emit("GatherND", [data, idx], [out])
        return
    perm = [*range(axis, axis + k), *range(axis), *range(axis + k, rank)]
    picked = ctx.emit("GatherND", [ctx.emit("Transpose", [data], perm=perm), idx])  # B + x[:axis] + x[axis+k:]
    nb = len(bshape)
    ctx.emit("Transpose", [picked], [out], perm=[*range(nb, nb + axis), *range(nb), *range(nb + axis, nb + rank - k)])


def _torch_index(node: ComputationNode, args: list[str]) -> str:
    axis = node.attrs["axis"] % len(node.inputs[0].shape)
    return f"{args[0]}[{', '.join([':'] * axis + args[1:])}]"


define(
    "INDEX", "Index", (2, None), {"axis": AttrSpec("int", 0)},
    infer=_infer_index,
    doc="numpy/torch advanced indexing x[..., i0, i1, ...] of consecutive axes from axis; the indices broadcast.",
    numpy=_numpy_index, onnx=_onnx_index, torch=_torch_index, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- scatters
def _no_duplicates(op: str, positions: list[np.ndarray], dims: tuple[int, ...]) -> None:
    """Refuse a write of two values to one place (its result is not defined)."""
    if not dims or not positions:
        return
    flat = np.ravel_multi_index([p.ravel() for p in np.broadcast_arrays(*positions)], dims)
    if np.unique(flat).size != flat.size:
        raise ValueError(f"{op}: duplicate indices write one place twice, which has no defined result")


def _infer_index_put(shapes, dtypes, attrs):
    """``x`` with ``x[(:,) * axis + (i0, i1, ...)]`` set to (or, ``accumulate``, increased by) ``values``."""
    x, values, indices = shapes[0], shapes[1], shapes[2:]
    if any(d not in INDEX_DTYPES for d in dtypes[2:]):
        raise ShapeError(f"IndexPut: indices must be int32 or int64, got {list(dtypes[2:])}")
    if dtypes[1] != dtypes[0]:
        raise ShapeError(f"IndexPut: values ({dtypes[1]}) must have x's dtype {dtypes[0]}")
    sub, _ = _infer_index([x, *indices], [dtypes[0], *dtypes[2:]], attrs)
    if tuple(canonical_dim(d) for d in broadcast_shapes(values, sub)) != tuple(canonical_dim(d) for d in sub):
        raise ShapeError(f"IndexPut: values {format_shape(values)} do not broadcast to {format_shape(sub)}")
    return tuple(x), dtypes[0]


def _numpy_index_put(x: np.ndarray, values: np.ndarray, *indices: np.ndarray, axis: int, accumulate: int) -> np.ndarray:
    axis %= x.ndim
    _numpy_index(x, *indices, axis=axis)  # the range check
    where = (slice(None),) * axis + tuple(indices)
    out = x.copy()
    if accumulate:
        np.add.at(out, where, np.broadcast_to(values, x[where].shape))
        return out
    dims = x.shape[axis : axis + len(indices)]
    _no_duplicates("IndexPut", [np.where(i < 0, i + n, i) for i, n in zip(indices, dims, strict=True)], dims)
    out[where] = values
    return out


def _onnx_index_put(ctx: Any, node: ComputationNode, out: str) -> None:
    """``ScatterND`` (reduction ``add`` when accumulating) of the values broadcast to the indexed shape;
    indices stacked as for ``Index``, axes before ``axis`` moved behind the indexed ones and back."""
    x, k = node.inputs[0], len(node.inputs) - 2
    rank, axis = len(x.shape), node.attrs["axis"] % len(x.shape)
    bshape = broadcast_shapes(*(i.shape for i in node.inputs[2:]))
    sub = (*x.shape[:axis], *bshape, *x.shape[axis + k :])
    idx = _stacked_indices(ctx, node, 2, bshape)
    values = ctx.emit("Expand", [ctx.arg(node, 1), dims_tensor(ctx, sub, node, "values")])
    reduction = "add" if node.attrs["accumulate"] else "none"
    if axis == 0:
        ctx.emit("ScatterND", [ctx.arg(node, 0), idx, values], [out], reduction=reduction)
        return
    perm = [*range(axis, axis + k), *range(axis), *range(axis + k, rank)]
    nb = len(bshape)
    data = ctx.emit("Transpose", [ctx.arg(node, 0)], perm=perm)
    values = ctx.emit("Transpose", [values], perm=[*range(axis, axis + nb), *range(axis), *range(axis + nb, len(sub))])
    put = ctx.emit("ScatterND", [data, idx, values], reduction=reduction)
    ctx.emit("Transpose", [put], [out], perm=[perm.index(i) for i in range(rank)])


def _torch_index_put(node: ComputationNode, args: list[str]) -> str:
    axis = node.attrs["axis"] % len(node.inputs[0].shape)
    idx = [a if i.dtype == "int64" else f"{a}.to(torch.int64)" for a, i in zip(args[2:], node.inputs[2:], strict=True)]
    fn = "torch.ops.aten.index_put" if axis else "torch.index_put"  # torch.index_put takes no None
    return f"{fn}({args[0]}, [{', '.join(['None'] * axis + idx)}], {args[1]}, {bool(node.attrs['accumulate'])})"


define(
    "INDEX_PUT", "IndexPut", (3, None), {"axis": AttrSpec("int", 0), "accumulate": AttrSpec("int", 0)},
    infer=_infer_index_put,
    doc="torch index_put: x with x[..., i0, i1, ...] (consecutive axes from axis) set to, or increased by, values.",
    numpy=_numpy_index_put, onnx=_onnx_index_put, torch=_torch_index_put, groups=_MOVEMENT,
)


def _infer_scatter_elements(shapes, dtypes, attrs):
    """``ScatterElements``: data, indices and updates of one rank; indices and updates of one shape."""
    data, idx, upd = shapes
    if dtypes[1] not in INDEX_DTYPES:
        raise ShapeError(f"ScatterElements: indices must be int32 or int64, got {dtypes[1]}")
    if dtypes[2] != dtypes[0]:
        raise ShapeError(f"ScatterElements: updates ({dtypes[2]}) must have the data's dtype {dtypes[0]}")
    if len(data) != len(idx) or not data or tuple(map(canonical_dim, idx)) != tuple(map(canonical_dim, upd)):
        raise ShapeError(f"ScatterElements: data {format_shape(data)}, indices {format_shape(idx)} and updates "
                         f"{format_shape(upd)} need one rank >= 1, indices and updates one shape")
    normalize_axis(attrs["axis"], len(data))
    return tuple(data), dtypes[0]


def _numpy_scatter_elements(data: np.ndarray, indices: np.ndarray, updates: np.ndarray, *, axis: int,
                            reduction: str) -> np.ndarray:
    axis %= data.ndim
    size = data.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"indices must lie in [{-size}, {size}), got {indices.min()}..{indices.max()}")
    if any(i > d for k, (i, d) in enumerate(zip(indices.shape, data.shape, strict=True)) if k != axis):
        raise IndexError(f"indices {indices.shape} exceed data {data.shape} off axis {axis}")
    where = list(np.indices(indices.shape, sparse=True))
    where[axis] = np.where(indices < 0, indices + size, indices)
    out = data.copy()
    if reduction != "none":
        _REDUCE_AT[reduction].at(out, tuple(where), updates)
    else:
        _no_duplicates("ScatterElements", where, data.shape)
        out[tuple(where)] = updates
    return out


_REDUCE_AT = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}
"""ScatterElements' reductions (ONNX's names) -> the numpy ufunc whose ``.at`` applies them in place."""
_TORCH_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


def _torch_scatter_elements(node: ComputationNode, args: list[str]) -> str:
    x, idx, upd = args
    shape = node.inputs[0].shape
    axis = node.attrs["axis"] % len(shape)
    if node.inputs[1].dtype != "int64":
        idx = f"{idx}.to(torch.int64)"
    wrapped = f"torch.where({idx} < 0, {idx} + {dim_source(x, shape, axis)}, {idx})"
    reduction = node.attrs["reduction"]
    if reduction in _TORCH_REDUCE:
        return f"torch.scatter_reduce({x}, {axis}, {wrapped}, {upd}, {_TORCH_REDUCE[reduction]!r})"
    fn = "torch.scatter_add" if reduction == "add" else "torch.scatter"
    return f"{fn}({x}, {axis}, {wrapped}, {upd})"


define(
    "SCATTER_ELEMENTS", "ScatterElements", (3, 3),
    {"axis": AttrSpec("int", 0), "reduction": AttrSpec("str", "none", choices=("none", *_REDUCE_AT))},
    infer=_infer_scatter_elements,
    doc="ONNX ScatterElements / torch.scatter(_add, _reduce): data with data[index[i][j]][j] (axis 0) set to, or "
        "combined (add, mul, max, min) with, updates[i][j].",
    numpy=_numpy_scatter_elements, onnx=simple("ScatterElements", axis="axis", reduction="reduction"),
    torch=_torch_scatter_elements, groups=_MOVEMENT,
)
