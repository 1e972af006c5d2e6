"""ATen converters that emit the elementwise family: arithmetic, activations, float math,
comparisons, logic, ``Where`` and ``Cast``.

``add``/``sub``/``mul``/``div``/``rsub`` (``Tensor`` and ``Scalar``, with ``alpha``) ->
``Add``/``Sub``/``Mul``/``Div`` (a 1-D weight added to a bias-less ``Linear`` that nothing else
reads: that ``Linear`` with the weight as its bias, see :mod:`~flora_graph.frontend.aten.linear`);
``pow`` -> ``Pow``; ``neg``, ``relu``, ``silu``, ``sigmoid``, ``tanh``, ``gelu``; ``exp``, ``log``, ``sqrt``,
``rsqrt``, ``reciprocal``, ``cos``, ``sin``, ``abs``, ``sign``, ``erf``, ``expm1``, ``log1p``, ``log2``, ``log10``, ``tan``, ``acos``,
``asin``, ``atan``, ``cosh``, ``sinh``, ``acosh``, ``asinh``, ``atanh`` (cast to the float dtype torch
computes in); ``ceil``/``floor``/``round``/``trunc`` (nothing on integers); ``maximum``/``max.other``,
``minimum``/``min.other`` -> ``Max``/``Min``; ``clamp`` (``Scalar`` and ``Tensor`` bounds), ``clamp_min``,
``clamp_max`` and ``hardtanh`` -> ``Max`` then ``Min``; ``square`` -> ``Mul`` of ``x`` by itself; ``log_sigmoid`` ->
``Min(x, 0) - Log1p(Exp(-|x|))``; ``copysign`` -> ``Where`` of ``Neg(Abs(a))`` / ``Abs(a)`` by ``b``'s sign (``-0.0``
negative); ``atan2`` (and ``atan2.out``), ``fmod``, ``remainder`` (``Tensor``, ``Scalar``);
``div`` with a ``rounding_mode`` and ``floor_divide`` (``Div``, then ``Trunc``/``Floor``; integer floor division
through ``Remainder``); ``softplus`` (``beta``, ``threshold``) -> ``Where(beta x > threshold, x, Log1p(Exp(beta x)) /
beta)``; ``elu`` (``scale`` as a ``Mul``), ``leaky_relu``; ``isinf``/``isnan``; ``fill`` (``.Scalar``, ``.Tensor``)
-> ``Expand`` of the value; ``outer`` / ``ger`` -> ``Mul`` of the vectors unsqueezed; ``eq``/``ne``/``lt``/
``le``/``gt``/``ge`` -> ``Equal`` (``ne``: plus ``Not``), ``Less``, ``LessOrEqual``,
``Greater``, ``GreaterOrEqual``; ``logical_*``/``bitwise_*`` on bool tensors (and a bool scalar) ->
``Not``/``And``/``Or``/``Xor``; ``where`` and ``masked_fill`` -> ``Where``; ``triu``/``tril`` (a constant
mask, or ``Arange`` + comparison, then ``Where``); ``diff`` with a one-element ``prepend``
(transformers' packed-sequence check); ``to``/``_to_copy``/``type_as`` -> ``Cast`` (nothing
when the dtype is unchanged; to an 8-bit float, its rounding in the source's float dtype).

Types follow torch's promotion: operands are cast to the dtype torch computes in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import GraphError
from flora_graph.frontend.aten.linear import bias_into_linear
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
_FLOAT8 = {"float8_e4m3fn": (3, -6, 448.0, 448.0), "float8_e5m2": (2, -14, 57344.0, 2 * 57344.0)}
"""Each 8-bit float torch casts to: (mantissa bits, least normal exponent, largest finite value, the magnitude a
larger one is taken as). torch saturates e4m3fn, which has no infinity, at its largest value; e5m2 rounds past its
largest to infinity, as a value twice that large does."""


@register(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)
def _to(ctx, x, *args, **kwargs):
    """Any ``to``/``_to_copy``: a ``Cast`` to the dtype torch reports, nothing when it is unchanged; to an 8-bit
    float (:data:`_FLOAT8`), the value rounded to that type's grid, kept in ``x``'s float dtype (what a cast back,
    which then costs nothing, reads: the fake quantization of NVFP4 scales)."""
    target = out_dtype(ctx)
    if target in _FLOAT8:
        return _float8_rounded(ctx, x, *_FLOAT8[target])
    return cast_to_out(ctx, x)


def _float8_rounded(ctx, x, mantissa: int, least: int, largest: float, cap: float):
    """``x`` rounded to nearest-even on the grid of an 8-bit float, as torch's cast rounds it: magnitudes taken at
    most ``cap``, in steps of ``2^(e - mantissa)`` where ``e`` is the magnitude's binary exponent, at least ``least``
    (subnormals); what rounds past ``largest`` is infinite."""
    if x.dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise refuse(ctx, f"a cast of {x.dtype} to an 8-bit float")
    dt = x.dtype
    magnitude = ctx.emit(Op.MIN, [ctx.emit(Op.ABS, [x]), ctx.scalar(cap, dt)])
    two = ctx.scalar(2.0, dt)
    e = ctx.emit(Op.FLOOR, [ctx.emit(Op.LOG2, [magnitude])])
    e = ctx.emit(Op.MAX, [e, ctx.scalar(float(least), dt)])  # zero's -inf too
    # Log2 may land a power of two off by one: the step's power of two brackets the magnitude
    power = ctx.emit(Op.POW, [two, e])
    e = ctx.emit(Op.SUB, [e, ctx.emit(Op.CAST, [ctx.emit(Op.GREATER, [power, magnitude])], {"to": dt})])
    e = ctx.emit(Op.MAX, [e, ctx.scalar(float(least), dt)])
    power = ctx.emit(Op.POW, [two, e])
    up = ctx.emit(Op.LESS_OR_EQUAL, [ctx.emit(Op.MUL, [power, two]), magnitude])
    e = ctx.emit(Op.ADD, [e, ctx.emit(Op.CAST, [up], {"to": dt})])
    step = ctx.emit(Op.POW, [two, ctx.emit(Op.SUB, [e, ctx.scalar(float(mantissa), dt)])])
    rounded = ctx.emit(Op.MUL, [ctx.emit(Op.ROUND, [ctx.emit(Op.DIV, [magnitude, step])]), step])
    rounded = ctx.emit(Op.WHERE, [ctx.emit(Op.GREATER, [rounded, ctx.scalar(largest, dt)]),
                                  ctx.scalar(float("inf"), dt), rounded])
    negative = ctx.emit(Op.LESS, [x, ctx.scalar(0.0, dt)])
    return ctx.emit(Op.WHERE, [negative, ctx.emit(Op.NEG, [rounded]), rounded])


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


@register(aten.add.Tensor, aten.add.Scalar)
def _add(ctx, a, b, *, alpha=1):
    """``a + alpha * b``; a 1-D weight added to a bias-less ``Linear`` is its bias (:func:`bias_into_linear`)."""
    folded = bias_into_linear(ctx, a, b) if alpha == 1 else None
    return folded if folded is not None else _binary(Op.ADD)(ctx, a, b, alpha=alpha)


register(aten.sub.Tensor, aten.sub.Scalar)(_binary(Op.SUB))
register(aten.mul.Tensor, aten.mul.Scalar)(_binary(Op.MUL))


@register(aten.outer.default, aten.ger.default)
def _outer(ctx, a, b):
    """``a[:, None] * b[None, :]`` of two vectors (Flux's rotary frequencies, ``torch.outer(pos, omega)``)."""
    dtype = out_dtype(ctx)
    rows = ctx.emit(Op.UNSQUEEZE, [operand(ctx, a, dtype)], {"axes": (1,)})
    return ctx.emit(Op.MUL, [rows, ctx.emit(Op.UNSQUEEZE, [operand(ctx, b, dtype)], {"axes": (0,)})])


@register(aten.div.Tensor, aten.div.Scalar, aten.true_divide.Tensor)
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


@register(aten.logit.default, aten.special_logit.default)
def _logit(ctx, x, eps=None):
    """``log(x / (1 - x))``, ``x`` clamped to ``[eps, 1 - eps]`` first where ``eps`` is given (Grounding DINO's
    inverse sigmoid of its reference points)."""
    dtype = out_dtype(ctx)
    x = cast_to_out(ctx, x)
    if eps is not None:
        x = ctx.emit(Op.MIN, [ctx.emit(Op.MAX, [x, ctx.scalar(float(eps), dtype)]), ctx.scalar(1.0 - float(eps), dtype)])
    rest = ctx.emit(Op.SUB, [ctx.scalar(1.0, dtype), x])
    return ctx.emit(Op.LOG, [ctx.emit(Op.DIV, [x, rest])])


@register(aten.glu.default)
def _glu(ctx, x, dim=-1):
    """``a * sigmoid(b)`` of the two halves of ``dim`` (a static, even size; Conformer's convolution module)."""
    axis = int(dim) % len(x.shape)
    size = x.shape[axis]
    if not isinstance(size, int) or size % 2:
        raise refuse(ctx, f"glu along a dim of {size!r} (it halves a static, even size)")
    half = size // 2
    a, b = (ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (s,), "ends": (s + half,), "steps": (1,)})
            for s in (0, half))
    return ctx.emit(Op.MUL, [a, ctx.emit(Op.SIGMOID, [b])])


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


