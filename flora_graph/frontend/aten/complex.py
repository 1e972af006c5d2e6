"""Complex values as pairs of reals: the rotary of DeepSeek-V2 and Llama 4 (``torch.polar``, complex products).

The IR has no complex dtype. A complex tensor of shape ``[..., n]`` is carried as a real tensor of
shape ``[..., n, 2]`` (real and imaginary parts last), which is exactly what ``view_as_real``
returns, so ``view_as_complex`` and ``view_as_real`` emit nothing. ``polar(r, theta)`` ->
``r * cos(theta)`` and ``r * sin(theta)`` stacked on a last axis. An op that reads or returns a
complex value converts through :data:`COMPLEX_TABLE` instead of :data:`~.registry.ATEN_TABLE`
(:func:`complex_converter`; capture dispatches there): ``mul`` (complex x complex as
``(a c - b d, a d + b c)``, complex x real scales both parts), and ``unsqueeze`` / ``slice`` /
aliases, whose axes count the complex tensor's own dims (a negative axis skips the pair axis), ``abs``
(the magnitudes, real) and the conjugates. :mod:`~flora_graph.frontend.aten.spectral` adds the FFTs and the casts to and from
complex. Any other op on complex values is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend.aten import movement
from flora_graph.frontend.aten.registry import Converter, aten_name, operand, register
from flora_graph.ir import ComputationNode, Op

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__ = ["COMPLEX_ONLY", "COMPLEX_TABLE", "complex_converter", "is_complex", "pairs", "parts", "touches_complex"]

aten = torch.ops.aten

COMPLEX_TABLE: dict[Any, Converter] = {}
"""ATen overload -> its converter where it reads or returns a complex value (carried as real pairs)."""

COMPLEX_ONLY = frozenset({aten.polar.default, aten.view_as_complex.default, aten.view_as_real.default,
                          aten._fft_c2c.default, aten._fft_r2c.default, aten._fft_c2r.default})
"""The ops whose values are complex by definition: in :data:`~.registry.ATEN_TABLE` and :data:`COMPLEX_TABLE` alike."""


def is_complex(v: Any) -> bool:
    """Whether fx value ``v`` (a node, or anything else) is a complex tensor."""
    val = v.meta.get("val") if isinstance(v, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_complex


def touches_complex(n: torch.fx.Node) -> bool:
    """Whether fx call ``n`` reads or returns a complex tensor."""
    return is_complex(n) or any(is_complex(a) for a in n.all_input_nodes)


def complex_converter(ctx: CaptureContext, n: torch.fx.Node) -> Converter | None:
    """The converter of fx call ``n`` where it reads or returns a complex value; ``None`` where it does not.
    Raises :class:`UnsupportedOpError` naming an op on complex values that has none."""
    if n.target in COMPLEX_ONLY or not touches_complex(n):
        return None  # an op of complex values alone converts through ATEN_TABLE, as any op
    conv = COMPLEX_TABLE.get(n.target)
    if conv is None:
        what = f"{aten_name(n.target)} on complex values"
        raise UnsupportedOpError(f"{ctx.where()}: {what} cannot be captured", {what: [ctx.where()]})
    return conv


def _complex(*targets: Any) -> Callable[[Converter], Converter]:
    return register(*targets, table=COMPLEX_TABLE)


def _rank(ctx: CaptureContext, i: int) -> int:
    """The complex rank of the current fx node's ``i``-th argument (its real pairs have one more axis)."""
    return ctx.fx_node.args[i].meta["val"].dim()


def _arg_is_complex(ctx: CaptureContext, i: int) -> bool:
    return i < len(ctx.fx_node.args) and is_complex(ctx.fx_node.args[i])


def _last(ctx: CaptureContext, x: ComputationNode) -> ComputationNode:
    return ctx.emit(Op.UNSQUEEZE, [x], {"axes": (len(x.shape),)})


