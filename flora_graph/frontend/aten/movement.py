"""ATen converters that emit the movement family: reshapes, transposes, concatenation,
splits, slices and broadcasts.

``t``/``transpose``/``permute`` -> ``Transpose``; ``view``/``reshape``/``_unsafe_view``
(``view_as``/``reshape_as``: to the other tensor's shape) -> ``Reshape`` (sizes as ONNX's: 0
copies the input's dim, named dims by name, at most one -1); ``flatten`` -> ``Flatten`` (from
axis 1) or ``Reshape``; ``cat`` -> ``Concat`` (1-D empty tensors skipped, as torch does);
``split``/``split_with_sizes``/``chunk`` -> one ``Split`` per piece (a tuple); ``tensor_split`` -> one ``Slice``
per piece (at indices, symbolic ones too) or ``Split``; ``slice`` ->
``Slice`` (nothing for a whole-axis slice; a start counted back from the end by a dynamic size, as
``x[:, -seq:]``, becomes ``size - seq`` where that is a dim); ``unsqueeze`` -> ``Unsqueeze``;
``squeeze`` (``dim``, ``dims``, all) -> ``Squeeze`` of the size-1 axes; ``expand``/``expand_as``/``broadcast_to`` ->
``Expand`` (nothing when the shape is unchanged); ``flip`` -> ``Flip``; ``stack`` -> ``Unsqueeze`` each, ``Concat``; ``unflatten`` -> ``Reshape``;
``repeat_interleave.self_int`` -> ``Unsqueeze``, ``Expand``, ``Reshape``; ``copy`` (a
functional copy: ``src`` in ``self``'s dtype, broadcast to its shape) -> ``Cast``/``Expand``;
``as_strided`` -> ``Reshape`` where its sizes and strides read the input's elements in order, else
(static sizes) ``Gather`` of the flattened input at the positions they read; reading storage the
input does not cover is refused.

Sizes given as ``SymInt`` arrive as :class:`SymDim` and become attributes naming the
dynamic dim (``Slice(ends=("seq",))``, ``Expand(shape=("batch", 1, "seq"))``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import GraphError, ShapeError
from flora_graph.frontend.aten.registry import SymDim, as_dtype, axis_of, dim_of, out_dtype, refuse, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import (
    Dim,
    add_dims,
    canonical_dim,
    dim_product,
    dims_equal,
    divide_dims,
    is_rounded_down,
    one_atom_linear,
    subtract_dims,
)

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten


# --------------------------------------------------------------------------- transposes
@register(aten.t.default)
def _t(ctx, x):
    return x if len(x.shape) < 2 else ctx.emit(Op.TRANSPOSE, [x], {"perm": (1, 0)})


@register(aten.numpy_T.default)
def _numpy_t(ctx, x):
    """``x.T``: every axis reversed."""
    return x if len(x.shape) < 2 else ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(reversed(range(len(x.shape))))})


@register(aten.transpose.int)
def _transpose(ctx, x, d0, d1):
    perm = list(range(len(x.shape)))
    d0, d1 = d0 % len(perm), d1 % len(perm)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(perm)})


@register(aten.permute.default)
def _permute(ctx, x, dims):
    return ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(d % len(x.shape) for d in dims)})


@register(aten.movedim.int)
def _movedim(ctx, x, source, destination):
    """``Transpose`` moving axis ``source`` to ``destination``, the others in order (torch.export keeps it where no
    retrace decomposes it)."""
    rank = len(x.shape)
    src, dst = source % rank, destination % rank
    perm = [d for d in range(rank) if d != src]
    perm.insert(dst, src)
    return ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(perm)})


# --------------------------------------------------------------------------- reshapes
def _reshape_target(ctx: CaptureContext, x: ComputationNode, shape: Sequence[Any]) -> tuple[Dim, ...]:
    """Torch's target sizes as IR Reshape sizes: a dim equal to the input's at that position -> 0 (ONNX's
    copy), another named dim -> its name, a size that is no product of dims (``seq - 1``) -> -1 (one at most)."""
    out: list[Dim] = []
    for i, s in enumerate(shape):
        dim = s.dim if isinstance(s, SymDim) else s
        if isinstance(dim, int):
            out.append(dim)
            continue
        try:
            dim = canonical_dim(dim)
        except ShapeError:
            out.append(-1)
            continue
        out.append(0 if i < len(x.shape) and dim == canonical_dim(x.shape[i]) else dim)
    if out.count(-1) > 1:
        raise GraphError(f"{ctx.where()}: reshape of {x.name} to {list(shape)} has more than one size that cannot be expressed")
    return tuple(out)


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(ctx, x, shape):
    return ctx.emit(Op.RESHAPE, [x], {"shape": _reshape_target(ctx, x, shape)})


@register(aten.view_as.default, aten.reshape_as.default)
def _view_as(ctx, x, other):
    """``x`` in ``other``'s shape (RoFormer's rotary, some attention modules)."""
    return x if tuple(x.shape) == tuple(other.shape) else _view(ctx, x, other.shape)


@register(aten.flatten.using_ints)
def _flatten(ctx, x, start=0, end=-1):
    rank = len(x.shape)
    if rank == 0:
        return ctx.emit(Op.RESHAPE, [x], {"shape": (1,)})
    start, end = start % rank, end % rank
    if start == 1 and end == rank - 1:
        return ctx.emit(Op.FLATTEN, [x], {"axis": 1})
    tail = list(x.shape[end + 1 :])
    if not all(isinstance(d, int) for d in tail):  # named dims after the range (Grounding DINO's [b*heads, q, k]):
        return _view(ctx, x, [*x.shape[:start], dim_product(list(x.shape[start:end + 1])), *tail])  # named sizes
    return ctx.emit(Op.RESHAPE, [x], {"shape": (0,) * start + (-1,) + tuple(tail)})


# --------------------------------------------------------------------------- concat, split
@register(aten.cat.default, aten.concat.default, aten.concatenate.default)
def _cat(ctx, tensors, dim=0):
    """``Concat``; tensors of several dtypes are cast to the one torch promotes them to (SAM's prompt encoder
    joins int32 labels' embeddings with float ones)."""
    kept = [t for t in tensors if tuple(t.shape) != (0,)] or list(tensors)[:1]  # torch skips 1-D empty tensors
    if len({t.dtype for t in kept}) > 1:
        dtype = out_dtype(ctx)
        kept = [as_dtype(ctx, t, dtype) for t in kept]
    return kept[0] if len(kept) == 1 else ctx.emit(Op.CONCAT, kept, {"axis": int(dim)})


@register(aten.split_with_sizes.default)
def _split_with_sizes(ctx, x, sizes, dim=0):
    """``Split`` by static sizes; pieces of which some are named dims (Flux's joint text and image tokens,
    ``cat`` along the sequence and split back by ``[text, image]``) are ``Slice`` ops between their running
    sums, which must add up to the axis' size."""
    if all(isinstance(s, int) for s in sizes):
        sizes = tuple(int(s) for s in sizes)
        return tuple(ctx.emit(Op.SPLIT, [x], {"axis": int(dim), "sizes": sizes, "index": i}) for i in range(len(sizes)))
    axis = axis_of(int(dim), len(x.shape))
    pieces = [dim_of(ctx, s) for s in sizes]
    bounds = [0]
    for piece in pieces:
        bounds.append(add_dims(bounds[-1], piece))
    if not dims_equal(bounds[-1], x.shape[axis]):
        raise refuse(ctx, f"split of {x.name} along an axis of size {x.shape[axis]!r} in pieces {pieces} "
                          f"that add up to {bounds[-1]!r}")
    return tuple(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (bounds[k],), "ends": (bounds[k + 1],),
                                          "steps": (1,)}) for k in range(len(pieces)))


