"""ATen converters that create tensors: ``Arange`` and constants.

``arange`` (all three overloads) -> a constant when every bound is static (or any is a
float), else ``Arange`` with the dynamic bounds as dim attributes (``Arange(end="seq")``);
``full``/``ones``/``zeros``, ``new_full``/``new_ones``/``new_zeros`` and
``full_like``/``ones_like``/``zeros_like`` -> a constant when every size is static, else
``Expand`` of a scalar to the named sizes; ``empty.memory_format``/``empty_strided``/``empty_like``
-> zeros the same way (torch leaves their values unspecified; strides and memory formats are
layouts, which the IR does not have); ``scalar_tensor`` -> a rank-0 constant; ``eye`` (``n``, or ``n, m``) -> a
constant when both sizes are static, else ``Equal`` of two ``Arange`` s (rows against columns) cast to the dtype
(XLNet's ``torch.eye(qlen)`` mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import ShapeError, UnsupportedOpError
from flora_graph.frontend.aten.registry import SymDim, as_dtype, dim_of, out_dtype, refuse, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import canonical_dim

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
            if all(float(b).is_integer() for b in (start, end, step) if isinstance(b, float)):
                return _counted_arange(ctx, dtype)  # XLNet's arange(klen, -qlen, -1.0): whole numbers
            raise refuse(ctx, "arange with float and dynamic bounds")
        return ctx.new_param(ctx.fx_node.name, np.arange(start, end, step, dtype=np.float64).astype(dtype))
    if dtype not in ("int32", "int64", "float32", "float64") and any(isinstance(b, SymDim) for b in bounds):
        raise refuse(ctx, f"arange of dtype {dtype}")
    try:
        start, end, step = (dim_of(ctx, b) for b in (start, end, step))
    except UnsupportedOpError as exc:  # a bound that is no dim: Parakeet's relative positions, arange(n - 1, -n, -1)
        try:
            return _counted_arange(ctx, dtype)
        except UnsupportedOpError:
            raise exc from None  # the bound that is no dim says more than the length
    if all(isinstance(b, int) for b in (start, end, step)):
        return ctx.new_param(ctx.fx_node.name, np.arange(start, end, step, dtype=dtype))
    if isinstance(step, int) and step < 0:
        return _counted_arange(ctx, dtype)
    return ctx.emit(Op.ARANGE, [], {"start": start, "end": end, "step": step, "dtype": dtype})


def _counted_arange(ctx: CaptureContext, dtype: str) -> ComputationNode:
    """``arange(start, end, step)`` with a static step as ``start + step * Arange(0, n)``, ``n`` its length
    ``ceil((end - start) / step)`` where that is a dim though a bound is not one (``arange(n - 1, -n, -1)``:
    ``2n - 1`` values) or the step is negative, and ``start`` a dim or a number."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    args = list(ctx.fx_node.args) + [ctx.fx_node.kwargs[k] for k in ("start", "end", "step") if k in ctx.fx_node.kwargs]
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in args]
    b, e, s = (0, vals[0], 1) if len(vals) == 1 else (*vals, 1)[:3]
    b, e, s = (int(v) if isinstance(v, float) and v.is_integer() else v for v in (b, e, s))
    if not isinstance(s, int) or s == 0 or any(not isinstance(v, int | torch.SymInt) for v in (b, e)):
        raise refuse(ctx, "arange with a bound that is no dim")
    expr = [sympy.Integer(v) if isinstance(v, int) else v.node.expr for v in (b, e)]
    span = expr[1] - expr[0] if s > 0 else expr[0] - expr[1]
    length = span if abs(s) == 1 else FloorDiv(span + abs(s) - 1, abs(s))
    try:
        n = canonical_dim(ctx.ir_dim(sympy.expand(length)))
        first = b if isinstance(b, int) else canonical_dim(ctx.ir_dim(b))
    except ShapeError:
        raise refuse(ctx, f"arange from {ctx.ir_dim(b)} to {ctx.ir_dim(e)} by {s}: its length or start is "
                          "no dim") from None
    ramp = ctx.emit(Op.ARANGE, [], {"start": 0, "end": n, "step": 1, "dtype": dtype})
    if s != 1:
        ramp = ctx.emit(Op.MUL, [ramp, as_dtype(ctx, s, dtype)])
    if first == 0:
        return ramp
    return ctx.emit(Op.ADD, [ramp, as_dtype(ctx, first if isinstance(first, int) else SymDim(first), dtype)])


def _filled(ctx: CaptureContext, size: Sequence[Any], value: Any) -> ComputationNode:
    """``size`` filled with ``value`` in the node's dtype: a constant, or ``Expand`` of a scalar to named sizes (a
    dynamic size as the value: ``full_like(indices, keys)``, a sentinel past the last key)."""
    dtype = out_dtype(ctx)
    dims = [dim_of(ctx, s) for s in size]
    if isinstance(value, SymDim):
        return ctx.emit(Op.EXPAND, [as_dtype(ctx, value, dtype)], {"shape": tuple(dims)})
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


@register(aten.new_empty.default)
def _new_empty(ctx, x, size, **kwargs):
    """Zeros: one valid value of uninitialized memory, the same on every backend."""
    return _filled(ctx, size, 0)


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
        return as_dtype(ctx, value, out_dtype(ctx))
    return ctx.new_param(ctx.fx_node.name, np.asarray(value, dtype=out_dtype(ctx)))


@register(aten.eye.default, aten.eye.m)
def _eye(ctx, n, m=None, **kwargs):
    """``n x m`` (``m``: ``n``) ones on the diagonal: a constant, or where a size is dynamic, row index == column
    index."""
    dtype = out_dtype(ctx)
    n = dim_of(ctx, n)
    m = n if m is None else dim_of(ctx, m)
    if isinstance(n, int) and isinstance(m, int):
        return ctx.new_param(ctx.fx_node.name, np.eye(n, m, dtype=dtype))

    def positions(size: Any, axis: int) -> ComputationNode:
        if isinstance(size, int):
            count = ctx.new_param(f"{ctx.fx_node.name}_{axis}", np.arange(size, dtype=np.int64))
        else:
            count = ctx.emit(Op.ARANGE, [], {"start": 0, "end": size, "step": 1, "dtype": "int64"})
        return ctx.emit(Op.UNSQUEEZE, [count], {"axes": (axis,)})

    same = ctx.emit(Op.EQUAL, [positions(n, 1), positions(m, 0)])
    return ctx.emit(Op.CAST, [same], {"to": dtype})
