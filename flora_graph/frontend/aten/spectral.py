"""Discrete Fourier transforms as real matrix products: ``torch.fft`` (FNet's token mixing, FFT convolutions).

torch.export lowers ``torch.fft.*`` to three primitives on complex values, which capture carries as real pairs
(:mod:`~flora_graph.frontend.aten.complex`: a complex ``[..., n]`` is a real ``[..., n, 2]``):

* ``_fft_c2c(x, dim, normalization, forward)``: a complex transform over each axis of ``dim``;
* ``_fft_r2c(x, dim, normalization, onesided)``: the same of a real ``x`` (its imaginary parts zero), the last axis
  of ``dim`` cut to its ``n // 2 + 1`` non-redundant outputs where ``onesided``;
* ``_fft_c2r(x, dim, normalization, last_dim_size)``: the inverse of a one-sided spectrum, real, ``last_dim_size``
  long on the last axis of ``dim`` (the other axes of ``dim`` inverse complex transforms first).

Each axis of length ``n`` is one ``MatMul`` per part with the ``cos`` and ``sin`` of ``2 pi (j k mod n) / n``
(``mod n`` first, in integers, so the angle stays below ``2 pi`` and exact before the ``cos``): constants where
``n`` is static, built in the graph from ``Arange`` where it is a dynamic dim (the sequence), so one graph holds
for every length. ``n^2`` work per axis where an FFT does ``n log n``: the sizes models transform (hidden sizes,
sequences of hundreds) keep it a small matrix product. ``normalization`` (``0`` none, ``1`` by ``1/sqrt(n)``,
``2`` by ``1/n``, ``n`` the product of the transformed lengths) scales the result. A one-sided output of a
dynamic axis and a dynamic ``last_dim_size`` are refused by name.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.frontend.aten.complex import COMPLEX_TABLE, is_complex, pairs, parts
from flora_graph.frontend.aten.registry import SymDim, as_dtype, axis_of, refuse, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten

_PART = {torch.complex64: "float32", torch.complex128: "float64"}
"""A complex dtype -> the dtype of its real and imaginary parts."""


def _part_dtype(ctx: CaptureContext) -> str:
    val = ctx.fx_node.meta["val"]
    if val.dtype not in _PART:
        raise refuse(ctx, f"a spectrum of dtype {val.dtype}")
    return _PART[val.dtype]


def _length(ctx: CaptureContext, d: Dim, dtype: str) -> ComputationNode:
    """Length ``d`` (an int or a dynamic dim) as a rank-0 value of ``dtype``."""
    return as_dtype(ctx, d if isinstance(d, int) else SymDim(d), dtype)


def _twiddles(ctx: CaptureContext, rows: Dim, cols: Dim, period: Dim, dtype: str,
              weights: np.ndarray | None = None) -> tuple[ComputationNode, ComputationNode]:
    """``cos`` and ``sin`` of ``2 pi (j k mod period) / period`` for ``j < rows``, ``k < cols`` (``[rows, cols]``),
    each row ``j`` times ``weights[j]`` where given; constants where every size is static."""
    if all(isinstance(d, int) for d in (rows, cols, period)):
        angle = 2 * np.pi * (np.outer(np.arange(rows), np.arange(cols)) % period) / period
        w = np.ones((rows, 1)) if weights is None else weights[:, None]
        return tuple(ctx.new_param(f"{ctx.fx_node.name}_{f.__name__}", (w * f(angle)).astype(dtype))
                     for f in (np.cos, np.sin))
    if weights is not None:
        raise refuse(ctx, "an inverse real transform of a dynamic length")
    j = ctx.emit(Op.ARANGE, [], {"start": 0, "end": rows, "step": 1, "dtype": "int64"})
    k = ctx.emit(Op.ARANGE, [], {"start": 0, "end": cols, "step": 1, "dtype": "int64"})
    jk = ctx.emit(Op.MUL, [ctx.emit(Op.UNSQUEEZE, [j], {"axes": (1,)}), ctx.emit(Op.UNSQUEEZE, [k], {"axes": (0,)})])
    n = _length(ctx, period, "int64")
    step = ctx.emit(Op.DIV, [ctx.scalar(2 * math.pi, "float64"), as_dtype(ctx, n, "float64")])
    angle = ctx.emit(Op.MUL, [ctx.emit(Op.CAST, [ctx.emit(Op.FMOD, [jk, n])], {"to": "float64"}), step])
    return tuple(ctx.emit(Op.CAST, [ctx.emit(op, [angle])], {"to": dtype}) for op in (Op.COS, Op.SIN))


def _along(ctx: CaptureContext, x: ComputationNode, axis: int, m: ComputationNode) -> ComputationNode:
    """``x`` times matrix ``m`` (``[len, out]``) along ``axis``: that axis becomes ``out`` long."""
    last = len(x.shape) - 1
    if axis == last:
        return ctx.emit(Op.MATMUL, [x, m])
    perm = list(range(last + 1))
    perm[axis], perm[last] = last, axis
    moved = ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(perm)})
    return ctx.emit(Op.TRANSPOSE, [ctx.emit(Op.MATMUL, [moved, m])], {"perm": tuple(perm)})


def _dft(ctx: CaptureContext, re: ComputationNode, im: ComputationNode | None, axis: int, inverse: bool,
         cols: Dim | None = None) -> tuple[ComputationNode, ComputationNode]:
    """The complex transform of ``re + i im`` (``im`` ``None``: zeros) along ``axis``, ``cols`` outputs (default: as
    many as inputs): ``e^(-+ 2 pi i j k / n) = cos -+ i sin``, so forward ``(re C + im S, im C - re S)`` and
    inverse ``(re C - im S, im C + re S)``."""
    n = re.shape[axis]
    c, s = _twiddles(ctx, n, n if cols is None else cols, n, re.dtype)
    rc, rs = _along(ctx, re, axis, c), _along(ctx, re, axis, s)
    if im is None:
        return rc, ctx.emit(Op.NEG, [rs]) if not inverse else rs
    ic, is_ = _along(ctx, im, axis, c), _along(ctx, im, axis, s)
    if inverse:
        return ctx.emit(Op.SUB, [rc, is_]), ctx.emit(Op.ADD, [ic, rs])
    return ctx.emit(Op.ADD, [rc, is_]), ctx.emit(Op.SUB, [ic, rs])


def _scale(ctx: CaptureContext, parts: tuple[ComputationNode, ...], lengths: list[Dim],
           normalization: int) -> tuple[ComputationNode, ...]:
    """``parts`` times ``1/sqrt(n)`` (``normalization`` 1) or ``1/n`` (2), ``n`` the product of ``lengths``."""
    if normalization == 0:
        return parts
    if normalization not in (1, 2):
        raise refuse(ctx, f"an FFT normalization of {normalization}")
    dtype = parts[0].dtype
    if all(isinstance(d, int) for d in lengths):
        n = float(np.prod(lengths))
        factor = ctx.scalar(1 / math.sqrt(n) if normalization == 1 else 1 / n, dtype)
    else:
        n = None
        for d in lengths:
            v = _length(ctx, d, dtype)
            n = v if n is None else ctx.emit(Op.MUL, [n, v])
        factor = ctx.emit(Op.DIV, [ctx.scalar(1.0, dtype), ctx.emit(Op.SQRT, [n]) if normalization == 1 else n])
    return tuple(ctx.emit(Op.MUL, [p, factor]) for p in parts)


def _axes(ctx: CaptureContext, dim: Any, rank: int) -> list[int]:
    return [axis_of(int(d), rank) for d in (dim if isinstance(dim, list | tuple) else [dim])]


@register(aten._fft_c2c.default)
@register(aten._fft_c2c.default, table=COMPLEX_TABLE)
def _fft_c2c(ctx, z, dim, normalization, forward):
    re, im = parts(ctx, z)
    axes = _axes(ctx, dim, len(re.shape))
    for axis in axes:
        re, im = _dft(ctx, re, im, axis, inverse=not forward)
    return pairs(ctx, *_scale(ctx, (re, im), [z.shape[a] for a in axes], int(normalization)))


@register(aten._fft_r2c.default)
@register(aten._fft_r2c.default, table=COMPLEX_TABLE)
def _fft_r2c(ctx, x, dim, normalization, onesided):
    x = as_dtype(ctx, x, _part_dtype(ctx))
    axes = _axes(ctx, dim, len(x.shape))
    lengths = [x.shape[a] for a in axes]
    cols = None
    if onesided:
        n = x.shape[axes[-1]]
        if not isinstance(n, int):
            raise refuse(ctx, f"a one-sided real FFT over the dynamic dim {n!r}")
        cols = n // 2 + 1
    re, im = _dft(ctx, x, None, axes[-1], inverse=False, cols=cols)
    for axis in axes[:-1]:
        re, im = _dft(ctx, re, im, axis, inverse=False)
    return pairs(ctx, *_scale(ctx, (re, im), lengths, int(normalization)))


@register(aten._fft_c2r.default)
@register(aten._fft_c2r.default, table=COMPLEX_TABLE)
def _fft_c2r(ctx, z, dim, normalization, last_dim_size):
    re, im = parts(ctx, z)
    axes = _axes(ctx, dim, len(re.shape))
    for axis in axes[:-1]:
        re, im = _dft(ctx, re, im, axis, inverse=True)
    n, last = last_dim_size.dim if isinstance(last_dim_size, SymDim) else last_dim_size, axes[-1]
    m = re.shape[last]
    if not isinstance(n, int) or not isinstance(m, int):
        raise refuse(ctx, "an inverse real FFT of a dynamic length")
    # x_t = sum_k w_k (Re X_k cos(2 pi k t / n) - Im X_k sin(...)): the one-sided bins stand for their mirrors too
    # (w_k 2), but for bin 0 and, for an even n, bin n/2 (w_k 1), whose sines vanish at every t
    weights = np.array([1.0 if k == 0 or 2 * k == n else 2.0 for k in range(m)])
    c, s = _twiddles(ctx, m, n, n, re.dtype, weights)
    out = ctx.emit(Op.SUB, [_along(ctx, re, last, c), _along(ctx, im, last, s)])
    return _scale(ctx, (out,), [*(re.shape[a] for a in axes[:-1]), n], int(normalization))[0]


@register(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, table=COMPLEX_TABLE)
def _to(ctx, x, *args, **kwargs):
    """Real to complex: the values as real parts beside zeros; complex to complex: the parts cast; complex to real:
    the real parts (torch drops the imaginary ones)."""
    out = ctx.fx_node.meta["val"].dtype
    if not is_complex(ctx.fx_node.args[0]):
        x = as_dtype(ctx, x, _part_dtype(ctx))
        return pairs(ctx, x, ctx.emit(Op.MUL, [x, ctx.scalar(0.0, x.dtype)]))
    if out.is_complex:
        return as_dtype(ctx, x, _part_dtype(ctx))
    return as_dtype(ctx, parts(ctx, x)[0], str(out).removeprefix("torch."))