def _equal_pieces(ctx: CaptureContext, x: ComputationNode, piece: Dim, dim: int) -> tuple[ComputationNode, ...]:
    """``x`` cut along a named ``dim`` into pieces of the dim ``piece`` that divides it a static number of times
    (ProphetNet's main and predicted streams, ``(1 + ngram) * seq`` rows cut in ``seq``), each a ``Slice``;
    ``GraphError`` where ``piece`` does not divide it so."""
    axis = axis_of(int(dim), len(x.shape))
    total = x.shape[axis]
    count = divide_dims(total, piece) if piece not in (0, 1) else None
    if not isinstance(count, int) or count < 1:
        raise GraphError(f"{ctx.where()}: split of {x.name} along named dim {total!r} in pieces of {piece!r}")
    bounds = [dim_product([k, piece]) if k else 0 for k in range(count + 1)]
    return tuple(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (bounds[k],), "ends": (bounds[k + 1],),
                                          "steps": (1,)}) for k in range(count))


@register(aten.split.Tensor)
def _split(ctx, x, split_size, dim=0):
    total = x.shape[dim]
    if not isinstance(total, int):
        return _equal_pieces(ctx, x, dim_of(ctx, split_size), dim)
    sizes = [split_size] * (total // split_size) + ([total % split_size] if total % split_size else [])
    return _split_with_sizes(ctx, x, sizes, dim)


@register(aten.chunk.default)
def _chunk(ctx, x, chunks, dim=0):
    total = x.shape[dim]
    if not isinstance(total, int):
        piece = divide_dims(total, int(chunks))
        if piece is None:
            raise GraphError(f"{ctx.where()}: chunk of {x.name} along named dim {total!r} in {chunks} pieces")
        return _equal_pieces(ctx, x, piece, dim)
    return _split(ctx, x, max(1, -(-total // chunks)), dim)  # torch: pieces of ceil(total / chunks)


# --------------------------------------------------------------------------- slice, (un)squeeze, expand
def _slice_bound(ctx: CaptureContext, v: Any, size: Dim) -> Dim:
    """A slice bound as an IR dim; a symbolic negative one (``x[:, -seq:]``) counts from the axis' end,
    ``size - seq``, where that is a dim."""
    if isinstance(v, SymDim) and isinstance(v.dim, str):
        try:
            back = canonical_dim(f"-({v.dim})")  # -(-seq): how far from the end
        except ShapeError:
            back = None
        if back is not None:
            here = subtract_dims(size, back)
            if here is None:
                raise refuse(ctx, f"a slice bound {v.dim!r} that does not fall inside the axis of size {size!r}")
            return here
    return dim_of(ctx, v)


def _kept_from_end(v: Any, size: Dim) -> Dim | None:
    """The count ``e`` a slice start ``max(0, size - e)`` keeps from the end of a static axis of ``size``
    (MPT's ``bias[..., max(0, 64 - seq):]``), as a dim; ``None`` for any other start. ``x[max(0, n - e):]``
    is the last ``min(e, n)`` elements whatever ``e``."""
    if not (isinstance(v, SymDim) and isinstance(v.dim, str) and isinstance(size, int) and v.dim.startswith("Max(")):
        return None
    import sympy

    try:
        expr = sympy.sympify(v.dim, locals={n: sympy.Symbol(n) for n in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", v.dim)
                                            if n != "Max"} | {"Max": sympy.Max})
    except Exception:  # sympify raises what the text's parse raises: not this form
        return None
    if not (isinstance(expr, sympy.Max) and len(expr.args) == 2 and 0 in expr.args):
        return None
    (inner,) = [a for a in expr.args if a != 0]
    try:
        kept = canonical_dim(str(sympy.expand(size - inner)).replace(" ", ""))
    except ShapeError:
        return None
    return kept if isinstance(kept, str) else None


def _counted_back(ctx: CaptureContext, v: Any, size: Dim) -> tuple[int, Dim] | None:
    """``(k, e)`` where the slice start ``v`` (the current node's) is ``k - e``, a constant ``0 < k <= size`` of a
    static axis less a dim ``e`` (Wav2Vec2-Conformer's relative positions, ``pe[:, c - n + 1 : c + n]``); ``None``
    for any other."""
    fx_start = ctx.fx_node.kwargs.get("start", ctx.fx_node.args[2] if len(ctx.fx_node.args) > 2 else None)
    val = fx_start.meta.get("val") if isinstance(fx_start, torch.fx.Node) else None
    if not (isinstance(v, SymDim) and isinstance(val, torch.SymInt) and isinstance(size, int)):
        return None
    expr = ctx.size_expr(val)  # DeBERTa's max_relative_positions - span, the span a size read back as a number
    k = expr.as_coeff_Add()[0]
    if not k.is_Integer or not 0 < int(k) <= size:
        return None
    try:
        back = canonical_dim(ctx.ir_dim(k - expr, val.node.shape_env))
    except ShapeError:
        return None
    return (int(k), back) if isinstance(back, str) else None


def _window_cut(k: int, e: Dim, stop: Dim, size: int) -> tuple[int, Dim, Dim] | None:
    """Where to cut the window ``[k - e, stop)`` of a static axis of ``size`` into two slices whose lengths are
    dims: ``(p, p - (k - e), stop - p)``, ``p`` the window's start at the least size its length ``w`` is not
    negative at (the head then empty; both lengths grow with the size). ``e`` and ``stop`` linear in one atom."""
    le, ls = one_atom_linear(e), one_atom_linear(stop)
    if le is None or ls is None or (le[1] is not None and ls[1] is not None and le[1] != ls[1]):
        return None
    (g, _, d), (h, _, c) = le, ls
    if g < 0 or h < 0 or g + h == 0:
        return None
    least = max(0, -((c + d - k) // (g + h)))  # the least atom at which w = (g + h)*a + c + d - k >= 0
    p = k - d - g * least
    if not 0 <= p <= size or p > h * least + c:
        return None
    try:
        return p, canonical_dim(f"{e}{p - k:+d}") if p != k else e, canonical_dim(f"{stop}{-p:+d}") if p else stop
    except ShapeError:
        return None


def _last(ctx: CaptureContext, x: ComputationNode, axis: int, kept: Dim) -> ComputationNode:
    """The last ``kept`` elements of ``x`` along ``axis``: flip, take the first, flip back."""
    head = ctx.emit(Op.FLIP, [x], {"axes": (axis,)})
    head = ctx.emit(Op.SLICE, [head], {"axes": (axis,), "starts": (0,), "ends": (kept,), "steps": (1,)})
    return ctx.emit(Op.FLIP, [head], {"axes": (axis,)})


@register(aten.slice.Tensor)
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    axis = axis_of(int(dim), len(x.shape))
    to_end = end is None or (isinstance(end, int) and end >= 2**62)
    kept = _kept_from_end(start, x.shape[axis]) if to_end else None
    if kept is not None and int(step) == 1:
        return _last(ctx, x, axis, kept)
    back = _counted_back(ctx, start, x.shape[axis]) if int(step) == 1 else None
    if back is not None:  # x[k - e : end]: the last rows of x[:p], then the first of x[p:]
        k, e = back
        size = x.shape[axis]
        fx_end = ctx.fx_node.kwargs.get("end", ctx.fx_node.args[3] if len(ctx.fx_node.args) > 3 else None)
        val = fx_end.meta.get("val") if isinstance(fx_end, torch.fx.Node) else end
        stop = size if to_end else ctx.ir_dim(val) if isinstance(val, torch.SymInt | int) else None
        cut = _window_cut(k, e, stop, size) if stop is not None else None
        if cut is None:
            raise refuse(ctx, f"a slice from {start.dim!r} to {end!r} of an axis of {size}")
        p, head_len, tail_len = cut
        head = _last(ctx, ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (p,), "steps": (1,)}),
                     axis, head_len)
        tail = ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (p,), "ends": (size,), "steps": (1,)})
        tail = ctx.emit(Op.SLICE, [tail], {"axes": (axis,), "starts": (0,), "ends": (tail_len,), "steps": (1,)})
        return ctx.emit(Op.CONCAT, [head, tail], {"axis": axis})
    start = 0 if start is None else _slice_bound(ctx, start, x.shape[axis])
    end = 2**63 - 1 if end is None else _slice_bound(ctx, end, x.shape[axis])
    if isinstance(x.shape[axis], int) and isinstance(end, int) and end > x.shape[axis]:
        end = x.shape[axis]  # x[..., 8:] of a static dim of 16: end 16, not 2**63 - 1
    # an axis k*(n//k) long cut at n keeps all of it (DAC's 512*(n//512) decoded samples cut back to n)
    whole = (isinstance(end, int) and end >= 2**62) or end == canonical_dim(x.shape[axis]) \
        or is_rounded_down(x.shape[axis], end)
    if start == 0 and step == 1 and whole:
        return x
    return ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (start,), "ends": (end,), "steps": (int(step),)})


