"""ATen converters that emit the indexing family (``Gather``, ``GatherElements``, ``Index``).

``embedding`` -> ``Gather`` on axis 0; ``index_select`` -> ``Gather``; ``select.int`` ->
``Gather`` of a constant index (a static index only); ``unbind`` -> one ``Gather`` per
position of a static axis (a tuple); ``gather`` -> ``GatherElements``; ``index.Tensor``
with one index tensor -> ``Gather``, with several on consecutive axes -> ``Index`` (bool
masks and non-consecutive axes are refused); ``diagonal`` -> ``Index`` of two constant
ranges over static axes (after a ``Transpose`` moving them last); ``slice_scatter`` and
``select_scatter`` -> ``Concat`` of the kept slices and ``src`` (step 1; static bounds, counted from
either end of a dynamic axis), else ``Where`` of a constant mask over ``Gather`` of ``src`` (a static axis); ``index_put`` -> ``IndexPut`` (index
tensors on consecutive axes), with one bool mask and one value for all its positions ``Where`` of the mask;
``index_add`` -> an accumulating ``IndexPut`` on its axis; ``scatter.src``/``scatter.value``/``scatter_add``
-> ``ScatterElements`` (``src`` cut to the index's shape, a value broadcast to it);
``scatter_reduce.two`` -> ``ScatterElements`` with ``add``/``mul``/``max``/``min`` (``include_self=False``:
over the reduction's identity where the index reaches), ``mean`` as that sum over the count of
contributions (at least 1; integers floor-divided, as torch);
``_embedding_bag`` / ``embedding_bag.padding_idx`` (sum, mean, max; the bag sums and counts only:
offset2bag, bag sizes and max indices refused when used) -> ``Gather`` of the rows,
``ScatterElements`` of each into its bag (the bag of position n: the offsets <= n, minus one);
``col2im`` (``F.fold``) -> ``IndexPut`` accumulating each column of blocks at its constant positions
in the padded output, then a ``Slice`` of the padding;
``masked_scatter`` -> ``Where`` of the mask over ``Gather`` of the flattened source at the mask's
running count (``CumSum``) minus one; ``bucketize`` -> the count of boundaries below each value
(``Less``/``LessOrEqual`` against the boundaries on a new last axis, ``ReduceSum``); ``unfold``
(``Tensor.unfold``: sliding windows of a static axis) -> ``Gather`` of a constant ``[windows, size]``
index, the window axis moved last; ``one_hot`` (a given class count) -> ``Equal`` of the index on a new last axis
against a constant range, cast to ``int64`` (its decomposition would retrace the whole program; torch checks the
index range at trace time only, as there).
"""

from __future__ import annotations

import numpy as np
import torch

from flora_graph.frontend.aten.registry import SymDim, as_dtype, axis_of, dim_of, refuse, refuse_used_outputs, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim, canonical_dim, subtract_dims
from flora_graph.ops.movement import SLICE_END

__all__: list[str] = []

aten = torch.ops.aten


@register(aten.embedding.default)
def _embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return ctx.emit(Op.GATHER, [weight, indices], {"axis": 0})


@register(aten.index_select.default)
def _index_select(ctx, x, dim, index):
    return ctx.emit(Op.GATHER, [x, index], {"axis": int(dim)})


@register(aten.gather.default)
def _gather_elements(ctx, x, dim, index, *, sparse_grad=False):
    return ctx.emit(Op.GATHER_ELEMENTS, [x, index], {"axis": int(dim)})


@register(aten.select.int)
def _select(ctx, x, dim, index):
    if isinstance(index, SymDim):
        raise refuse(ctx, "select at a dynamic index")
    idx = ctx.new_param(f"{ctx.fx_node.name}_index", np.asarray(int(index), dtype=np.int64))
    return ctx.emit(Op.GATHER, [x, idx], {"axis": int(dim)})


@register(aten.unbind.int)
def _unbind(ctx, x, dim=0):
    axis = axis_of(int(dim), len(x.shape))
    if not isinstance(x.shape[axis], int):
        raise refuse(ctx, f"unbind along the dynamic dim {x.shape[axis]!r}")
    picks = [ctx.new_param(f"{ctx.fx_node.name}_index", np.asarray(i, dtype=np.int64)) for i in range(x.shape[axis])]
    return tuple(ctx.emit(Op.GATHER, [x, i], {"axis": axis}) for i in picks)


