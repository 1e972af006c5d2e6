"""ATen converters that emit the elementwise family: arithmetic, activations, float math,
comparisons, logic, ``Where`` and ``Cast``.

``add``/``sub``/``mul``/``div``/``rsub`` (``Tensor`` and ``Scalar``, with ``alpha``) ->
``Add``/``Sub``/``Mul``/``Div``; ``pow`` -> ``Pow``; ``neg``, ``relu``, ``silu``,
``sigmoid``, ``tanh``, ``gelu``; ``exp``, ``log``, ``sqrt``, ``rsqrt``, ``reciprocal``,
``cos``, ``sin``, ``abs`` (cast to the float dtype torch computes in); ``eq``/``ne``/``lt``/
``le``/``gt``/``ge`` -> ``Equal`` (``ne``: plus ``Not``), ``Less``, ``LessOrEqual``,
``Greater``, ``GreaterOrEqual``; ``logical_*``/``bitwise_*`` on bool tensors -> ``Not``/
``And``/``Or``; ``where`` and ``masked_fill`` -> ``Where``; ``triu``/``tril`` (a constant
mask, or ``Arange`` + comparison, then ``Where``); ``diff`` with a one-element ``prepend``
(transformers' packed-sequence check); ``to``/``_to_copy``/``type_as`` -> ``Cast`` (nothing
when the dtype is unchanged).

Types follow torch's promotion: operands are cast to the dtype torch computes in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import GraphError
from flora_graph.frontend.aten.registry import (
    Converter,
    as_dtype,
    axis_of,
    cast_to_out,
    compute_dtype,
    dim_of,
    operand,
    out_dtype,
    refuse,
    register,
)
from flora_graph.ir import ComputationNode, Op

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten


# --------------------------------------------------------------------------- casts
@register(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)
def _to(ctx, x, *args, **kwargs):
    """Any ``to``/``_to_copy``: a ``Cast`` to the dtype torch reports, nothing when it is unchanged."""
    return cast_to_out(ctx, x)


@register(aten.type_as.default)
def _type_as(ctx, x, other):
    return as_dtype(ctx, x, other.dtype)


# --------------------------------------------------------------------------- arithmetic
def _binary(op: Op) -> Converter:
    def conv(ctx, a, b, *, alpha=1):
        dtype = out_dtype(ctx)  # torch's type promotion: int + float -> float, int / int -> float
        a, b = operand(ctx, a, dtype), operand(ctx, b, dtype)
        if alpha != 1:
            b = ctx.emit(Op.MUL, [b, ctx.scalar(alpha, b.dtype)])
        return ctx.emit(op, [a, b])

    return conv


register(aten.add.Tensor, aten.add.Scalar)(_binary(Op.ADD))
register(aten.sub.Tensor, aten.sub.Scalar)(_binary(Op.SUB))
register(aten.mul.Tensor, aten.mul.Scalar)(_binary(Op.MUL))


@register(aten.div.Tensor, aten.div.Scalar)
def _div(ctx, a, b):
    dtype = out_dtype(ctx)
    return ctx.emit(Op.DIV, [operand(ctx, a, dtype), operand(ctx, b, dtype)])


@register(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx, a, b, alpha=1):
    return _binary(Op.SUB)(ctx, b, a, alpha=alpha)  # rsub(a, b, alpha) = b - alpha * a


@register(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow(ctx, base, exponent):
    dtype = out_dtype(ctx)
    return ctx.emit(Op.POW, [as_dtype(ctx, base, dtype), as_dtype(ctx, exponent, dtype)])


# --------------------------------------------------------------------------- activations, float math
def _unary(op: Op) -> Converter:
    return lambda ctx, x: ctx.emit(op, [x])


for _t_op, _ir_op in [
    (aten.neg.default, Op.NEG),
    (aten.relu.default, Op.RELU),
    (aten.silu.default, Op.SILU),
    (aten.sigmoid.default, Op.SIGMOID),
    (aten.tanh.default, Op.TANH),
]:
    register(_t_op)(_unary(_ir_op))


@register(aten.gelu.default)
def _gelu(ctx, x, approximate="none"):
    return ctx.emit(Op.GELU, [x], {"approximate": approximate})


def _float_unary(op: Op):
    def conv(ctx, x):
        return ctx.emit(op, [cast_to_out(ctx, x)])

    return conv


for _target, _op in [
    (aten.exp.default, Op.EXP), (aten.log.default, Op.LOG), (aten.sqrt.default, Op.SQRT), (aten.rsqrt.default, Op.RSQRT),
    (aten.reciprocal.default, Op.RECIPROCAL), (aten.cos.default, Op.COS), (aten.sin.default, Op.SIN),
    (aten.abs.default, Op.ABS), (aten.sign.default, Op.SIGN),
]:
    register(_target)(_float_unary(_op))


# --------------------------------------------------------------------------- comparisons, logic, where
def _compare(op: Op, negate: bool = False):
    def conv(ctx, a, b):
        dtype = compute_dtype(ctx, *ctx.fx_node.args[:2])
        y = ctx.emit(op, [as_dtype(ctx, a, dtype), as_dtype(ctx, b, dtype)])
        return ctx.emit(Op.NOT, [y]) if negate else y

    return conv


for _targets, _op, _neg in [
    ((aten.eq.Tensor, aten.eq.Scalar), Op.EQUAL, False),
    ((aten.ne.Tensor, aten.ne.Scalar), Op.EQUAL, True),
    ((aten.lt.Tensor, aten.lt.Scalar), Op.LESS, False),
    ((aten.le.Tensor, aten.le.Scalar), Op.LESS_OR_EQUAL, False),
    ((aten.gt.Tensor, aten.gt.Scalar), Op.GREATER, False),
    ((aten.ge.Tensor, aten.ge.Scalar), Op.GREATER_OR_EQUAL, False),
]:
    register(*_targets)(_compare(_op, _neg))


def _bool_only(ctx: CaptureContext, *xs: Any) -> list[ComputationNode]:
    for x in xs:
        if not isinstance(x, ComputationNode) or x.dtype != "bool":
            got = x.dtype if isinstance(x, ComputationNode) else type(x).__name__
            raise refuse(ctx, f"bitwise/logical op on {got} (only bool tensors are supported)")
    return list(xs)


@register(aten.logical_not.default, aten.bitwise_not.default)
def _not(ctx, x):
    return ctx.emit(Op.NOT, _bool_only(ctx, x))


@register(aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor)
def _and(ctx, a, b):
    return ctx.emit(Op.AND, _bool_only(ctx, a, b))


@register(aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor)
def _or(ctx, a, b):
    return ctx.emit(Op.OR, _bool_only(ctx, a, b))


@register(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(ctx, cond, a, b):
    dtype = out_dtype(ctx)
    return ctx.emit(Op.WHERE, [as_dtype(ctx, cond, "bool"), as_dtype(ctx, a, dtype), as_dtype(ctx, b, dtype)])


@register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, x, mask, value):
    return ctx.emit(Op.WHERE, [as_dtype(ctx, mask, "bool"), as_dtype(ctx, value, x.dtype), x])


@register(aten.triu.default, aten.tril.default)
def _triangle(ctx, x, diagonal=0):
    """Keep ``col - row >= diagonal`` (triu) or ``<= diagonal`` (tril) of the last two dims, zero elsewhere."""
    if len(x.shape) < 2:
        raise GraphError(f"{ctx.where()}: triu/tril of a tensor of rank {len(x.shape)}")
    upper = ctx.fx_node.target is aten.triu.default
    rows, cols = x.shape[-2:]
    k = int(dim_of(ctx, diagonal))
    if isinstance(rows, int) and isinstance(cols, int):
        ones = np.ones((rows, cols), dtype=bool)
        keep = ctx.new_param(f"{ctx.fx_node.name}_keep", np.triu(ones, k) if upper else np.tril(ones, k))
    else:
        r = ctx.emit(Op.UNSQUEEZE, [ctx.emit(Op.ARANGE, [], {"end": rows})], {"axes": (1,)})
        c = ctx.emit(Op.ARANGE, [], {"end": cols})
        shifted = ctx.emit(Op.ADD, [r, as_dtype(ctx, k, "int64")]) if k else r
        keep = ctx.emit(Op.GREATER_OR_EQUAL if upper else Op.LESS_OR_EQUAL, [c, shifted])
    return ctx.emit(Op.WHERE, [keep, x, as_dtype(ctx, 0, x.dtype)])


@register(aten.diff.default)
def _diff(ctx, x, n=1, dim=-1, prepend=None, append=None):
    """``x[j] - x[j - 1]`` along ``dim``; with a one-element ``prepend`` the length stays, so a dynamic dim works:
    ``x - Where(j == 0, prepend, Gather(x, j - 1))``."""
    rank = len(x.shape)
    axis = axis_of(int(dim), rank)
    size = x.shape[axis]
    if n != 1 or append is not None:
        raise refuse(ctx, "diff with n != 1 or append")
    if prepend is None:
        if not isinstance(size, int):
            raise refuse(ctx, f"diff along the dynamic dim {size!r} without prepend (its length is {size} - 1)")
        hi = ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (1,), "ends": (size,)})
        lo = ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (max(size - 1, 0),)})
        return ctx.emit(Op.SUB, [hi, lo])
    if prepend.shape[axis] != 1:
        raise refuse(ctx, "diff with a prepend longer than one element")
    prev = ctx.emit(Op.SUB, [ctx.emit(Op.ARANGE, [], {"end": size}), as_dtype(ctx, 1, "int64")])
    shifted = ctx.emit(Op.GATHER, [x, prev], {"axis": axis})  # x[j - 1]; j = 0 wraps and is replaced below
    first = ctx.emit(Op.LESS, [prev, as_dtype(ctx, 0, "int64")])
    if rank - axis > 1:
        first = ctx.emit(Op.UNSQUEEZE, [first], {"axes": tuple(range(1, rank - axis))})
    shifted = ctx.emit(Op.WHERE, [first, as_dtype(ctx, prepend, x.dtype), shifted])
    return ctx.emit(Op.SUB, [x, shifted])