@register(aten.narrow.default)
def _narrow(ctx, x, dim, start, length):
    """``x.narrow(dim, start, length)``: ``x[start : start + length]`` along ``dim`` (PE-Audio's rotary tables halved,
    ``cos.narrow(-1, 0, dim // 2)``); a static start, a length static or symbolic where the start is 0."""
    axis = axis_of(int(dim), len(x.shape))
    if not isinstance(start, int):
        raise refuse(ctx, f"narrow from a start {start!r} that is not a constant")
    if isinstance(length, int):
        end: Dim = start + length
    elif start == 0:
        end = dim_of(ctx, length)
    else:
        raise refuse(ctx, f"narrow of a symbolic length {length!r} from {start}")
    if start == 0 and end == canonical_dim(x.shape[axis]):
        return x
    return ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (start,), "ends": (end,), "steps": (1,)})


@register(aten.tensor_split.indices)
def _tensor_split(ctx, x, indices, dim=0):
    """``torch.tensor_split(x, indices, dim)``: the pieces between the indices (a symbolic one too: Bailing's
    ``[seq - kept]``), each a slice."""
    bounds = [0, *indices, None]
    return tuple(_slice(ctx, x, dim, a, b) for a, b in itertools.pairwise(bounds))


@register(aten.tensor_split.sections)
def _tensor_split_sections(ctx, x, sections, dim=0):
    """``torch.tensor_split(x, n, dim)``: ``n`` pieces, the first ``size % n`` one longer."""
    total, n = x.shape[axis_of(int(dim), len(x.shape))], int(sections)
    if not isinstance(total, int):
        raise GraphError(f"{ctx.where()}: tensor_split of {x.name} into {n} along named dim {total!r}")
    sizes = [total // n + (i < total % n) for i in range(n)]
    return _split_with_sizes(ctx, x, sizes, dim) if all(sizes) else tuple(
        _slice(ctx, x, dim, sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(n))


@register(aten.unsqueeze.default)
def _unsqueeze(ctx, x, dim):
    return ctx.emit(Op.UNSQUEEZE, [x], {"axes": (int(dim) % (len(x.shape) + 1),)})


def _squeeze_axes(ctx: CaptureContext, x: ComputationNode, axes: Sequence[int] | None) -> ComputationNode:
    rank = len(x.shape)
    chosen = range(rank) if axes is None else [a % rank for a in axes] if rank else []
    keep = tuple(sorted({a for a in chosen if x.shape[a] == 1}))  # torch leaves a dim that is not 1 alone
    return ctx.emit(Op.SQUEEZE, [x], {"axes": keep}) if keep else x


@register(aten.squeeze.dim)
def _squeeze_dim(ctx, x, dim):
    return _squeeze_axes(ctx, x, [int(dim)])


@register(aten.squeeze.dims)
def _squeeze_dims(ctx, x, dims):
    return _squeeze_axes(ctx, x, [int(d) for d in dims])


@register(aten.squeeze.default)
def _squeeze_all(ctx, x):
    return _squeeze_axes(ctx, x, None)


def _expand_to(ctx: CaptureContext, x: ComputationNode, size: Sequence[Any]) -> ComputationNode:
    lead = len(size) - len(x.shape)
    target: list[Dim] = []
    for i, s in enumerate(size):
        if not isinstance(s, SymDim) and s == -1:
            target.append(x.shape[i - lead])
        else:
            target.append(dim_of(ctx, s))
    if tuple(canonical_dim(d) for d in target) == x.shape:
        return x
    return ctx.emit(Op.EXPAND, [x], {"shape": tuple(target)})


@register(aten.expand.default)
def _expand(ctx, x, size, *, implicit=False):
    return _expand_to(ctx, x, size)


@register(aten.broadcast_to.default)
def _broadcast_to(ctx, x, size):
    """``torch.broadcast_to`` (WavLM's relative position bias), which torch.export keeps as is: ``expand``."""
    return _expand_to(ctx, x, size)


@register(aten.expand_as.default)
def _expand_as(ctx, x, other):
    return _expand_to(ctx, x, other.shape)


@register(aten.meshgrid.default, aten.meshgrid.indexing)
def _meshgrid(ctx, tensors, indexing="ij"):
    """``torch.meshgrid`` (Deformable DETR's reference points): each 1-D input laid along its own axis and expanded to
    the grid; ``indexing="xy"`` swaps the first two axes of the grid, as torch does. A 0-D input counts as one element."""
    if indexing not in ("ij", "xy"):
        raise refuse(ctx, f"meshgrid indexing={indexing!r}")
    if any(len(x.shape) > 1 for x in tensors):
        raise refuse(ctx, "meshgrid of inputs that are not 1-D or 0-D")
    flat = [x if len(x.shape) == 1 else ctx.emit(Op.RESHAPE, [x], {"shape": (1,)}) for x in tensors]
    order = list(range(len(flat)))
    if indexing == "xy" and len(flat) >= 2:
        order[0], order[1] = 1, 0
    grid = [flat[k].shape[0] for k in order]  # axis a of the grid holds input order[a]
    out = []
    for k, x in enumerate(flat):
        axis = order.index(k)
        along = ctx.emit(Op.RESHAPE, [x], {"shape": tuple(-1 if a == axis else 1 for a in range(len(grid)))})
        out.append(_expand_to(ctx, along, [d if isinstance(d, int) else SymDim(d) for d in grid]))
    return tuple(out)


# --------------------------------------------------------------------------- flip, stack, unflatten, repeat_interleave, copy
@register(aten.flip.default)
def _flip(ctx, x, dims):
    axes = tuple(sorted({axis_of(int(d), len(x.shape)) for d in dims})) if x.shape else ()
    return ctx.emit(Op.FLIP, [x], {"axes": axes}) if axes else x


@register(aten.stack.default)
def _stack(ctx, tensors, dim=0):
    axis = int(dim) % (len(tensors[0].shape) + 1)
    parts = [ctx.emit(Op.UNSQUEEZE, [t], {"axes": (axis,)}) for t in tensors]
    return parts[0] if len(parts) == 1 else ctx.emit(Op.CONCAT, parts, {"axis": axis})


@register(aten.unflatten.int)
def _unflatten(ctx, x, dim, sizes):
    axis = axis_of(int(dim), len(x.shape))
    target = [*x.shape[:axis], *sizes, *x.shape[axis + 1 :]]
    return ctx.emit(Op.RESHAPE, [x], {"shape": _reshape_target(ctx, x, target)})


@register(aten.repeat_interleave.self_int)
def _repeat_interleave(ctx, x, repeats, dim=None, *, output_size=None):
    if isinstance(repeats, SymDim):
        raise refuse(ctx, "repeat_interleave by a dynamic count")
    if dim is None:
        x, dim = ctx.emit(Op.RESHAPE, [x], {"shape": (-1,)}), 0
    axis, r = axis_of(int(dim), len(x.shape)), int(repeats)
    if r == 1:
        return x
    wide = ctx.emit(Op.UNSQUEEZE, [x], {"axes": (axis + 1,)})
    wide = ctx.emit(Op.EXPAND, [wide], {"shape": (*x.shape[: axis + 1], r, *x.shape[axis + 1 :])})
    merged = dim_product([x.shape[axis], r])
    return ctx.emit(Op.RESHAPE, [wide], {"shape": (*x.shape[:axis], merged, *x.shape[axis + 1 :])})


@register(aten.copy.default)
def _copy(ctx, x, src, non_blocking=False):
    return _expand_to(ctx, as_dtype(ctx, src, x.dtype), x.shape)


# --------------------------------------------------------------------------- as_strided
def _contiguous_strides(shape: Sequence[Dim]) -> list[Dim]:
    return [canonical_dim(dim_product(list(shape[k + 1:]))) for k in range(len(shape))]


def _is_contiguous(shape: Sequence[Dim], strides: Sequence[Dim]) -> bool:
    """Whether ``strides`` lay ``shape`` out in row-major order (the stride of a size-1 axis is free)."""
    want = _contiguous_strides(shape)
    return all(d == 1 or canonical_dim(s) == w for d, s, w in zip(shape, strides, want, strict=True))


@register(aten.as_strided.default)
def _as_strided(ctx, x, size, stride, storage_offset=None):
    """The view of ``x``'s storage with ``size``, ``stride`` and ``storage_offset``, where that storage is
    ``x``'s own elements (laid out as torch's value of ``x`` says)."""
    src = ctx.fx_node.args[0].meta["val"]
    size, stride = [dim_of(ctx, s) for s in size], [dim_of(ctx, s) for s in stride]
    offset = 0 if storage_offset is None else dim_of(ctx, storage_offset)
    in_stride = [ctx.ir_dim(s) for s in src.stride()]
    in_offset = ctx.ir_dim(src.storage_offset())
    static = all(isinstance(d, int) for d in (*size, *stride, offset, *x.shape, *in_stride, in_offset))
    if not static:
        same_numel = canonical_dim(dim_product(size)) == canonical_dim(dim_product(list(x.shape)))
        if offset == 0 and in_offset == 0 and same_numel and _is_contiguous(x.shape, in_stride) \
                and _is_contiguous(size, stride):
            return ctx.emit(Op.RESHAPE, [x], {"shape": tuple(size)})
        raise refuse(ctx, "as_strided with dynamic sizes that is not a reshape of its contiguous input")
    return _gather_strided(ctx, x, size, stride, offset, in_stride, in_offset)


def _gather_strided(ctx, x, size, stride, offset, in_stride, in_offset):
    """Static ``as_strided``: ``Reshape`` when it reads ``x``'s elements in order, else ``Gather`` of them."""
    def positions(shape, strides, start) -> np.ndarray:
        grid = np.full(shape, start, dtype=np.int64)
        for axis, (n, s) in enumerate(zip(shape, strides, strict=True)):
            grid += (np.arange(n, dtype=np.int64) * s).reshape((-1,) + (1,) * (len(shape) - axis - 1))
        return grid

    held = positions(tuple(x.shape), in_stride, in_offset).ravel()
    wanted = positions(tuple(size), stride, offset)
    lut = np.full(int(max(held.max(initial=0), wanted.max(initial=0))) + 1, -1, dtype=np.int64)
    lut[held] = np.arange(held.size)
    index = lut[wanted]
    if (index < 0).any():
        raise refuse(ctx, "as_strided reading storage outside its input")
    if index.size == held.size and (index.ravel() == np.arange(index.size)).all():
        return ctx.emit(Op.RESHAPE, [x], {"shape": tuple(size)})
    flat = ctx.emit(Op.RESHAPE, [x], {"shape": (-1,)})
    return ctx.emit(Op.GATHER, [flat, ctx.new_param(f"{ctx.fx_node.name}_positions", index)], {"axis": 0})