_LOGICAL = {aten.logical_not.default, aten.logical_and.default, aten.logical_or.default, aten.logical_xor.default}


def _bool_only(ctx: CaptureContext, *xs: Any) -> list[ComputationNode]:
    """The inputs of a logical or bitwise op as bool tensors: a ``logical_*`` op reads a number as ``x != 0``
    (torch's rule); a bitwise op on numbers goes to :func:`_bits` instead."""
    out = []
    for x in xs:
        if isinstance(x, ComputationNode) and x.dtype != "bool" and ctx.fx_node.target in _LOGICAL:
            x = ctx.emit(Op.NOT, [ctx.emit(Op.EQUAL, [x, as_dtype(ctx, 0, x.dtype)])])
        if not isinstance(x, ComputationNode) or x.dtype != "bool":
            got = x.dtype if isinstance(x, ComputationNode) else type(x).__name__
            raise refuse(ctx, f"bitwise op on {got} (bool and integer tensors are supported; logical_* ops take any "
                              "dtype)")
        out.append(x)
    return out


def _bits(ctx: CaptureContext, logical: Op, bitwise: Op, *xs: Any) -> ComputationNode:
    """A logical op (``logical``) of the inputs as bools (:func:`_bool_only`), or, for a bitwise op whose result is an
    integer (torch's promotion of integer tensors and Python ints), ``bitwise`` of the inputs cast to it."""
    dtype = out_dtype(ctx)
    if ctx.fx_node.target in _LOGICAL or not dtype.startswith(("int", "uint")):
        return ctx.emit(logical, _bool_only(ctx, *xs))
    return ctx.emit(bitwise, [as_dtype(ctx, x, dtype) for x in xs])


