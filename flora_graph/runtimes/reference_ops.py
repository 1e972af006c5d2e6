"""numpy semantics of the transformer op family, merged into :data:`~flora_graph.runtimes.reference.NUMPY_IMPLS`.

Each function gets the input arrays and the node's attributes, with every attribute of
kind ``"dim"``/``"dims"`` already resolved to ints by
:func:`~flora_graph.runtimes.reference.eval_node`. Like the rest of the reference, the
result is cast to the node's dtype by the caller; statistics (RMSNorm, attention, means,
float sums) are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from flora_graph.ir.ops import Op
from flora_graph.ir.ops_transformer import SLICE_END

__all__ = ["TRANSFORMER_IMPLS"]


def _float64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) if x.dtype.kind in "fV" else x


def _quiet(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` without numpy's warnings: log(0) is -inf and sqrt(-1) NaN, as in torch and ONNX."""

    def impl(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fn(x)

    return impl


def _gather(data: np.ndarray, indices: np.ndarray, *, axis: int) -> np.ndarray:
    size = data.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"indices must lie in [{-size}, {size}), got {indices.min()}..{indices.max()}")
    return np.take(data, indices, axis=axis)


def _gather_elements(data: np.ndarray, indices: np.ndarray, *, axis: int) -> np.ndarray:
    size = data.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"indices must lie in [{-size}, {size}), got {indices.min()}..{indices.max()}")
    axis %= data.ndim
    if any(i > d for k, (i, d) in enumerate(zip(indices.shape, data.shape, strict=True)) if k != axis):
        raise IndexError(f"indices {indices.shape} exceed data {data.shape} off axis {axis}")
    window = data[tuple(slice(0, n) if k != axis else slice(None) for k, n in enumerate(indices.shape))]
    return np.take_along_axis(window, np.where(indices < 0, indices + size, indices), axis=axis)


def _index(x: np.ndarray, *indices: np.ndarray, axis: int) -> np.ndarray:
    for k, idx in enumerate(indices):
        size = x.shape[axis + k]
        if idx.size and (idx.min() < -size or idx.max() >= size):
            raise IndexError(f"index {k} must lie in [{-size}, {size}), got {idx.min()}..{idx.max()}")
    return x[(slice(None),) * (axis % x.ndim) + tuple(indices)]


def _slice(x: np.ndarray, *, axes: tuple[int, ...], starts: tuple[int, ...], ends: tuple[int, ...],
           steps: tuple[int, ...]) -> np.ndarray:
    where = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps or (1,) * len(axes), strict=True):
        where[a % x.ndim] = slice(s, None if e >= SLICE_END else e, st)
    return x[tuple(where)]


def _unsqueeze(x: np.ndarray, *, axes: tuple[int, ...]) -> np.ndarray:
    return np.expand_dims(x, tuple(a % (x.ndim + len(axes)) for a in axes))


def _expand(x: np.ndarray, *, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape)))


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.power(a, b)


def _reduce(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def impl(x: np.ndarray, *, axes: tuple[int, ...], keepdims: int) -> np.ndarray:
        axis = tuple(a % x.ndim for a in axes) if axes else None
        return fn(x, axis=axis, keepdims=bool(keepdims), dtype=np.float64 if x.dtype.kind in "fV" else None)

    return impl


def _mean(x: np.ndarray, *, axis, keepdims: bool, dtype) -> np.ndarray:
    return np.mean(x, axis=axis, keepdims=keepdims, dtype=dtype or np.float64)


def _cumsum(x: np.ndarray, *, axis: int) -> np.ndarray:
    return np.cumsum(x, axis=axis, dtype=np.float64 if x.dtype.kind in "fV" else None)


def _rms_norm(x: np.ndarray, scale: np.ndarray | None = None, *, axis: int, epsilon: float) -> np.ndarray:
    axes = tuple(range(axis % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.square(x64).mean(axis=axes, keepdims=True) + epsilon)
    return y if scale is None else y * scale


def _sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None, *,
          is_causal: int, scale: float) -> np.ndarray:
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * scale
    if mask is not None and mask.dtype != np.bool_:
        s = s + mask
    keep = None if mask is None or mask.dtype != np.bool_ else mask
    if is_causal:
        lq, lk = s.shape[-2:]
        keep = np.arange(lk)[None, :] <= np.arange(lq)[:, None]  # top-left aligned, as torch
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - np.where(np.isneginf(top), 0.0, top))  # a row with nothing kept is all 0
    total = e.sum(axis=-1, keepdims=True)
    p = e / np.where(total == 0, 1.0, total)
    return np.matmul(p, v.astype(np.float64))


def _arange(*, start: int, end: int, step: int, dtype: str) -> np.ndarray:
    return np.arange(start, end, step, dtype=dtype)


TRANSFORMER_IMPLS: dict[Op, Callable[..., np.ndarray]] = {
    Op.GATHER: _gather,
    Op.GATHER_ELEMENTS: _gather_elements,
    Op.INDEX: _index,
    Op.SLICE: _slice,
    Op.UNSQUEEZE: _unsqueeze,
    Op.SQUEEZE: lambda x, *, axes: np.squeeze(x, axis=tuple(a % x.ndim for a in axes)),
    Op.EXPAND: _expand,
    Op.EXP: _quiet(np.exp),
    Op.LOG: _quiet(np.log),
    Op.SQRT: _quiet(np.sqrt),
    Op.RSQRT: _quiet(lambda x: 1.0 / np.sqrt(_float64(x))),
    Op.RECIPROCAL: _quiet(lambda x: 1.0 / _float64(x)),
    Op.COS: np.cos,
    Op.SIN: np.sin,
    Op.ABS: np.abs,
    Op.POW: _pow,
    Op.EQUAL: np.equal,
    Op.LESS: np.less,
    Op.LESS_OR_EQUAL: np.less_equal,
    Op.GREATER: np.greater,
    Op.GREATER_OR_EQUAL: np.greater_equal,
    Op.NOT: np.logical_not,
    Op.AND: np.logical_and,
    Op.OR: np.logical_or,
    Op.WHERE: np.where,
    Op.CAST: lambda x, *, to: x,  # eval_node casts every result to the node's dtype, which is `to`
    Op.REDUCE_MEAN: _reduce(_mean),
    Op.REDUCE_SUM: _reduce(np.sum),
    Op.CUMSUM: _cumsum,
    Op.RMS_NORM: _rms_norm,
    Op.SDPA: _sdpa,
    Op.ARANGE: _arange,
}