@register(aten.index.Tensor)
def _index(ctx, x, indices):
    """One index tensor -> ``Gather``; several on consecutive axes -> ``Index`` (their shapes broadcast)."""
    used = [(i, t) for i, t in enumerate(indices) if t is not None]
    if any(t.dtype == "bool" for _, t in used):
        if len(indices) == 1 and used and used[0][0] == 0:  # rows of the leading axes: every row, the picked first
            from flora_graph.frontend.selected_rows import select

            return select(ctx, x, used[0][1])
        raise refuse(ctx, "indexing with a bool mask beside other indices, or not from the first axis")
    if not used or [i for i, _ in used] != list(range(used[0][0], used[0][0] + len(used))):
        raise refuse(ctx, "advanced indexing of axes that are not consecutive")
    if len(used) == 1:
        return ctx.emit(Op.GATHER, [x, used[0][1]], {"axis": used[0][0]})
    return ctx.emit(Op.INDEX, [x, *(t for _, t in used)], {"axis": used[0][0]})


# --------------------------------------------------------------------------- diagonal
@register(aten.diagonal.default)
def _diagonal(ctx, x, offset=0, dim1=0, dim2=1):
    rank = len(x.shape)
    a, b = axis_of(int(dim1), rank), axis_of(int(dim2), rank)
    if a == b or not isinstance(x.shape[a], int) or not isinstance(x.shape[b], int):
        raise refuse(ctx, "diagonal of one axis or of dynamic axes")
    off = int(offset)
    n = max(0, min(x.shape[a] + min(off, 0), x.shape[b] - max(off, 0)))
    perm = (*(i for i in range(rank) if i not in (a, b)), a, b)
    if perm != tuple(range(rank)):
        x = ctx.emit(Op.TRANSPOSE, [x], {"perm": perm})
    rows = ctx.new_param(f"{ctx.fx_node.name}_rows", np.arange(n, dtype=np.int64) - min(off, 0))
    cols = ctx.new_param(f"{ctx.fx_node.name}_cols", np.arange(n, dtype=np.int64) + max(off, 0))
    return ctx.emit(Op.INDEX, [x, rows, cols], {"axis": rank - 2})


# --------------------------------------------------------------------------- scatters
def _scatter_slice(ctx, x, src, axis: int, positions: range):
    """``x`` with ``src`` written at ``positions`` of the static ``axis``."""
    src = as_dtype(ctx, src, x.dtype)
    n, rank = x.shape[axis], len(x.shape)
    if positions.step == 1:
        parts = []
        if positions.start > 0:
            parts.append(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (positions.start,)}))
        parts.append(src)
        if positions.stop < n:
            parts.append(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (positions.stop,), "ends": (n,)}))
        return parts[0] if len(parts) == 1 else ctx.emit(Op.CONCAT, parts, {"axis": axis})
    where = np.zeros(n, dtype=np.int64)
    where[list(positions)] = np.arange(len(positions))
    mask = np.zeros(n, dtype=bool)
    mask[list(positions)] = True
    picked = ctx.emit(Op.GATHER, [src, ctx.new_param(f"{ctx.fx_node.name}_from", where)], {"axis": axis})
    cond = ctx.new_param(f"{ctx.fx_node.name}_mask", mask.reshape((n,) + (1,) * (rank - axis - 1)))
    return ctx.emit(Op.WHERE, [cond, picked, x], {})


def _static_axis(ctx, x, dim) -> int:
    axis = axis_of(int(dim), len(x.shape))
    if not isinstance(x.shape[axis], int):
        raise refuse(ctx, f"a strided scatter along the dynamic dim {x.shape[axis]!r}")
    return axis