@register(aten.logical_not.default, aten.bitwise_not.default)
def _not(ctx, x):
    return _bits(ctx, Op.NOT, Op.BITWISE_NOT, x)


@register(aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor)
def _and(ctx, a, b):
    return _bits(ctx, Op.AND, Op.BITWISE_AND, a, b)


@register(aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor)
def _or(ctx, a, b):
    return _bits(ctx, Op.OR, Op.BITWISE_OR, a, b)


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


# --------------------------------------------------------------------------- rounding, float math, min/max, clamp
def _rounding(op: Op) -> Converter:
    """``ceil``/``floor``/``round``/``trunc``: nothing to do on an integer or bool tensor (torch returns it)."""

    def conv(ctx, x):
        if not x.dtype.startswith(("float", "bfloat")):
            return x
        return ctx.emit(op, [x])

    return conv


for _target, _op in [
    (aten.ceil.default, Op.CEIL), (aten.floor.default, Op.FLOOR), (aten.round.default, Op.ROUND),
    (aten.trunc.default, Op.TRUNC),
]:
    register(_target)(_rounding(_op))

for _target, _op in [
    (aten.erf.default, Op.ERF), (aten.expm1.default, Op.EXPM1), (aten.log1p.default, Op.LOG1P),
    (aten.log2.default, Op.LOG2), (aten.log10.default, Op.LOG10), (aten.tan.default, Op.TAN),
    (aten.acos.default, Op.ACOS), (aten.asin.default, Op.ASIN), (aten.atan.default, Op.ATAN),
    (aten.cosh.default, Op.COSH), (aten.sinh.default, Op.SINH), (aten.acosh.default, Op.ACOSH),
    (aten.asinh.default, Op.ASINH), (aten.atanh.default, Op.ATANH),
]:
    register(_target)(_float_unary(_op))

