"""ATen converters that emit the indexing family (``Gather``, ``GatherElements``, ``Index``).

``embedding`` -> ``Gather`` on axis 0; ``index_select`` -> ``Gather``; ``select.int`` ->
``Gather`` of a constant index (a static index only); ``unbind`` -> one ``Gather`` per
position of a static axis (a tuple); ``gather`` -> ``GatherElements``; ``index.Tensor``
with one index tensor -> ``Gather``, with several on consecutive axes -> ``Index`` (bool
masks and non-consecutive axes are refused); ``diagonal`` -> ``Index`` of two constant
ranges over static axes (after a ``Transpose`` moving them last); ``slice_scatter`` and
``select_scatter`` along a static axis -> ``Concat`` of the kept slices and ``src`` (step 1), else
``Where`` of a constant mask over ``Gather`` of ``src``; ``index_put`` -> ``IndexPut`` (index
tensors on consecutive axes, no bool masks); ``scatter.src``/``scatter.value``/``scatter_add``
-> ``ScatterElements`` (``src`` cut to the index's shape, a value broadcast to it).
"""

from __future__ import annotations

import numpy as np
import torch

from flora_graph.frontend.aten.registry import SymDim, as_dtype, axis_of, refuse, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import canonical_dim

__all__: list[str] = []

aten = torch.ops.aten


@register(aten.embedding.default)
def _embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return ctx.emit(Op.GATHER, [weight, indices], {"axis": 0})


@register(aten.index_select.default)
def _index_select(ctx, x, dim, index):
    return ctx.emit(Op.GATHER, [x, index], {"axis": int(dim)})


@register(aten.gather.default)
def _gather_elements(ctx, x, dim, index, *, sparse_grad=False):
    return ctx.emit(Op.GATHER_ELEMENTS, [x, index], {"axis": int(dim)})


@register(aten.select.int)
def _select(ctx, x, dim, index):
    if isinstance(index, SymDim):
        raise refuse(ctx, "select at a dynamic index")
    idx = ctx.new_param(f"{ctx.fx_node.name}_index", np.asarray(int(index), dtype=np.int64))
    return ctx.emit(Op.GATHER, [x, idx], {"axis": int(dim)})


@register(aten.unbind.int)
def _unbind(ctx, x, dim=0):
    axis = axis_of(int(dim), len(x.shape))
    if not isinstance(x.shape[axis], int):
        raise refuse(ctx, f"unbind along the dynamic dim {x.shape[axis]!r}")
    picks = [ctx.new_param(f"{ctx.fx_node.name}_index", np.asarray(i, dtype=np.int64)) for i in range(x.shape[axis])]
    return tuple(ctx.emit(Op.GATHER, [x, i], {"axis": axis}) for i in picks)


@register(aten.index.Tensor)
def _index(ctx, x, indices):
    """One index tensor -> ``Gather``; several on consecutive axes -> ``Index`` (their shapes broadcast)."""
    used = [(i, t) for i, t in enumerate(indices) if t is not None]
    if any(t.dtype == "bool" for _, t in used):
        raise refuse(ctx, "indexing with a bool mask")
    if not used or [i for i, _ in used] != list(range(used[0][0], used[0][0] + len(used))):
        raise refuse(ctx, "advanced indexing of axes that are not consecutive")
    if len(used) == 1:
        return ctx.emit(Op.GATHER, [x, used[0][1]], {"axis": used[0][0]})
    return ctx.emit(Op.INDEX, [x, *(t for _, t in used)], {"axis": used[0][0]})


# --------------------------------------------------------------------------- diagonal
@register(aten.diagonal.default)
def _diagonal(ctx, x, offset=0, dim1=0, dim2=1):
    rank = len(x.shape)
    a, b = axis_of(int(dim1), rank), axis_of(int(dim2), rank)
    if a == b or not isinstance(x.shape[a], int) or not isinstance(x.shape[b], int):
        raise refuse(ctx, "diagonal of one axis or of dynamic axes")
    off = int(offset)
    n = max(0, min(x.shape[a] + min(off, 0), x.shape[b] - max(off, 0)))
    perm = (*(i for i in range(rank) if i not in (a, b)), a, b)
    if perm != tuple(range(rank)):
        x = ctx.emit(Op.TRANSPOSE, [x], {"perm": perm})
    rows = ctx.new_param(f"{ctx.fx_node.name}_rows", np.arange(n, dtype=np.int64) - min(off, 0))
    cols = ctx.new_param(f"{ctx.fx_node.name}_cols", np.arange(n, dtype=np.int64) + max(off, 0))
    return ctx.emit(Op.INDEX, [x, rows, cols], {"axis": rank - 2})