def _scatter_run(ctx, x, src, axis: int, start: Dim, end: Dim | None):
    """``x`` with ``src`` written at ``start:end`` (``None``: to the end) of ``axis``: static bounds that may count
    from the end (negative) over a dynamic dim (BART's ``shift_tokens_right``: ``shifted[:, 1:] = ids[:, :-1]``,
    ``shifted[:, 0] = start_id``), or bounds that name dims (``x[..., :seq] = src``): the parts of ``x`` before and
    after, with ``src`` between; refused where they do not add up to the axis."""
    src = as_dtype(ctx, src, x.dtype)
    parts = []
    if start != 0:
        parts.append(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (start,), "steps": (1,)}))
    parts.append(src)
    if end is not None:
        parts.append(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (end,), "ends": (SLICE_END,), "steps": (1,)}))
    out = parts[0] if len(parts) == 1 else ctx.emit(Op.CONCAT, parts, {"axis": axis})
    if canonical_dim(out.shape[axis]) != canonical_dim(x.shape[axis]):
        raise refuse(ctx, f"a scatter of {src.shape[axis]!r} elements at {start}:{end} of the dynamic dim "
                          f"{x.shape[axis]!r}, which it does not fill exactly")
    return out


def _scatter_at(ctx, x, src, axis: int, start) -> ComputationNode:
    """``x`` with ``src`` written from ``start`` (a number or a symbolic size) along the static ``axis``, ``src``'s
    length there symbolic: ``Where(start <= i < start + n, src[clip(i - start, 0, n - 1)], x)`` over the axis'
    positions ``i``, so that the result keeps the axis' static size whatever the bounds (torch checks that they fit)."""
    size, rank = x.shape[axis], len(x.shape)
    n = as_dtype(ctx, SymDim(src.shape[axis]) if not isinstance(src.shape[axis], int) else src.shape[axis], "int64")
    places = ctx.emit(Op.ARANGE, [], {"start": 0, "end": size, "step": 1, "dtype": "int64"})
    rel = ctx.emit(Op.SUB, [places, as_dtype(ctx, start, "int64")])
    last = ctx.emit(Op.SUB, [n, ctx.scalar(1, "int64")])
    index = ctx.emit(Op.MAX, [ctx.emit(Op.MIN, [rel, last]), ctx.scalar(0, "int64")])
    picked = ctx.emit(Op.GATHER, [as_dtype(ctx, src, x.dtype), index], {"axis": axis})
    inside = ctx.emit(Op.AND, [ctx.emit(Op.GREATER_OR_EQUAL, [rel, ctx.scalar(0, "int64")]), ctx.emit(Op.LESS, [rel, n])])
    if rank - axis - 1:
        inside = ctx.emit(Op.RESHAPE, [inside], {"shape": (size,) + (1,) * (rank - axis - 1)})
    return ctx.emit(Op.WHERE, [inside, picked, x], {})


def _to_end(end) -> bool:
    return end is None or (isinstance(end, int) and end >= 2**62)


@register(aten.slice_scatter.default)
def _slice_scatter(ctx, x, src, dim=0, start=None, end=None, step=1):
    if any(isinstance(v, SymDim) for v in (start, end)):
        if int(step) != 1:
            raise refuse(ctx, f"slice_scatter at dynamic bounds with step {step}")
        axis = axis_of(int(dim), len(x.shape))
        if isinstance(x.shape[axis], int):  # x[..., :seq] = src over a static axis (Grounding DINO's padded logits)
            return _scatter_at(ctx, x, src, axis, 0 if start is None else start)
        return _scatter_run(ctx, x, src, axis, 0 if start is None else dim_of(ctx, start),
                            None if _to_end(end) else dim_of(ctx, end))
    if (start or 0) == 0 and _to_end(end) and int(step) == 1 and src.shape == x.shape:
        return as_dtype(ctx, src, x.dtype)  # the whole axis (x[:, i] = v written through x[:]): src is the result
    axis = axis_of(int(dim), len(x.shape))
    if not isinstance(x.shape[axis], int) and int(step) == 1:
        return _scatter_run(ctx, x, src, axis, int(start or 0), None if _to_end(end) else int(end))
    axis = _static_axis(ctx, x, dim)
    positions = range(x.shape[axis])[slice(start, end, int(step))]
    if not len(positions):
        return x
    return _scatter_slice(ctx, x, src, axis, positions)


@register(aten.select_scatter.default)
def _select_scatter(ctx, x, src, dim, index):
    if isinstance(index, SymDim):
        raise refuse(ctx, "select_scatter at a dynamic index")
    axis = axis_of(int(dim), len(x.shape))
    src = ctx.emit(Op.UNSQUEEZE, [as_dtype(ctx, src, x.dtype)], {"axes": (axis,)})
    if not isinstance(x.shape[axis], int):
        i = int(index)
        return _scatter_run(ctx, x, src, axis, i, None if i == -1 else i + 1)
    i = int(index) % x.shape[axis]
    return _scatter_slice(ctx, x, src, axis, range(i, i + 1))