register(aten.maximum.default, aten.max.other)(_binary(Op.MAX))
register(aten.minimum.default, aten.min.other)(_binary(Op.MIN))
register(aten.atan2.default)(_binary(Op.ATAN2))
register(aten.fmod.Tensor, aten.fmod.Scalar)(_binary(Op.FMOD))
register(aten.remainder.Tensor, aten.remainder.Scalar)(_binary(Op.REMAINDER))


@register(aten.atan2.out)
def _atan2_out(ctx, a, b, *, out):
    """``atan2(a, b, out=...)`` (graphs that are not functionalized): its value; ``out`` only gives the dtype."""
    return _binary(Op.ATAN2)(ctx, a, b)


@register(aten.clamp.default, aten.clamp.Tensor)
def _clamp(ctx, x, min=None, max=None):
    """``Min(Max(x, min), max)``, either bound optional (as torch: ``max`` wins where ``min > max``)."""
    dtype = out_dtype(ctx)
    y = operand(ctx, x, dtype)
    if min is not None:
        y = ctx.emit(Op.MAX, [y, operand(ctx, min, dtype)])
    if max is not None:
        y = ctx.emit(Op.MIN, [y, operand(ctx, max, dtype)])
    return y


@register(aten.clamp_min.default, aten.clamp_min.Tensor)
def _clamp_min(ctx, x, min):
    return _clamp(ctx, x, min=min)


@register(aten.clamp_max.default, aten.clamp_max.Tensor)
def _clamp_max(ctx, x, max):
    return _clamp(ctx, x, max=max)


@register(aten.hardtanh.default)
def _hardtanh(ctx, x, min_val=-1.0, max_val=1.0):
    return _clamp(ctx, x, min_val, max_val)


@register(aten.square.default)
def _square(ctx, x):
    """``x * x``, as torch computes it (its ``pow(x, 2)`` multiplies)."""
    y = operand(ctx, x, out_dtype(ctx))
    return ctx.emit(Op.MUL, [y, y])


@register(aten.copysign.Tensor, aten.copysign.Scalar)
def _copysign(ctx, a, b):
    """``|a|`` with the sign of ``b``: negative where ``b < 0``, or ``b`` is ``-0.0`` (``1 / b < 0``); a ``NaN``
    ``b`` counts as positive."""
    dtype = out_dtype(ctx)
    a, b = operand(ctx, a, dtype), operand(ctx, b, dtype)
    zero = ctx.scalar(0.0, dtype)
    negative_zero = ctx.emit(Op.AND, [ctx.emit(Op.EQUAL, [b, zero]),
                                      ctx.emit(Op.LESS, [ctx.emit(Op.DIV, [ctx.scalar(1.0, dtype), b]), zero])])
    negative = ctx.emit(Op.OR, [ctx.emit(Op.LESS, [b, zero]), negative_zero])
    magnitude = ctx.emit(Op.ABS, [a])
    return ctx.emit(Op.WHERE, [negative, ctx.emit(Op.NEG, [magnitude]), magnitude])


@register(aten.log_sigmoid.default)
def _log_sigmoid(ctx, x):
    """``min(x, 0) - log1p(exp(-|x|))``: torch's stable form, finite for any ``x``."""
    zero = as_dtype(ctx, 0.0, x.dtype)
    tail = ctx.emit(Op.LOG1P, [ctx.emit(Op.EXP, [ctx.emit(Op.NEG, [ctx.emit(Op.ABS, [x])])])])
    return ctx.emit(Op.SUB, [ctx.emit(Op.MIN, [x, zero]), tail])


@register(aten.elu.default)
def _elu(ctx, x, alpha=1.0, scale=1.0, input_scale=1.0):
    """``Elu``; a ``scale`` multiplies it, an ``input_scale`` other than 1 is refused."""
    if input_scale != 1:
        raise refuse(ctx, f"elu with input_scale={input_scale}")
    y = ctx.emit(Op.ELU, [x], {"alpha": float(alpha)})
    return y if scale == 1 else ctx.emit(Op.MUL, [y, as_dtype(ctx, scale, y.dtype)])


@register(aten.leaky_relu.default)
def _leaky_relu(ctx, x, negative_slope=0.01):
    return ctx.emit(Op.LEAKY_RELU, [x], {"alpha": float(negative_slope)})


@register(aten.isinf.default, aten.isnan.default)
def _float_test(ctx, x):
    """``IsInf``/``IsNaN``; an integer or bool tensor (never inf or NaN) is tested as float32."""
    if not x.dtype.startswith(("float", "bfloat")):
        x = as_dtype(ctx, x, "float32")
    return ctx.emit(Op.IS_INF if ctx.fx_node.target is aten.isinf.default else Op.IS_NAN, [x])


