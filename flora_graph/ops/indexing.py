"""Indexing by integer tensors: ``Gather``, ``GatherElements``, ``Index``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. Indices are int32 or int64; a
negative index counts from the end (as ONNX); one outside ``[-size, size)`` is an error.
All three are in ``OpGroup.Movement``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import broadcast_shapes, format_shape, normalize_axis
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


def _onnx_index(ctx: Any, node: ComputationNode, out: str) -> None:
    """``GatherND`` over the indices broadcast to one shape and stacked on a last axis; axes before
    ``axis`` are moved behind the indexed ones first and back after."""
    x, k = node.inputs[0], len(node.inputs) - 1
    rank, axis = len(x.shape), node.attrs["axis"] % len(x.shape)
    bshape = node.shape[axis : len(node.shape) - (rank - axis - k)]
    target = dims_tensor(ctx, bshape, node, "broadcast")
    last = int64(ctx, [-1], f"{node.name}/axes")
    stacked = [ctx.emit("Unsqueeze", [ctx.emit("Expand", [ctx.arg(node, i), target]), last]) for i in range(1, k + 1)]
    if any(i.dtype != "int64" for i in node.inputs[1:]):
        stacked = [ctx.emit("Cast", [s], to=ONNX_DTYPES["int64"]) for s in stacked]
    idx = ctx.emit("Concat", stacked, axis=-1) if k > 1 else stacked[0]
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
