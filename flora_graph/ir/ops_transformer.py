"""Shape and dtype rules of the transformer op family (registered in :data:`flora_graph.ir.ops.SCHEMAS`).

Attention, RMSNorm, comparisons and boolean logic, ``Where``, ``Cast``, reductions,
``CumSum``, ``Gather``, ``Slice``, ``Unsqueeze``/``Squeeze``, ``Expand`` and ``Arange``.
Sizes that depend on a dynamic dim are attributes of kind ``"dims"`` (or ``"dim"``): an int
or a dim name such as ``"seq"`` that resolves, at run time, from the sizes of the graph
inputs (see :mod:`flora_graph.runtimes.reference`).

Every function has the signature of :data:`flora_graph.ir.ops.InferFn`; this module
imports nothing from ``ops`` so that ``ops`` can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flora_graph.errors import ShapeError
from flora_graph.ir.shapes import Dim, Shape, broadcast_shapes, canonical_dim, format_shape, normalize_axis

__all__ = [
    "SLICE_END",
    "infer_arange",
    "infer_cast",
    "infer_compare",
    "infer_cumsum",
    "infer_expand",
    "infer_gather",
    "infer_gather_elements",
    "infer_index",
    "infer_logical",
    "infer_logical_not",
    "infer_reduce",
    "infer_rms_norm",
    "infer_sdpa",
    "infer_slice",
    "infer_squeeze",
    "infer_unsqueeze",
    "infer_where",
    "slice_size",
]

SLICE_END = 2**62
"""A ``Slice`` end at or past this value means "to the end" (torch writes ``2**63 - 1``)."""

INDEX_DTYPES = frozenset({"int32", "int64"})


def _same_dtype(dtypes: Sequence[str], what: str) -> str:
    if any(d != dtypes[0] for d in dtypes[1:]):
        raise ShapeError(f"{what}: dtypes {list(dtypes)} differ")
    return dtypes[0]


def _eq(a: Dim, b: Dim) -> bool:
    return canonical_dim(a) == canonical_dim(b)


# --------------------------------------------------------------------------- elementwise
def infer_compare(shapes, dtypes, attrs):
    """Broadcasting comparison of two values of one dtype; the result is bool."""
    _same_dtype(dtypes, "comparison")
    return broadcast_shapes(shapes[0], shapes[1]), "bool"


def infer_logical(shapes, dtypes, attrs):
    """Broadcasting ``And``/``Or`` of bool values."""
    if any(d != "bool" for d in dtypes):
        raise ShapeError(f"logical ops take bool inputs, got {list(dtypes)}")
    return broadcast_shapes(shapes[0], shapes[1]), "bool"


def infer_logical_not(shapes, dtypes, attrs):
    if dtypes[0] != "bool":
        raise ShapeError(f"Not takes a bool input, got {dtypes[0]}")
    return tuple(shapes[0]), "bool"


def infer_where(shapes, dtypes, attrs):
    """``Where(cond, a, b)``: cond is bool, a and b share a dtype; all three broadcast."""
    if dtypes[0] != "bool":
        raise ShapeError(f"Where: the condition must be bool, got {dtypes[0]}")
    return broadcast_shapes(*shapes), _same_dtype(dtypes[1:], "Where branches")


def infer_cast(shapes, dtypes, attrs):
    return tuple(shapes[0]), attrs["to"]


# --------------------------------------------------------------------------- reductions
def _reduce_axes(axes: Sequence[int], rank: int, what: str) -> list[int]:
    norm = [normalize_axis(a, rank, what=f"{what} axis") for a in axes] if axes else list(range(rank))
    if len(set(norm)) != len(norm):
        raise ShapeError(f"{what}: axes {tuple(axes)} repeat an axis")
    return norm


def infer_reduce(shapes, dtypes, attrs):
    """``ReduceMean``/``ReduceSum`` over ``axes`` (empty: every axis), ``keepdims`` 0 or 1."""
    x = shapes[0]
    if dtypes[0] == "bool":
        raise ShapeError("reductions do not take bool inputs (cast first)")
    if attrs["keepdims"] not in (0, 1):
        raise ShapeError(f"keepdims must be 0 or 1, got {attrs['keepdims']}")
    axes = set(_reduce_axes(attrs["axes"], len(x), "reduce"))
    if attrs["keepdims"]:
        return tuple(1 if i in axes else d for i, d in enumerate(x)), dtypes[0]
    return tuple(d for i, d in enumerate(x) if i not in axes), dtypes[0]


def infer_cumsum(shapes, dtypes, attrs):
    if dtypes[0] == "bool":
        raise ShapeError("CumSum does not take bool inputs (cast first)")
    normalize_axis(attrs["axis"], len(shapes[0]))
    return tuple(shapes[0]), dtypes[0]


# --------------------------------------------------------------------------- normalisation, attention
def check_norm_params(shapes, attrs, what: str) -> None:
    """A normalisation over dims ``axis``..end of ``shapes[0]``: each of ``shapes[1:]`` (scale,
    bias) has exactly those dims, or ``ShapeError`` names ``what`` (e.g. ``"RMSNorm: scale"``)."""
    x = shapes[0]
    norm = tuple(canonical_dim(d) for d in x[normalize_axis(attrs["axis"], len(x)):])
    for extra in shapes[1:]:
        if tuple(canonical_dim(d) for d in extra) != norm:
            raise ShapeError(f"{what} {format_shape(extra)} != normalized shape {format_shape(norm)}")


def infer_rms_norm(shapes, dtypes, attrs):
    """Normalise over dims ``axis``..end; an optional scale has exactly those dims."""
    check_norm_params(shapes, attrs, "RMSNorm: scale")
    return tuple(shapes[0]), _same_dtype(dtypes, "RMSNorm")


def infer_sdpa(shapes, dtypes, attrs):
    """``q [.., L, E]``, ``k [.., S, E]``, ``v [.., S, Ev]``, optional mask broadcasting to ``[.., L, S]``."""
    q, k, v = shapes[:3]
    if len(q) < 2 or len(k) < 2 or len(v) < 2:
        raise ShapeError("attention: q, k and v need rank >= 2")
    if not isinstance(q[-1], int):
        raise ShapeError(f"attention: the head size of q {format_shape(q)} must be static")
    if not _eq(q[-1], k[-1]):
        raise ShapeError(f"attention: q {format_shape(q)} and k {format_shape(k)} head sizes differ")
    if not _eq(k[-2], v[-2]):
        raise ShapeError(f"attention: k {format_shape(k)} and v {format_shape(v)} lengths differ")
    if attrs["is_causal"] not in (0, 1):
        raise ShapeError(f"attention: is_causal must be 0 or 1, got {attrs['is_causal']}")
    if attrs["scale"] < 0:
        raise ShapeError(f"attention: scale must be >= 0 (0: 1/sqrt(E)), got {attrs['scale']}")
    dtype = _same_dtype(dtypes[:3], "attention q/k/v")
    batch = broadcast_shapes(q[:-2], k[:-2], v[:-2])
    if len(shapes) == 4:
        if attrs["is_causal"]:
            raise ShapeError("attention: is_causal and a mask cannot be combined (as in torch)")
        if dtypes[3] not in ("bool", dtype):
            raise ShapeError(f"attention: the mask must be bool or {dtype}, got {dtypes[3]}")
        full = (*batch, q[-2], k[-2])
        if broadcast_shapes(shapes[3], full) != tuple(canonical_dim(d) for d in full):
            raise ShapeError(f"attention: mask {format_shape(shapes[3])} does not broadcast to {format_shape(full)}")
    return (*batch, q[-2], v[-1]), dtype


# --------------------------------------------------------------------------- movement
def infer_gather(shapes, dtypes, attrs):
    """ONNX ``Gather``: ``data[:axis] + indices + data[axis+1:]``."""
    data, idx = shapes
    if not data:
        raise ShapeError("Gather: data must have rank >= 1")
    if dtypes[1] not in INDEX_DTYPES:
        raise ShapeError(f"Gather: indices must be int32 or int64, got {dtypes[1]}")
    axis = normalize_axis(attrs["axis"], len(data))
    return (*data[:axis], *idx, *data[axis + 1 :]), dtypes[0]


def infer_gather_elements(shapes, dtypes, attrs):
    """``GatherElements``: data and indices of one rank; the result has the indices' shape."""
    data, idx = shapes
    if dtypes[1] not in INDEX_DTYPES:
        raise ShapeError(f"GatherElements: indices must be int32 or int64, got {dtypes[1]}")
    if len(data) != len(idx) or not data:
        raise ShapeError(f"GatherElements: data {format_shape(data)} and indices {format_shape(idx)} need one rank >= 1")
    normalize_axis(attrs["axis"], len(data))
    return tuple(idx), dtypes[0]


