"""ATen converters that emit the indexing family (``Gather``, ``GatherElements``, ``Index``).

``embedding`` -> ``Gather`` on axis 0; ``index_select`` -> ``Gather``; ``select.int`` ->
``Gather`` of a constant index (a static index only); ``unbind`` -> one ``Gather`` per
position of a static axis (a tuple); ``gather`` -> ``GatherElements``; ``index.Tensor``
with one index tensor -> ``Gather``, with several on consecutive axes -> ``Index`` (bool
masks and non-consecutive axes are refused).
"""

from __future__ import annotations

import numpy as np
import torch

from flora_graph.frontend.aten.registry import SymDim, axis_of, refuse, register
from flora_graph.ir import Op

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
