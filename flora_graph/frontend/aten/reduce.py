"""ATen converters that emit the reduce family (``ReduceMean``, ``ReduceSum``, ``CumSum``).

``mean.dim``/``sum.dim_IntList`` (axes, ``keepdim``) and ``mean.default``/``sum.default``
(every axis) -> ``ReduceMean``/``ReduceSum``; ``cumsum`` -> ``CumSum``. The input is cast to
the dtype torch reduces in first (``sum`` of ints -> int64, ``dtype=``); a scalar input is
only cast.
"""

from __future__ import annotations

from typing import Any

import torch

from flora_graph.frontend.aten.registry import cast_to_out, register
from flora_graph.ir import ComputationNode, Op

__all__: list[str] = []

aten = torch.ops.aten


def _reduce_axes(x: ComputationNode, dim: Any) -> tuple[int, ...]:
    if dim is None:
        return ()
    dims = [dim] if isinstance(dim, int) else list(dim)
    return tuple(sorted(d % len(x.shape) for d in dims)) if x.shape else ()


@register(aten.mean.dim, aten.sum.dim_IntList)
def _reduce_dim(ctx, x, dim=None, keepdim=False, *, dtype=None):
    op = Op.REDUCE_MEAN if ctx.fx_node.target is aten.mean.dim else Op.REDUCE_SUM
    axes = _reduce_axes(x, dim)
    if not x.shape:
        return cast_to_out(ctx, x)
    return ctx.emit(op, [cast_to_out(ctx, x)], {"axes": axes, "keepdims": int(bool(keepdim))})


@register(aten.mean.default, aten.sum.default)
def _reduce_all(ctx, x, *, dtype=None):
    op = Op.REDUCE_MEAN if ctx.fx_node.target is aten.mean.default else Op.REDUCE_SUM
    if not x.shape:
        return cast_to_out(ctx, x)
    return ctx.emit(op, [cast_to_out(ctx, x)], {"axes": (), "keepdims": 0})


@register(aten.cumsum.default)
def _cumsum(ctx, x, dim, *, dtype=None):
    return ctx.emit(Op.CUMSUM, [cast_to_out(ctx, x)], {"axis": int(dim)})
