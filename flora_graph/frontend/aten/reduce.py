"""ATen converters that emit the reduce family (``ReduceMean``, ``ReduceSum``, ``ReduceProd``,
``ReduceMax``, ``ReduceMin``, ``ReduceVar``, ``ArgMax``, ``ArgMin``, ``CumSum``, ``ArgTopK``).

``mean.dim``/``sum.dim_IntList``/``prod.dim_int`` (axes, ``keepdim``) and
``mean.default``/``sum.default``/``prod.default`` (every axis) -> ``ReduceMean``/``ReduceSum``/
``ReduceProd``; ``cumsum`` -> ``CumSum``; ``logsumexp`` -> ``Log(ReduceSum(Exp(x - m))) + m``, ``m`` the
``ReduceMax`` (``0`` where infinite); ``cummax`` / ``cummin`` -> a doubling scan of ``Max`` / ``Min`` over
shifts gathered along the axis (and ``Where`` for the indices). The input is cast to the dtype torch reduces in first
(``sum``/``prod`` of ints -> int64, ``dtype=``); a scalar input is only cast.

``amax``/``amin`` (``dim=[]``: every axis), ``max.default``/``min.default`` -> ``ReduceMax``/
``ReduceMin``; ``max.dim``/``min.dim`` -> the pair (``ReduceMax``/``ReduceMin``, ``ArgMax``/
``ArgMin``); ``argmax``/``argmin`` (``dim=None``: over the flattened input) -> ``ArgMax``/
``ArgMin``. ``any``/``all`` (``.default``, ``.dim``, ``.dims``) -> ``ReduceSum``/``ReduceProd``
of the input as 0/1 int64, cast to bool (exact, empty reductions included).
``var``/``std`` (``.dim``, ``.correction``) -> ``ReduceVar`` (then ``Sqrt``).
``topk`` (a static ``k``, or the axis's dim: every value in order) and ``sort`` (``.default``, ``.stable``;
``k`` the axis's dim) -> the pair (``GatherElements`` of the indices, ``ArgTopK``): always sorted
(``sorted=False`` allows any order) and stable, which ``topk`` and an unstable ``sort`` allow too (their order of ties is unspecified).

``cdist`` / ``_cdist_forward`` -> the p-norm over the last axis of ``x1[..., :, None, :] -
x2[..., None, :, :]`` (``Abs`` then ``ReduceSum`` for p = 1, ``ReduceMax`` for p = inf, ``Pow``
otherwise; the squares' sum then ``Sqrt`` for p = 2; a count of non-zeros for p = 0): the direct
formula torch uses for small inputs
(for p = 2 beyond 25 rows torch switches to a matrix-product form, equal up to its rounding);
``pdist`` / ``_pdist_forward`` -> the same over the row pairs ``i < j`` of a static number of rows
(``Gather`` of each side).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch

from flora_graph.frontend.aten.registry import (
    SymDim,
    as_dtype,
    axis_of,
    cast_to_out,
    dim_of,
    out_dtype,
    refuse,
    register,
)
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import dims_equal

__all__: list[str] = []

aten = torch.ops.aten


def _reduce_axes(x: ComputationNode, dim: Any) -> tuple[int, ...]:
    """The axes ``dim`` names, sorted (``None``, ``[]`` or a scalar input: ``()``, every axis)."""
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


EXACT_LOGCUMSUMEXP = 1024
"""The longest static axis whose ``logcumsumexp`` is one log-sum-exp per prefix (``L x L`` values a row)."""


@register(aten.logcumsumexp.default)
def _logcumsumexp(ctx, x, dim):
    """Each prefix's log-sum-exp, shifted by its own maximum, on a static axis of at most
    :data:`EXACT_LOGCUMSUMEXP`: the axis broadcast against itself (``[..., i, j, ...]``, ``-inf`` where ``j > i``),
    so a prefix far below the axis' maximum keeps its value. A longer or dynamic axis: ``log(cumsum(exp(x - m))) +
    m`` with ``m`` the axis' maximum (as torch.onnx exports it), where a prefix more than ~87 below ``m`` (float32's
    ``exp`` range) underflows to ``-inf``."""
    x = cast_to_out(ctx, x)
    if not x.shape:
        return x
    axis = int(dim) % len(x.shape)
    length = x.shape[axis]
    lowest = as_dtype(ctx, float(np.finfo(x.dtype).min), x.dtype)  # a max kept finite: a row of -inf gives -inf
    if isinstance(length, int) and length <= EXACT_LOGCUMSUMEXP:
        later = np.triu(np.full((length, length), -np.inf, x.dtype), 1)  # [i, j]: -inf where j > i
        later = later.reshape(later.shape + (1,) * (len(x.shape) - axis - 1))
        mask = ctx.new_param(f"{ctx.fx_node.name}_prefixes", later)
        z = ctx.emit(Op.ADD, [ctx.emit(Op.UNSQUEEZE, [x], {"axes": (axis,)}), mask])  # [..., i, j, ...]
        m = ctx.emit(Op.MAX, [ctx.emit(Op.REDUCE_MAX, [z], {"axes": (axis + 1,), "keepdims": 1}), lowest])
        total = ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.EXP, [ctx.emit(Op.SUB, [z, m])])],
                         {"axes": (axis + 1,), "keepdims": 1})
        y = ctx.emit(Op.ADD, [ctx.emit(Op.LOG, [total]), m])
        return ctx.emit(Op.SQUEEZE, [y], {"axes": (axis + 1,)})
    m = ctx.emit(Op.MAX, [ctx.emit(Op.REDUCE_MAX, [x], {"axes": (axis,), "keepdims": 1}), lowest])
    shifted = ctx.emit(Op.EXP, [ctx.emit(Op.SUB, [x, m])])
    return ctx.emit(Op.ADD, [ctx.emit(Op.LOG, [ctx.emit(Op.CUMSUM, [shifted], {"axis": axis})]), m])


SCAN_STEPS = 31
"""Doubling steps of :func:`_cummax` on a dynamic axis: prefixes of up to ``2**31`` positions."""


@register(aten.cummax.default, aten.cummin.default)
def _cummax(ctx, x, dim):
    """Each prefix's maximum (minimum) and the index of its last occurrence, as torch's loop keeps them: a doubling
    scan, step ``s`` taking the better of each position and the one ``2**s`` before it (the later on a tie; the first
    position where there is none, whose value every prefix holds), read by a ``Gather`` along the axis.
    ``ceil(log2(n))`` steps on a static axis of ``n``, :data:`SCAN_STEPS` on a dynamic one. The indices are computed
    where something reads them. NaN is compared as ``Max`` / ``Min`` compare it."""
    is_max = ctx.fx_node.target is aten.cummax.default
    if not x.shape:
        return x, as_dtype(ctx, 0, "int64")
    axis = axis_of(int(dim), len(x.shape))
    length = x.shape[axis]
    if length == 0:
        return x, ctx.emit(Op.CAST, [x], {"to": "int64"})
    steps = math.ceil(math.log2(length)) if isinstance(length, int) else SCAN_STEPS
    at = ctx.emit(Op.ARANGE, [], {"start": 0, "end": length, "step": 1, "dtype": "int64"})  # positions on the axis
    used = {int(u.args[1]) for u in ctx.fx_node.users if u.target is operator.getitem and u.users}
    index = None
    if 1 in used:  # the positions along the axis, as int64 of x's shape
        along = ctx.emit(Op.RESHAPE, [at], {"shape": (-1,) + (1,) * (len(x.shape) - axis - 1)})
        index = ctx.emit(Op.EXPAND, [along], {"shape": tuple(x.shape)})

    def before(v: ComputationNode, shift: int) -> ComputationNode:  # v[i - shift], v[0] where i < shift
        back = ctx.emit(Op.MAX, [ctx.emit(Op.SUB, [at, as_dtype(ctx, shift, "int64")]), as_dtype(ctx, 0, "int64")])
        return ctx.emit(Op.GATHER, [v, back], {"axis": axis})

    for s in range(steps):
        earlier = before(x, 2**s)
        if index is not None:  # the later position wins a tie: the earlier one only where strictly better
            better = ctx.emit(Op.GREATER if is_max else Op.LESS, [earlier, x])
            index = ctx.emit(Op.WHERE, [better, before(index, 2**s), index])
        x = ctx.emit(Op.MAX if is_max else Op.MIN, [earlier, x])
    return x, index


@register(aten.logsumexp.default)
def _logsumexp(ctx, x, dim, keepdim=False):
    """``log(sum(exp(x - m))) + m`` with ``m`` the maximum over ``dim`` (``0`` where it is infinite), as torch
    computes it."""
    x = cast_to_out(ctx, x)
    if not x.shape:
        return x
    axes = _reduce_axes(x, dim)
    m = ctx.emit(Op.REDUCE_MAX, [x], {"axes": axes, "keepdims": 1})
    total = ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.EXP, [ctx.emit(Op.SUB, [x, m])])], {"axes": axes, "keepdims": 1})
    finite = ctx.emit(Op.WHERE, [ctx.emit(Op.IS_INF, [m]), as_dtype(ctx, 0.0, x.dtype), m])
    y = ctx.emit(Op.ADD, [ctx.emit(Op.LOG, [total]), finite])
    return y if keepdim else ctx.emit(Op.SQUEEZE, [y], {"axes": axes or tuple(range(len(x.shape)))})


@register(aten.prod.dim_int)
def _prod_dim(ctx, x, dim, keepdim=False, *, dtype=None):
    x = cast_to_out(ctx, x)
    if not x.shape:
        return x
    return ctx.emit(Op.REDUCE_PROD, [x], {"axes": _reduce_axes(x, dim), "keepdims": int(bool(keepdim))})


@register(aten.prod.default)
def _prod_all(ctx, x, *, dtype=None):
    x = cast_to_out(ctx, x)
    return ctx.emit(Op.REDUCE_PROD, [x], {"axes": (), "keepdims": 0}) if x.shape else x


# --------------------------------------------------------------------------- max, min, argmax, argmin
def _extreme(ctx, op: Op, x: ComputationNode, axes: tuple[int, ...], keepdim: bool) -> ComputationNode:
    if not x.shape:
        return x
    if x.dtype == "bool":  # reduce 0/1 as int64
        wide = ctx.emit(op, [ctx.emit(Op.CAST, [x], {"to": "int64"})], {"axes": axes, "keepdims": int(keepdim)})
        return ctx.emit(Op.CAST, [wide], {"to": "bool"})
    return ctx.emit(op, [x], {"axes": axes, "keepdims": int(keepdim)})


@register(aten.amax.default, aten.amin.default)
def _amax(ctx, x, dim=(), keepdim=False):
    op = Op.REDUCE_MAX if ctx.fx_node.target is aten.amax.default else Op.REDUCE_MIN
    return _extreme(ctx, op, x, _reduce_axes(x, dim), bool(keepdim))


@register(aten.max.default, aten.min.default)
def _max_all(ctx, x):
    op = Op.REDUCE_MAX if ctx.fx_node.target is aten.max.default else Op.REDUCE_MIN
    return _extreme(ctx, op, x, (), False)


@register(aten.max.dim, aten.min.dim)
def _max_dim(ctx, x, dim, keepdim=False):
    is_max = ctx.fx_node.target is aten.max.dim
    if not x.shape:
        return x, as_dtype(ctx, 0, "int64")
    axis = axis_of(int(dim), len(x.shape))
    values = _extreme(ctx, Op.REDUCE_MAX if is_max else Op.REDUCE_MIN, x, (axis,), bool(keepdim))
    indices = _arg(ctx, Op.ARG_MAX if is_max else Op.ARG_MIN, x, axis, bool(keepdim))
    return values, indices


def _arg(ctx, op: Op, x: ComputationNode, axis: int, keepdim: bool) -> ComputationNode:
    if x.dtype == "bool":
        x = ctx.emit(Op.CAST, [x], {"to": "int64"})
    return ctx.emit(op, [x], {"axis": axis, "keepdims": int(keepdim)})


@register(aten.argmax.default, aten.argmin.default)
def _argmax(ctx, x, dim=None, keepdim=False):
    op = Op.ARG_MAX if ctx.fx_node.target is aten.argmax.default else Op.ARG_MIN
    if dim is not None and x.shape:
        return _arg(ctx, op, x, axis_of(int(dim), len(x.shape)), bool(keepdim))
    flat = ctx.emit(Op.RESHAPE, [x], {"shape": (-1,)})  # dim=None (or a scalar): over the flattened input
    index = _arg(ctx, op, flat, 0, False)
    if keepdim and len(x.shape) > 0:
        return ctx.emit(Op.RESHAPE, [index], {"shape": (1,) * len(x.shape)})
    return index


# --------------------------------------------------------------------------- any, all
@register(aten.any.default, aten.any.dim, aten.any.dims, aten.all.default, aten.all.dim, aten.all.dims)
def _any(ctx, x, dim=None, keepdim=False):
    is_any = ctx.fx_node.target in (aten.any.default, aten.any.dim, aten.any.dims)
    if x.dtype != "bool":
        x = ctx.emit(Op.CAST, [x], {"to": "bool"})
    if not x.shape:
        return x
    ones = ctx.emit(Op.CAST, [x], {"to": "int64"})
    axes = _reduce_axes(x, dim)
    count = ctx.emit(Op.REDUCE_SUM if is_any else Op.REDUCE_PROD, [ones], {"axes": axes, "keepdims": int(bool(keepdim))})
    return ctx.emit(Op.CAST, [count], {"to": "bool"})


# --------------------------------------------------------------------------- var, std
def _var(ctx, x, dim, correction, keepdim) -> ComputationNode:
    x = as_dtype(ctx, x, out_dtype(ctx))
    if not x.shape:
        raise refuse(ctx, "the variance of a scalar")
    attrs = {"axes": _reduce_axes(x, dim), "keepdims": int(bool(keepdim)), "correction": float(correction)}
    var = ctx.emit(Op.REDUCE_VAR, [x], attrs)
    is_std = ctx.fx_node.target in (aten.std.dim, aten.std.correction, aten.std_mean.correction)
    return ctx.emit(Op.SQRT, [var]) if is_std else var


@register(aten.var.dim, aten.std.dim)
def _var_dim(ctx, x, dim=None, unbiased=True, keepdim=False):
    return _var(ctx, x, dim, 1.0 if unbiased else 0.0, keepdim)


@register(aten.var.correction, aten.std.correction)
def _var_correction(ctx, x, dim=None, *, correction=None, keepdim=False):
    return _var(ctx, x, dim, 1.0 if correction is None else correction, keepdim)


@register(aten.var_mean.correction, aten.std_mean.correction)
def _var_mean(ctx, x, dim=None, *, correction=None, keepdim=False):
    """``(var or std, mean)`` over the same axes, of one cast of ``x``."""
    x = as_dtype(ctx, x, out_dtype(ctx))
    spread = _var(ctx, x, dim, 1.0 if correction is None else correction, keepdim)
    return spread, ctx.emit(Op.REDUCE_MEAN, [x], {"axes": _reduce_axes(x, dim), "keepdims": int(bool(keepdim))})



# --------------------------------------------------------------------------- topk, sort
def _top_k(ctx, x: ComputationNode, k: Any, dim: int, largest: bool) -> tuple[ComputationNode, ComputationNode]:
    if x.dtype == "bool":
        raise refuse(ctx, "topk/sort of a bool tensor")
    if not x.shape:  # torch: k is 0 or 1 (sort: 1); the value and index 0
        if k != 1:
            raise refuse(ctx, f"topk of a scalar with k = {k!r}")
        return x, as_dtype(ctx, 0, "int64")
    axis = axis_of(int(dim), len(x.shape))
    indices = ctx.emit(Op.ARG_TOP_K, [x], {"k": k, "axis": axis, "largest": int(bool(largest))})
    return ctx.emit(Op.GATHER_ELEMENTS, [x, indices], {"axis": axis}), indices


@register(aten.topk.default)
def _topk(ctx, x, k, dim=-1, largest=True, sorted=True):
    if isinstance(k, SymDim) and x.shape:  # a dynamic k: the axis's own dim is a full sort
        k = dim_of(ctx, k)
        if isinstance(k, str) and not dims_equal(k, x.shape[axis_of(int(dim), len(x.shape))]):
            raise refuse(ctx, f"topk with a dynamic k ({k!r}) other than the axis's dim")
    if isinstance(k, bool) or not isinstance(k, int | str):
        raise refuse(ctx, f"topk with a dynamic k ({k!r})")
    return _top_k(ctx, x, k, dim, largest)


@register(aten.sort.default)
def _sort(ctx, x, dim=-1, descending=False):
    return _top_k(ctx, x, dim_of(ctx, x.shape[axis_of(int(dim), len(x.shape))]) if x.shape else 1, dim, descending)


@register(aten.sort.stable)
def _sort_stable(ctx, x, *, stable=None, dim=-1, descending=False):
    return _sort(ctx, x, dim, descending)


# --------------------------------------------------------------------------- cdist, pdist
def _p_norm_last(ctx, diff: ComputationNode, p: float) -> ComputationNode:
    """The ``p``-norm of ``diff`` over its last axis (torch's ``cdist`` conventions for p = 0 and inf)."""
    return _p_norm(ctx, diff, p, (len(diff.shape) - 1,), False)


def _p_norm(ctx, diff: ComputationNode, p: float, axes_: tuple[int, ...], keepdim: bool) -> ComputationNode:
    """The vector ``p``-norm of ``diff`` over ``axes_`` (p = 0: the count of nonzeros; +-inf: the largest
    / smallest magnitude), as ``torch.linalg.vector_norm``."""
    axes = {"axes": axes_, "keepdims": int(bool(keepdim))}
    if p == 0:
        nonzero = ctx.emit(Op.NOT, [ctx.emit(Op.EQUAL, [diff, ctx.scalar(0.0, diff.dtype)])])
        return ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.CAST, [nonzero], {"to": diff.dtype})], axes)
    if p == 2:
        return ctx.emit(Op.SQRT, [ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.MUL, [diff, diff])], axes)])
    size = ctx.emit(Op.ABS, [diff])
    if math.isinf(p):
        return ctx.emit(Op.REDUCE_MAX if p > 0 else Op.REDUCE_MIN, [size], axes)
    if p == 1:
        return ctx.emit(Op.REDUCE_SUM, [size], axes)
    total = ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.POW, [size, ctx.scalar(p, diff.dtype)])], axes)
    return ctx.emit(Op.POW, [total, ctx.scalar(1.0 / p, diff.dtype)])