def infer_index(shapes, dtypes, attrs):
    """``x[(:,) * axis + (i0, i1, ...)]``: ``x[:axis] + broadcast(i0, i1, ...) + x[axis + k:]``."""
    x, indices = shapes[0], shapes[1:]
    if any(d not in INDEX_DTYPES for d in dtypes[1:]):
        raise ShapeError(f"Index: indices must be int32 or int64, got {list(dtypes[1:])}")
    axis = normalize_axis(attrs["axis"], len(x)) if x else 0
    if axis + len(indices) > len(x):
        raise ShapeError(f"Index: {len(indices)} indices from axis {attrs['axis']} exceed the rank of {format_shape(x)}")
    return (*x[:axis], *broadcast_shapes(*indices), *x[axis + len(indices) :]), dtypes[0]


def _bound(v: Dim, size: int) -> int:
    """A static slice bound clamped into ``[0, size]`` as Python slicing does."""
    assert isinstance(v, int)
    if v < 0:
        v += size
    return min(max(v, 0), size)


def slice_size(dim: Dim, start: Dim, end: Dim, step: int) -> Dim:
    """Size of ``x[start:end:step]`` along an axis of size ``dim``; ``ShapeError`` when it is not a dim.

    With a named ``dim``, static bounds of one sign are taken to lie inside it (torch's
    export assumes the same); a named ``end`` over a static ``dim`` is taken to be at most ``dim``.
    """
    if step < 1:
        raise ShapeError(f"Slice: step {step} must be >= 1")
    to_end = isinstance(end, int) and end >= SLICE_END
    if isinstance(dim, int) and isinstance(start, int) and isinstance(end, int):
        s, e = _bound(start, dim), _bound(end, dim)
        return max(0, -(-(e - s) // step))
    if isinstance(start, int) and (to_end or (isinstance(end, str) and _eq(end, dim))):
        if start == 0 and step == 1:
            return canonical_dim(dim)
        if start < 0:
            return -(start // step)  # ceil(-start / step)
    elif isinstance(start, int) and isinstance(end, int) and (start >= 0) == (end >= 0):
        return max(0, -(-(end - start) // step))
    elif isinstance(dim, int) and start == 0 and step == 1 and isinstance(end, str):
        return canonical_dim(end)
    raise ShapeError(f"Slice: the size of [{start}:{end}:{step}] of a dim {dim} cannot be written as a dim")


def infer_slice(shapes, dtypes, attrs):
    """ONNX ``Slice`` with positive steps; bounds may name dims (``ends=("seq",)``)."""
    x = list(shapes[0])
    axes, starts, ends, steps = attrs["axes"], attrs["starts"], attrs["ends"], attrs["steps"] or (1,) * len(attrs["axes"])
    if not (len(axes) == len(starts) == len(ends) == len(steps)):
        raise ShapeError(f"Slice: axes {axes}, starts {starts}, ends {ends}, steps {steps} differ in length")
    seen: set[int] = set()
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        i = normalize_axis(a, len(x), what="Slice axis")
        if i in seen:
            raise ShapeError(f"Slice: axis {a} appears twice")
        seen.add(i)
        x[i] = slice_size(x[i], s, e, st)
    return tuple(x), dtypes[0]


def infer_unsqueeze(shapes, dtypes, attrs):
    """Insert size-1 dims at ``axes`` (counted in the output's rank, as ONNX)."""
    x, axes = shapes[0], attrs["axes"]
    rank = len(x) + len(axes)
    norm = sorted(normalize_axis(a, rank, what="Unsqueeze axis") for a in axes)
    if not axes or len(set(norm)) != len(norm):
        raise ShapeError(f"Unsqueeze: axes {axes} must be non-empty and distinct")
    rest = iter(x)
    return tuple(1 if i in norm else next(rest) for i in range(rank)), dtypes[0]


def infer_squeeze(shapes, dtypes, attrs):
    """Drop the size-1 dims at ``axes``."""
    x, axes = shapes[0], attrs["axes"]
    norm = {normalize_axis(a, len(x), what="Squeeze axis") for a in axes}
    if not axes or len(norm) != len(axes):
        raise ShapeError(f"Squeeze: axes {axes} must be non-empty and distinct")
    for i in norm:
        if x[i] != 1:
            raise ShapeError(f"Squeeze: dim {i} of {format_shape(x)} is not 1")
    return tuple(d for i, d in enumerate(x) if i not in norm), dtypes[0]


def infer_expand(shapes, dtypes, attrs):
    """ONNX ``Expand``: the input broadcast against ``shape`` (which may name dims)."""
    target = attrs["shape"]
    for t in target:
        if isinstance(t, int) and t < 0:
            raise ShapeError(f"Expand: negative size {t} in {target}")
    return broadcast_shapes(shapes[0], target), dtypes[0]


def infer_arange(shapes, dtypes, attrs):
    """``[start, end)`` by ``step``; with a named bound only ``Arange(0, n, 1)`` has a dim as its size."""
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    size: Any
    if isinstance(step, str) or step == 0:
        raise ShapeError(f"Arange: step must be a nonzero int, got {step!r}")
    if isinstance(start, int) and isinstance(end, int):
        size = max(0, -(-(end - start) // step))
    elif start == 0 and step == 1:
        size = end
    else:
        raise ShapeError(f"Arange({start}, {end}, {step}): the length cannot be written as a dim")
    shape: Shape = (canonical_dim(size),)
    return shape, attrs["dtype"]