def true_ranks(ctx, flat: ComputationNode) -> ComputationNode:
    """Each place of the 1-D bool mask ``flat``: its rank among the true places, ``cumsum(mask) - 1`` (``-1`` before
    the first), the row a masked write takes (``masked_scatter``, ``index_put``, rows a mask picked)."""
    counted = ctx.emit(Op.CUMSUM, [ctx.emit(Op.CAST, [flat], {"to": "int64"})], {"axis": 0})
    return ctx.emit(Op.SUB, [counted, ctx.scalar(1, "int64")])


@register(aten.index_put.default)
def _index_put(ctx, x, indices, values, accumulate=False):
    used = [(i, t) for i, t in enumerate(indices) if t is not None]
    if any(t.dtype == "bool" for _, t in used):
        return _masked_put(ctx, x, used, values, bool(accumulate))
    if not used or [i for i, _ in used] != list(range(used[0][0], used[0][0] + len(used))):
        raise refuse(ctx, "index_put of axes that are not consecutive")
    values = as_dtype(ctx, values, x.dtype)
    return ctx.emit(Op.INDEX_PUT, [x, values, *(t for _, t in used)],
                    {"axis": used[0][0], "accumulate": int(bool(accumulate))})


@register(aten.index_add.default)
def _index_add(ctx, x, dim, index, source, *, alpha=1):
    """``x.index_add(dim, index, source, alpha)``: ``source`` (times ``alpha``) added at positions ``index`` of axis
    ``dim``, repeated positions summing: an accumulating ``IndexPut`` on that axis."""
    source = as_dtype(ctx, source, x.dtype)
    if alpha != 1:
        source = ctx.emit(Op.MUL, [source, ctx.scalar(alpha, x.dtype)])
    return ctx.emit(Op.INDEX_PUT, [x, source, index], {"axis": axis_of(int(dim), len(x.shape)), "accumulate": 1})


def _masked_put(ctx, x, used: list, values, accumulate: bool) -> ComputationNode:
    """``x[mask] = values`` (``+=`` where ``accumulate``) with one bool mask over axes ``k .. k+m`` of ``x`` and one
    value for every selected position (a row, a scalar: T5Gemma 2's end-of-image embedding): ``Where`` of the mask
    over ``values`` broadcast, no data-dependent shape. A value per selected position of the leading axes (rows a bool
    mask picked, :mod:`~flora_graph.frontend.selected_rows`) is gathered to its place, the k-th true one taking row
    k; other values per selected position are refused."""
    if len(used) != 1:
        raise refuse(ctx, "index_put with a bool mask beside other indices (data-dependent positions)")
    (k, mask), = used
    m, rank = len(mask.shape), len(x.shape)
    if tuple(canonical_dim(d) for d in mask.shape) != tuple(canonical_dim(d) for d in x.shape[k:k + m]):
        raise refuse(ctx, f"index_put with a bool mask of shape {list(mask.shape)} over {list(x.shape)}")
    tail = rank - k - m  # the axes each selected position carries
    if isinstance(values, ComputationNode):
        vshape = list(values.shape)
        if len(vshape) == tail + 1 and vshape[0] == 1:  # one row for all, as [1, ...]
            values = ctx.emit(Op.RESHAPE, [values], {"shape": tuple(vshape[1:]) or (1,)})
            vshape = vshape[1:]
        if len(vshape) == tail + 1 and k == 0:  # a row per masked position, in order (rows a bool mask picked)
            place = true_ranks(ctx, ctx.emit(Op.RESHAPE, [mask], {"shape": (-1,)}))
            place = ctx.emit(Op.MAX, [place, ctx.scalar(0, "int64")])  # before the first: masked out below
            values = ctx.emit(Op.RESHAPE, [ctx.emit(Op.GATHER, [values, place], {"axis": 0})], {"shape": tuple(x.shape)})
        elif len(vshape) > tail:
            raise refuse(ctx, "index_put of a value per masked position (data-dependent positions)")
    values = as_dtype(ctx, values, x.dtype)
    where = ctx.emit(Op.RESHAPE, [mask], {"shape": (*(1,) * k, *mask.shape, *(1,) * tail)}) if k or tail else mask
    if accumulate:
        values = ctx.emit(Op.ADD, [x, values])
    return ctx.emit(Op.WHERE, [where, values, x])