@register(aten.floor_divide.default, aten.floor_divide.Scalar)
def _floor_divide(ctx, a, b):
    """``a // b``: ``div`` rounding down."""
    return _div_mode(ctx, a, b, rounding_mode="floor")


@register(aten.softplus.default)
def _softplus(ctx, x, beta=1, threshold=20):
    """``log1p(exp(beta * x)) / beta``, and ``x`` itself where ``beta * x > threshold`` (torch's form)."""
    scaled = x if beta == 1 else ctx.emit(Op.MUL, [x, as_dtype(ctx, beta, x.dtype)])
    soft = ctx.emit(Op.LOG1P, [ctx.emit(Op.EXP, [scaled])])
    if beta != 1:
        soft = ctx.emit(Op.DIV, [soft, as_dtype(ctx, beta, x.dtype)])
    above = ctx.emit(Op.GREATER, [scaled, as_dtype(ctx, threshold, x.dtype)])
    return ctx.emit(Op.WHERE, [above, x, soft])


@register(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(ctx, a, b, *, rounding_mode=None):
    """``rounding_mode`` None: ``Div``; ``"trunc"``: ``Trunc(Div)`` (an integer ``Div`` truncates already);
    ``"floor"``: ``Floor(Div)``, for integers ``Div(a - Remainder(a, b), b)`` (exact)."""
    dtype = out_dtype(ctx)
    a, b = operand(ctx, a, dtype), operand(ctx, b, dtype)
    is_float = dtype.startswith(("float", "bfloat"))
    if rounding_mode is None or (rounding_mode == "trunc" and not is_float):
        return ctx.emit(Op.DIV, [a, b])
    if rounding_mode == "trunc":
        return ctx.emit(Op.TRUNC, [ctx.emit(Op.DIV, [a, b])])
    if rounding_mode == "floor":
        if is_float:
            return ctx.emit(Op.FLOOR, [ctx.emit(Op.DIV, [a, b])])
        return ctx.emit(Op.DIV, [ctx.emit(Op.SUB, [a, ctx.emit(Op.REMAINDER, [a, b])]), b])
    raise refuse(ctx, f"div with rounding_mode={rounding_mode!r}")


@register(aten.fill.Scalar, aten.fill.Tensor)
def _fill(ctx, x, value):
    """``value`` (a number, or a 0-d tensor: ``x[:, 0] = start_id`` writes one) in ``x``'s dtype, expanded to ``x``'s
    shape."""
    return ctx.emit(Op.EXPAND, [as_dtype(ctx, value, x.dtype)], {"shape": tuple(x.shape)})


# --------------------------------------------------------------------------- xor, bitwise ops with a bool scalar
@register(aten.logical_xor.default, aten.bitwise_xor.Tensor, aten.__xor__.Tensor)
def _xor(ctx, a, b):
    return _bits(ctx, Op.XOR, Op.BITWISE_XOR, a, b)


_SCALAR_OPS = {
    aten.bitwise_and.Scalar: (Op.AND, Op.BITWISE_AND), aten.__and__.Scalar: (Op.AND, Op.BITWISE_AND),
    aten.bitwise_or.Scalar: (Op.OR, Op.BITWISE_OR), aten.__or__.Scalar: (Op.OR, Op.BITWISE_OR),
    aten.bitwise_xor.Scalar: (Op.XOR, Op.BITWISE_XOR), aten.__xor__.Scalar: (Op.XOR, Op.BITWISE_XOR),
}


@register(*_SCALAR_OPS)
def _bitwise_scalar(ctx, x, other):
    """A bool tensor with a Python bool (``And``/``Or``/``Xor`` with a bool constant), or an integer tensor with a
    Python int (``BitwiseAnd``/``Or``/``Xor``)."""
    logical, bitwise = _SCALAR_OPS[ctx.fx_node.target]
    if isinstance(other, bool) and x.dtype == "bool":
        return ctx.emit(logical, [*_bool_only(ctx, x), as_dtype(ctx, other, "bool")])
    if not isinstance(other, int) or not out_dtype(ctx).startswith(("int", "uint")):
        raise refuse(ctx, f"bitwise op with the scalar {other!r} (bool tensors with bools and integer tensors with "
                          "ints are supported)")
    return _bits(ctx, logical, bitwise, x, other)