# --------------------------------------------------------------------------- scatters
def _scatter_slice(ctx, x, src, axis: int, positions: range):
    """``x`` with ``src`` written at ``positions`` of the static ``axis``."""
    src = as_dtype(ctx, src, x.dtype)
    n, rank = x.shape[axis], len(x.shape)
    if positions.step == 1:
        parts = []
        if positions.start > 0:
            parts.append(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (positions.start,)}))
        parts.append(src)
        if positions.stop < n:
            parts.append(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (positions.stop,), "ends": (n,)}))
        return parts[0] if len(parts) == 1 else ctx.emit(Op.CONCAT, parts, {"axis": axis})
    where = np.zeros(n, dtype=np.int64)
    where[list(positions)] = np.arange(len(positions))
    mask = np.zeros(n, dtype=bool)
    mask[list(positions)] = True
    picked = ctx.emit(Op.GATHER, [src, ctx.new_param(f"{ctx.fx_node.name}_from", where)], {"axis": axis})
    cond = ctx.new_param(f"{ctx.fx_node.name}_mask", mask.reshape((n,) + (1,) * (rank - axis - 1)))
    return ctx.emit(Op.WHERE, [cond, picked, x], {})


def _static_axis(ctx, x, dim) -> int:
    axis = axis_of(int(dim), len(x.shape))
    if not isinstance(x.shape[axis], int):
        raise refuse(ctx, f"a scatter along the dynamic dim {x.shape[axis]!r}")
    return axis


@register(aten.slice_scatter.default)
def _slice_scatter(ctx, x, src, dim=0, start=None, end=None, step=1):
    if any(isinstance(v, SymDim) for v in (start, end)):
        raise refuse(ctx, "slice_scatter at dynamic bounds")
    axis = _static_axis(ctx, x, dim)
    positions = range(x.shape[axis])[slice(start, end, int(step))]
    if not len(positions):
        return x
    return _scatter_slice(ctx, x, src, axis, positions)


@register(aten.select_scatter.default)
def _select_scatter(ctx, x, src, dim, index):
    if isinstance(index, SymDim):
        raise refuse(ctx, "select_scatter at a dynamic index")
    axis = _static_axis(ctx, x, dim)
    i = int(index) % x.shape[axis]
    src = ctx.emit(Op.UNSQUEEZE, [as_dtype(ctx, src, x.dtype)], {"axes": (axis,)})
    return _scatter_slice(ctx, x, src, axis, range(i, i + 1))


@register(aten.index_put.default)
def _index_put(ctx, x, indices, values, accumulate=False):
    used = [(i, t) for i, t in enumerate(indices) if t is not None]
    if any(t.dtype == "bool" for _, t in used):
        raise refuse(ctx, "index_put with a bool mask (data-dependent positions)")
    if not used or [i for i, _ in used] != list(range(used[0][0], used[0][0] + len(used))):
        raise refuse(ctx, "index_put of axes that are not consecutive")
    values = as_dtype(ctx, values, x.dtype)
    return ctx.emit(Op.INDEX_PUT, [x, values, *(t for _, t in used)],
                    {"axis": used[0][0], "accumulate": int(bool(accumulate))})


def _scatter(ctx, x, dim, index, src, reduction: str):
    axis = axis_of(int(dim), len(x.shape))
    if isinstance(src, ComputationNode):
        src = as_dtype(ctx, src, x.dtype)
        cut = [a for a in range(len(index.shape)) if canonical_dim(src.shape[a]) != canonical_dim(index.shape[a])]
        if cut:
            src = ctx.emit(Op.SLICE, [src], {"axes": tuple(cut), "starts": (0,) * len(cut),
                                            "ends": tuple(index.shape[a] for a in cut)})
    else:
        src = ctx.emit(Op.EXPAND, [as_dtype(ctx, src, x.dtype)], {"shape": tuple(index.shape)})
    return ctx.emit(Op.SCATTER_ELEMENTS, [x, index, src], {"axis": axis, "reduction": reduction})


@register(aten.scatter.src, aten.scatter.value)
def _scatter_none(ctx, x, dim, index, src):
    return _scatter(ctx, x, dim, index, src, "none")


@register(aten.scatter_add.default)
def _scatter_add(ctx, x, dim, index, src):
    return _scatter(ctx, x, dim, index, src, "add")