def _updates(ctx, x, index, src) -> ComputationNode:
    """``src`` as ScatterElements' updates: in ``x``'s dtype, cut (a tensor) or broadcast (a value) to the index's shape."""
    if isinstance(src, ComputationNode):
        src = as_dtype(ctx, src, x.dtype)
        cut = [a for a in range(len(index.shape)) if canonical_dim(src.shape[a]) != canonical_dim(index.shape[a])]
        if cut:
            src = ctx.emit(Op.SLICE, [src], {"axes": tuple(cut), "starts": (0,) * len(cut),
                                            "ends": tuple(index.shape[a] for a in cut)})
        return src
    return ctx.emit(Op.EXPAND, [as_dtype(ctx, src, x.dtype)], {"shape": tuple(index.shape)})


def _scatter(ctx, x, dim, index, src, reduction: str):
    axis = axis_of(int(dim), len(x.shape))
    return ctx.emit(Op.SCATTER_ELEMENTS, [x, index, _updates(ctx, x, index, src)], {"axis": axis, "reduction": reduction})


@register(aten.scatter.src, aten.scatter.value)
def _scatter_none(ctx, x, dim, index, src):
    return _scatter(ctx, x, dim, index, src, "none")


@register(aten.scatter_add.default)
def _scatter_add(ctx, x, dim, index, src):
    return _scatter(ctx, x, dim, index, src, "add")


# --------------------------------------------------------------------------- masked_scatter
@register(aten.masked_scatter.default)
def _masked_scatter(ctx, x, mask, source):
    """``x`` (broadcast with ``mask``) with its masked places filled, in row-major order, by ``source``'s
    first elements: the place whose mask is the k-th true one takes ``source.flatten()[k]``."""
    shape = tuple(ctx.ir_dim(d) for d in ctx.fx_node.meta["val"].shape)
    x, mask = (v if tuple(v.shape) == shape else ctx.emit(Op.EXPAND, [v], {"shape": shape}) for v in (x, mask))
    k = true_ranks(ctx, ctx.emit(Op.RESHAPE, [mask], {"shape": (-1,)}))  # -1 before the first true place: masked out
    taken = ctx.emit(Op.GATHER, [ctx.emit(Op.RESHAPE, [as_dtype(ctx, source, x.dtype)], {"shape": (-1,)}), k], {"axis": 0})
    return ctx.emit(Op.WHERE, [mask, ctx.emit(Op.RESHAPE, [taken], {"shape": shape}), x])


# --------------------------------------------------------------------------- scatter_reduce
_REDUCTIONS = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def _identity(reduction: str, dtype: str) -> float | int:
    """The value ``reduction`` leaves any number unchanged with, in ``dtype``."""
    if reduction in ("add", "mul"):
        return 0 if reduction == "add" else 1
    big = float("inf") if dtype.startswith(("float", "bfloat")) else int(np.iinfo(dtype).max)
    return -big if reduction == "max" else big


@register(aten.scatter_reduce.two)
def _scatter_reduce(ctx, x, dim, index, src, reduce, *, include_self=True):
    """torch.scatter_reduce: each place of ``x`` the index reaches combined with the ``src`` values sent there
    (and, ``include_self``, its own value); places it does not reach keep ``x``'s."""
    if x.dtype == "bool":
        raise refuse(ctx, "scatter_reduce of a bool tensor")
    if reduce not in (*_REDUCTIONS, "mean"):
        raise refuse(ctx, f"scatter_reduce with reduce={reduce!r}")
    axis = axis_of(int(dim), len(x.shape))
    src = _updates(ctx, x, index, src)

    def filled(value, shape) -> ComputationNode:
        return ctx.emit(Op.EXPAND, [ctx.scalar(value, x.dtype)], {"shape": tuple(shape)})

    def scatter(data, updates, reduction) -> ComputationNode:
        return ctx.emit(Op.SCATTER_ELEMENTS, [data, index, updates], {"axis": axis, "reduction": reduction})

    def without_self(value) -> ComputationNode:  # x with ``value`` at every place the index reaches
        if include_self:
            return x
        reached = ctx.emit(Op.CAST, [scatter(filled(0, x.shape), filled(1, index.shape), "max")], {"to": "bool"})
        return ctx.emit(Op.WHERE, [reached, ctx.scalar(value, x.dtype), x])

    if reduce != "mean":
        reduction = _REDUCTIONS[reduce]
        return scatter(without_self(_identity(reduction, x.dtype)), src, reduction)
    total = scatter(without_self(0), src, "add")
    count = scatter(filled(int(bool(include_self)), x.shape), filled(1, index.shape), "add")
    count = ctx.emit(Op.MAX, [count, ctx.scalar(1, x.dtype)])
    if x.dtype.startswith(("float", "bfloat")):
        return ctx.emit(Op.DIV, [total, count])
    return ctx.emit(Op.DIV, [ctx.emit(Op.SUB, [total, ctx.emit(Op.REMAINDER, [total, count])]), count])