def _norm_axes(ctx, x: ComputationNode, dim: Any) -> tuple[int, ...]:
    if dim is None or (isinstance(dim, list | tuple) and not dim):
        return tuple(range(len(x.shape)))
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return tuple(sorted(axis_of(int(d), len(x.shape)) for d in dims))


def _norm_input(ctx, x: ComputationNode, dtype: Any) -> ComputationNode:
    return as_dtype(ctx, x, out_dtype(ctx)) if dtype is not None or x.dtype != out_dtype(ctx) else x


@register(aten.linalg_vector_norm.default)
def _linalg_vector_norm(ctx, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """``torch.linalg.vector_norm``: the ``ord``-norm over ``dim`` (every axis when ``None``)."""
    return _p_norm(ctx, _norm_input(ctx, x, dtype), float(ord), _norm_axes(ctx, x, dim), keepdim)


@register(aten.linalg_norm.default)
def _linalg_norm(ctx, x, ord=None, dim=None, keepdim=False, *, dtype=None):
    """``torch.linalg.norm``: a vector norm (``ord`` None or a number over one axis, or ``None`` over all),
    or the Frobenius norm over two axes (``ord`` None); other matrix norms are refused by name."""
    axes = _norm_axes(ctx, x, dim)
    two = (dim is None and len(x.shape) == 2) or len(axes) == 2
    if ord is not None and two:
        raise refuse(ctx, f"the matrix norm ord={ord!r} (only the Frobenius norm, ord=None)")
    return _p_norm(ctx, _norm_input(ctx, x, dtype), 2.0 if ord is None else float(ord), axes, keepdim)


@register(aten.norm.ScalarOpt_dim, aten.norm.Scalar)
def _norm(ctx, x, p=2, dim=None, keepdim=False):
    """``torch.norm`` with a numeric ``p``: the vector ``p``-norm over ``dim`` (every axis by default)."""
    return _p_norm(ctx, x, 2.0 if p is None else float(p), _norm_axes(ctx, x, dim), keepdim)


@register(aten.cdist.default, aten._cdist_forward.default)
def _cdist(ctx, x1, x2, p=2.0, compute_mode=None):
    """Distances ``[..., P, R]`` between the rows of ``x1 [..., P, M]`` and ``x2 [..., R, M]`` (batch dims broadcast)."""
    if float(p) < 0:
        raise refuse(ctx, f"cdist with p = {p}")
    rows = ctx.emit(Op.UNSQUEEZE, [x1], {"axes": (len(x1.shape) - 1,)})
    cols = ctx.emit(Op.UNSQUEEZE, [x2], {"axes": (len(x2.shape) - 2,)})
    return _p_norm_last(ctx, ctx.emit(Op.SUB, [rows, cols]), float(p))


@register(aten.pdist.default, aten._pdist_forward.default)
def _pdist(ctx, x, p=2.0):
    """Distances between the rows ``i < j`` of ``x [N, M]``, in row-major order of the pairs."""
    if len(x.shape) != 2 or not isinstance(x.shape[0], int):
        raise refuse(ctx, "pdist needs x [N, M] with a static N")
    if float(p) < 0:
        raise refuse(ctx, f"pdist with p = {p}")
    first, second = np.triu_indices(x.shape[0], 1)
    pick = [ctx.emit(Op.GATHER, [x, ctx.new_param(f"{ctx.fx_node.name}_{side}", i.astype(np.int64))], {"axis": 0})
            for side, i in (("i", first), ("j", second))]
    return _p_norm_last(ctx, ctx.emit(Op.SUB, pick), float(p))
