"""ATen converters that create tensors: ``Arange`` and constants.

``arange`` (all three overloads) -> a constant when every bound is static (or any is a
float), else ``Arange`` with the dynamic bounds as dim attributes (``Arange(end="seq")``);
``full``/``ones``/``zeros``, ``new_full``/``new_ones``/``new_zeros`` and
``full_like``/``ones_like``/``zeros_like`` -> a constant when every size is static, else
``Expand`` of a scalar to the named sizes; ``empty.memory_format``/``empty_strided``/``empty_like``
-> zeros the same way (torch leaves their values unspecified; strides and memory formats are
layouts, which the IR does not have); ``scalar_tensor`` -> a rank-0 constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.frontend.aten.registry import SymDim, dim_of, out_dtype, refuse, register
from flora_graph.ir import ComputationNode, Op

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten


@register(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(ctx, *bounds, **kwargs):
    dtype = out_dtype(ctx)
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
    if any(isinstance(b, float) for b in (start, end, step)):
        if any(isinstance(b, SymDim) for b in (start, end, step)):
            raise refuse(ctx, "arange with float and dynamic bounds")
        return ctx.new_param(ctx.fx_node.name, np.arange(start, end, step, dtype=np.float64).astype(dtype))
    start, end, step = (dim_of(ctx, b) for b in (start, end, step))
    if all(isinstance(b, int) for b in (start, end, step)):
        return ctx.new_param(ctx.fx_node.name, np.arange(start, end, step, dtype=dtype))
    if dtype not in ("int32", "int64", "float32", "float64"):
        raise refuse(ctx, f"arange of dtype {dtype}")
    return ctx.emit(Op.ARANGE, [], {"start": start, "end": end, "step": step, "dtype": dtype})


def _filled(ctx: CaptureContext, size: Sequence[Any], value: Any) -> ComputationNode:
    """``size`` filled with ``value`` in the node's dtype: a constant, or ``Expand`` of a scalar to named sizes."""
    dtype = out_dtype(ctx)
    dims = [dim_of(ctx, s) for s in size]
    if isinstance(value, SymDim):
        raise refuse(ctx, "a tensor filled with a dynamic size")
    if all(isinstance(d, int) for d in dims):
        return ctx.new_param(ctx.fx_node.name, np.full([int(d) for d in dims], value, dtype=dtype))
    scalar = ctx.new_param(f"{ctx.fx_node.name}_value", np.asarray(value, dtype=dtype))
    return ctx.emit(Op.EXPAND, [scalar], {"shape": tuple(dims)})


@register(aten.full.default)
def _full(ctx, size, fill_value, **kwargs):
    return _filled(ctx, size, fill_value)


@register(aten.ones.default, aten.zeros.default)
def _ones_zeros(ctx, size, **kwargs):
    return _filled(ctx, size, 1 if ctx.fx_node.target is aten.ones.default else 0)


@register(aten.new_ones.default, aten.new_zeros.default)
def _new_ones_zeros(ctx, x, size, **kwargs):
    return _filled(ctx, size, 1 if ctx.fx_node.target is aten.new_ones.default else 0)


@register(aten.new_full.default)
def _new_full(ctx, x, size, fill_value, **kwargs):
    return _filled(ctx, size, fill_value)


@register(aten.full_like.default)
def _full_like(ctx, x, fill_value, **kwargs):
    return _filled(ctx, x.shape, fill_value)


@register(aten.ones_like.default, aten.zeros_like.default)
def _ones_zeros_like(ctx, x, **kwargs):
    value = 1 if ctx.fx_node.target is aten.ones_like.default else 0
    return _filled(ctx, x.shape, value)


@register(aten.empty.memory_format)
def _empty(ctx, size, **kwargs):
    """Zeros: one valid value of uninitialized memory, the same on every backend."""
    return _filled(ctx, size, 0)


@register(aten.empty_strided.default)
def _empty_strided(ctx, size, stride, **kwargs):
    """Zeros of ``size``; ``stride`` is a memory layout, which the IR's tensors do not have."""
    return _filled(ctx, size, 0)


@register(aten.empty_like.default)
def _empty_like(ctx, x, **kwargs):
    return _filled(ctx, x.shape, 0)


@register(aten.scalar_tensor.default)
def _scalar_tensor(ctx, value, **kwargs):
    if isinstance(value, SymDim):
        raise refuse(ctx, "a tensor holding a dynamic size")
    return ctx.new_param(ctx.fx_node.name, np.asarray(value, dtype=out_dtype(ctx)))