# --------------------------------------------------------------------------- col2im (fold)
@register(aten.col2im.default)
def _col2im(ctx, x, output_size, kernel_size, dilation, padding, stride):
    """torch's fold of ``x [N, C*kh*kw, L]`` (or ``[C*kh*kw, L]``) into ``[N, C, H, W]``: every block's
    values summed back into the places its window covers."""
    (h, w), (kh, kw), (dh, dw), (ph, pw), (sh, sw) = (
        (int(v[0]), int(v[-1])) for v in (output_size, kernel_size, dilation, padding, stride))
    batched = len(x.shape) == 3
    if len(x.shape) not in (2, 3) or not all(isinstance(d, int) for d in x.shape[-2:]):
        raise refuse(ctx, "col2im needs x [N, C*kh*kw, L] or [C*kh*kw, L] with static C*kh*kw and L")
    if not batched:
        x = ctx.emit(Op.UNSQUEEZE, [x], {"axes": (0,)})
    ck, blocks = x.shape[1:]
    hp, wp = h + 2 * ph, w + 2 * pw
    bh, bw = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if ck % (kh * kw) or bh * bw != blocks:
        raise refuse(ctx, f"col2im of {ck} x {blocks} columns that do not fit {kh}x{kw} blocks of {(h, w)}")
    ki, kj, bi, bj = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(bh), np.arange(bw), indexing="ij")
    places = ((bi * sh + ki * dh) * wp + bj * sw + kj * dw).astype(np.int64).ravel()  # (kernel pos, block) order
    c = ck // (kh * kw)
    values = ctx.emit(Op.RESHAPE, [x], {"shape": (0, c, places.size)})
    zeros = ctx.emit(Op.EXPAND, [ctx.scalar(0, x.dtype)], {"shape": (x.shape[0], c, hp * wp)})
    summed = ctx.emit(Op.INDEX_PUT, [zeros, values, ctx.new_param(f"{ctx.fx_node.name}_places", places)],
                      {"axis": 2, "accumulate": 1})
    out = ctx.emit(Op.RESHAPE, [summed], {"shape": (0, c, hp, wp)})
    if ph or pw:
        out = ctx.emit(Op.SLICE, [out], {"axes": (2, 3), "starts": (ph, pw), "ends": (ph + h, pw + w)})
    return out if batched else ctx.emit(Op.SQUEEZE, [out], {"axes": (0,)})


# --------------------------------------------------------------------------- embedding_bag
_BAG_MODES = {0: "sum", 1: "mean", 2: "max"}