def pairs(ctx: CaptureContext, re: ComputationNode, im: ComputationNode) -> ComputationNode:
    """Real parts ``re`` and imaginary parts ``im`` (``[..., n]`` each) as one complex value, ``[..., n, 2]``."""
    return ctx.emit(Op.CONCAT, [_last(ctx, re), _last(ctx, im)], {"axis": len(re.shape)})


def parts(ctx: CaptureContext, z: ComputationNode) -> tuple[ComputationNode, ComputationNode]:
    """The real and imaginary parts of complex value ``z`` (``[..., n, 2]`` -> two ``[..., n]``)."""
    last = len(z.shape) - 1
    return tuple(ctx.emit(Op.GATHER, [z, ctx.new_param(f"{ctx.fx_node.name}_part", np.asarray(k, np.int64))],
                          {"axis": last}) for k in (0, 1))


@register(aten.polar.default)
@_complex(aten.polar.default)
def _polar(ctx, r, theta):
    """``r * (cos(theta), sin(theta))`` as the last axis of pairs."""
    return pairs(ctx, *(ctx.emit(Op.MUL, [r, ctx.emit(op, [theta])]) for op in (Op.COS, Op.SIN)))


@register(aten.view_as_complex.default, aten.view_as_real.default)
@_complex(aten.view_as_complex.default, aten.view_as_real.default, aten.clone.default, aten.alias.default,
          aten.contiguous.default, aten.detach.default)
def _same(ctx, x, *_, **__):
    """``view_as_complex`` of ``[..., n, 2]`` reals is those pairs, ``view_as_real`` of pairs the reals: nothing."""
    return x


@_complex(aten.mul.Tensor)
def _mul(ctx, a, b):
    """complex x complex: ``(a c - b d, a d + b c)``; complex x real (a tensor or a number): both parts scaled."""
    ca, cb = _arg_is_complex(ctx, 0), _arg_is_complex(ctx, 1)
    if ca and cb:
        ra, ia, rb, ib = (ctx.emit(Op.SPLIT, [z], {"axis": len(z.shape) - 1, "sizes": (1, 1), "index": k})
                          for z in (a, b) for k in (0, 1))
        re = ctx.emit(Op.SUB, [ctx.emit(Op.MUL, [ra, rb]), ctx.emit(Op.MUL, [ia, ib])])
        im = ctx.emit(Op.ADD, [ctx.emit(Op.MUL, [ra, ib]), ctx.emit(Op.MUL, [ia, rb])])
        return ctx.emit(Op.CONCAT, [re, im], {"axis": len(re.shape) - 1})
    z, s = (a, b) if ca else (b, a)
    if isinstance(s, ComputationNode):  # a real tensor: the same factor for both parts
        s = _last(ctx, s)
    return ctx.emit(Op.MUL, [z, operand(ctx, s, z.dtype)])


@_complex(aten.abs.default)
def _abs(ctx, z):
    """``|z|``: ``sqrt(re^2 + im^2)`` over the pairs (a spectrum's magnitudes), real."""
    squares = ctx.emit(Op.MUL, [z, z])
    return ctx.emit(Op.SQRT, [ctx.emit(Op.REDUCE_SUM, [squares], {"axes": (len(z.shape) - 1,), "keepdims": 0})])


@_complex(aten._conj.default, aten.conj_physical.default, aten.conj.default)
def _conj(ctx, z):
    """The conjugate: the imaginary parts negated."""
    return ctx.emit(Op.MUL, [z, ctx.new_param(f"{ctx.fx_node.name}_signs", np.array([1.0, -1.0], z.dtype))])


@_complex(aten.unsqueeze.default)
def _unsqueeze(ctx, x, dim):
    return movement._unsqueeze(ctx, x, int(dim) % (_rank(ctx, 0) + 1))


@_complex(aten.slice.Tensor)
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    return movement._slice(ctx, x, int(dim) % _rank(ctx, 0), start, end, step)