@register(aten._embedding_bag.default, aten.embedding_bag.padding_idx)
def _embedding_bag(ctx, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    """Each bag's rows of ``weight`` reduced (sum, mean or max; an empty bag gives zeros): bag ``b`` holds
    the positions from ``offsets[b]`` to the next offset (``include_last_offset``: ``offsets`` also ends the
    last bag, which torch requires to be the end). Positions indexing ``padding_idx`` count for nothing."""
    refuse_used_outputs(ctx, "the offset2bag/bag_size/max_indices outputs", 1, 2, 3)
    if len(indices.shape) != 1 or offsets is None or len(offsets.shape) != 1:
        raise refuse(ctx, "embedding_bag needs 1-D indices and offsets")
    if padding_idx is not None and padding_idx < 0:  # embedding_bag: counts from the end; _embedding_bag: none
        padding_idx = padding_idx + weight.shape[0] if ctx.fx_node.target is aten.embedding_bag.padding_idx else None
    n, d, dtype = indices.shape[0], weight.shape[1], weight.dtype
    starts = as_dtype(ctx, offsets, "int64")
    if include_last_offset:
        starts = ctx.emit(Op.SLICE, [starts], {"axes": (0,), "starts": (0,), "ends": (-1,)})
    if isinstance(n, int):
        positions = ctx.new_param(f"{ctx.fx_node.name}_positions", np.arange(n, dtype=np.int64))
    else:
        positions = ctx.emit(Op.ARANGE, [], {"start": 0, "end": n, "step": 1, "dtype": "int64"})
    begun = ctx.emit(Op.LESS_OR_EQUAL, [ctx.emit(Op.UNSQUEEZE, [starts], {"axes": (1,)}),
                                        ctx.emit(Op.UNSQUEEZE, [positions], {"axes": (0,)})])
    count_begun = ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.CAST, [begun], {"to": "int64"})], {"axes": (0,), "keepdims": 0})
    bag = ctx.emit(Op.SUB, [count_begun, ctx.scalar(1, "int64")])
    valid = ctx.emit(Op.GREATER_OR_EQUAL, [bag, ctx.scalar(0, "int64")])
    if padding_idx is not None:
        padded = ctx.emit(Op.EQUAL, [as_dtype(ctx, indices, "int64"), ctx.scalar(int(padding_idx), "int64")])
        valid = ctx.emit(Op.AND, [valid, ctx.emit(Op.NOT, [padded])])
    bag = ctx.emit(Op.WHERE, [valid, bag, ctx.scalar(0, "int64")])
    rows = ctx.emit(Op.GATHER, [weight, indices], {"axis": 0})
    if per_sample_weights is not None:
        rows = ctx.emit(Op.MUL, [rows, ctx.emit(Op.UNSQUEEZE, [as_dtype(ctx, per_sample_weights, dtype)], {"axes": (1,)})])
    kind = _BAG_MODES.get(int(mode))
    if kind is None:
        raise refuse(ctx, f"embedding_bag mode {mode}")
    empty = 0.0 if kind != "max" else -float("inf")
    rows = ctx.emit(Op.WHERE, [ctx.emit(Op.UNSQUEEZE, [valid], {"axes": (1,)}), rows, ctx.scalar(empty, dtype)])
    bags = starts.shape[0]

    def into_bags(values, index, shape, reduction) -> ComputationNode:
        start = ctx.emit(Op.EXPAND, [ctx.scalar(empty if reduction == "max" else 0.0, dtype)], {"shape": shape})
        return ctx.emit(Op.SCATTER_ELEMENTS, [start, index, values], {"axis": 0, "reduction": reduction})

    spread = ctx.emit(Op.EXPAND, [ctx.emit(Op.UNSQUEEZE, [bag], {"axes": (1,)})], {"shape": (n, d)})
    out = into_bags(rows, spread, (bags, d), "max" if kind == "max" else "add")
    if kind == "sum":
        return out, None, None, None
    count = into_bags(ctx.emit(Op.CAST, [valid], {"to": dtype}), bag, (bags,), "add")
    count = ctx.emit(Op.UNSQUEEZE, [count], {"axes": (1,)})
    if kind == "mean":
        return ctx.emit(Op.DIV, [out, ctx.emit(Op.MAX, [count, ctx.scalar(1.0, dtype)])]), None, None, None
    filled = ctx.emit(Op.GREATER, [count, ctx.scalar(0.0, dtype)])
    return ctx.emit(Op.WHERE, [filled, out, ctx.scalar(0.0, dtype)]), None, None, None


@register(aten.bucketize.Tensor)
def _bucketize(ctx, x, boundaries, *, out_int32=False, right=False):
    """The index of each value's bucket among sorted 1-D ``boundaries``: how many are below it (``right``: at or
    below it), as torch's ``bucketize`` counts."""
    if len(boundaries.shape) != 1:
        raise refuse(ctx, f"bucketize by boundaries of rank {len(boundaries.shape)} (1-D only)")
    dtype = x.dtype if x.dtype == boundaries.dtype else "float64"
    v = ctx.emit(Op.UNSQUEEZE, [as_dtype(ctx, x, dtype)], {"axes": (len(x.shape),)})
    below = ctx.emit(Op.LESS_OR_EQUAL if right else Op.LESS, [as_dtype(ctx, boundaries, dtype), v])
    count = ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.CAST, [below], {"to": "int64"})],
                     {"axes": (len(x.shape),), "keepdims": 0})
    return ctx.emit(Op.CAST, [count], {"to": "int32"}) if out_int32 else count


@register(aten.isin.Tensor_Tensor, aten.isin.Tensor_Scalar)
def _isin(ctx, x, values, *, assume_unique=False, invert=False):
    """Whether each element of ``x`` is one of ``values`` (``invert``: is none of them): ``Equal`` against the
    flattened values on a new last axis, any of them (Grounding DINO's special tokens among its ids)."""
    dtype = x.dtype if not isinstance(values, ComputationNode) or values.dtype == x.dtype else "float64"
    if isinstance(values, ComputationNode):
        flat = ctx.emit(Op.RESHAPE, [as_dtype(ctx, values, dtype)], {"shape": (-1,)})
    else:  # one value (Tensor_Scalar)
        flat = ctx.new_param(ctx.fx_node.name + "_values", np.asarray([values], dtype=dtype))
    v = ctx.emit(Op.UNSQUEEZE, [as_dtype(ctx, x, dtype)], {"axes": (len(x.shape),)})
    hits = ctx.emit(Op.CAST, [ctx.emit(Op.EQUAL, [v, flat])], {"to": "int64"})
    found = ctx.emit(Op.REDUCE_MAX, [hits], {"axes": (len(x.shape),), "keepdims": 0})
    return ctx.emit(Op.EQUAL, [found, ctx.scalar(0 if invert else 1, "int64")])


@register(aten.one_hot.default)
def _one_hot(ctx, x, num_classes=-1):
    """``F.one_hot``: ``int64`` ``[..., num_classes]``, 1 where the position is the index."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise refuse(ctx, "one_hot without num_classes (a class count read from the data)")
    v = ctx.emit(Op.UNSQUEEZE, [as_dtype(ctx, x, "int64")], {"axes": (len(x.shape),)})
    hit = ctx.emit(Op.EQUAL, [v, ctx.new_param(ctx.fx_node.name + "_classes", np.arange(num_classes, dtype=np.int64))])
    return ctx.emit(Op.CAST, [hit], {"to": "int64"})


@register(aten.unfold.default)
def _unfold(ctx, x, dim, size, step):
    """``Tensor.unfold``: the windows of ``size`` every ``step`` along an axis, a new last axis of ``size``. A
    dynamic axis (a short convolution's padded tokens, ``seq + k - 1``) takes windows every position: ``length -
    size + 1`` of them, their starts an ``Arange`` of that dim."""
    if not x.shape:
        raise refuse(ctx, "unfold of a scalar")
    axis = axis_of(int(dim), len(x.shape))
    length = x.shape[axis]
    size, step = int(size), int(step)
    if isinstance(length, int):
        count = (length - size) // step + 1
        index = np.arange(count)[:, None] * step + np.arange(size)[None, :]
        idx = ctx.new_param(f"{ctx.fx_node.name}_windows", index.astype(np.int64))
    else:
        count = subtract_dims(length, size - 1) if step == 1 else None
        if count is None:
            raise refuse(ctx, f"unfold of a dynamic axis of size {length!r} by {size} every {step}: the window "
                              "count is no dim (every position only)")
        starts = ctx.emit(Op.ARANGE, [], {"start": 0, "end": count, "step": 1, "dtype": "int64"})
        offsets = ctx.new_param(f"{ctx.fx_node.name}_offsets", np.arange(size, dtype=np.int64)[None, :])
        idx = ctx.emit(Op.ADD, [ctx.emit(Op.UNSQUEEZE, [starts], {"axes": (1,)}), offsets])  # [count, size]
    y = ctx.emit(Op.GATHER, [x, idx], {"axis": axis})  # [..., count, size, ...]
    rank = len(y.shape)
    perm = [a for a in range(rank) if a != axis + 1] + [axis + 1]
    return y if perm == list(range(rank)) else ctx.emit(Op.TRANSPOSE, [y], {"perm": tuple(perm)})
