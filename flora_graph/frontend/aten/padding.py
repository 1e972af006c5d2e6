"""ATen converters that emit the padding family (``Pad``, ``Tile``).

``constant_pad_nd`` and ``pad`` (``constant``, ``reflect``, ``replicate``) ->
``Pad`` (a negative pad crops first, by a ``Slice``; a constant pad by a dynamic size that no bound holds, as the
cached length, is the value expanded to that size and ``Concat``-ed on), ``pad`` (``circular``) -> ``Slice``\\ s of each axis' two
ends ``Concat``-ed around it; ``reflection_pad1d/2d/3d`` -> ``Pad``
(``reflect``); ``replication_pad1d/2d/3d`` -> ``Pad`` (``edge``); ``repeat`` -> ``Tile``
(after an ``Unsqueeze`` when the repeats add leading axes). torch pads are pairs (begin,
end) from the last axis back; the IR's are ONNX's (every begin, then every end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flora_graph.errors import ShapeError
from flora_graph.frontend.aten.registry import SymDim, chunk_samples, dim_of, refuse, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim, canonical_dim, difference_range, dim_product, dim_terms, is_dim_name
from flora_graph.ops.movement import SLICE_END

__all__: list[str] = []

aten = torch.ops.aten

_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def _round_up(ctx: Any, pad: Any, axis: int) -> int | None:
    """``m`` where the dynamic pad ``pad`` (the current node's argument) brings the axis up to the next multiple of
    ``m`` (``(m - d % m) % m`` of its size ``d``: the chunked scans of Mamba-2 and gated delta rules), else ``None``;
    checked on a few of the size's values (:func:`~.registry.chunk_samples`), not by spelling."""
    import sympy

    fx_pad = next((a for a in ctx.fx_node.args[1] if isinstance(a, torch.fx.Node)), None) \
        if isinstance(ctx.fx_node.args[1], list | tuple) else None
    size = ctx.fx_node.args[0].meta["val"].shape[axis]
    if fx_pad is None or not isinstance(size, torch.SymInt) or not isinstance(fx_pad.meta.get("val"), torch.SymInt):
        return None
    p, d = fx_pad.meta["val"].node.expr, size.node.expr
    if len(d.free_symbols) != 1 or p.free_symbols != d.free_symbols:
        return None
    (sym,) = d.free_symbols
    for m in sorted({int(abs(a)) for a in p.atoms(sympy.Integer) if abs(a) > 1}):
        try:
            if all(int(p.subs(sym, v)) == (-int(d.subs(sym, v))) % m for v in chunk_samples(m)):
                return m
        except (TypeError, ValueError):
            return None
    return None


def _pad(ctx: Any, x: ComputationNode, pad: Sequence[Any], mode: str, value: float = 0.0) -> ComputationNode:
    """``x`` padded by torch's ``pad`` pairs; negative pads crop (constant mode only). One dynamic pad at the end of
    an axis is taken where it is bounded: where it ends the axis at the next multiple of a chunk size
    (:func:`_round_up`), a static pad of ``m - 1``, then a ``Slice`` to ``m * ((d + m - 1) // m)``; where the padded
    size torch computes less the axis' repeats with the size (:func:`~flora_graph.ir.shapes.difference_range`:
    PegasusX's ``m - d % m`` up to ``m``, SEW's ``n - 2*(n//2)`` up to 1), a static pad of its largest value, then
    a ``Slice`` to that padded size; where the padded size is static (PegasusX's block of ``m`` where the axis is at
    most ``m``: ``m - d``), a pad of that size, then the ``Slice`` to it."""
    dynamic = [i for i, p in enumerate(pad) if isinstance(p, SymDim)]
    if dynamic:
        axis = len(x.shape) - 1 - dynamic[0] // 2
        one_end = len(dynamic) == 1 and dynamic[0] % 2 and mode == "constant"
        m = _round_up(ctx, pad[dynamic[0]], axis) if one_end else None
        d = x.shape[axis]
        padded = ctx.ir_dim(ctx.fx_node.meta["val"].shape[axis])  # m itself where the dim's range spans one chunk
        if m is not None:
            if not isinstance(padded, int):
                padded = canonical_dim(f"{m}*(({d}+{m - 1})//{m})")
            most = m - 1
        elif one_end and isinstance(padded, int):  # a static size the axis is padded up to (PegasusX's block, where
            most = padded  # the axis' bound is below it): any pad up to it, then the Slice
        else:
            try:
                span = difference_range(canonical_dim(padded), d) if one_end else None
            except ShapeError:  # no dim: a size torch computes that the IR cannot write
                span = None
            if span is None or span[0] < 0:
                if mode == "constant":  # a size of its own (GIT's block ids padded by the cached length)
                    return _fill_pad(ctx, x, pad, value)
                raise refuse(ctx, "padding by a dynamic size")
            most = span[1]
        x = _pad(ctx, x, [most if isinstance(p, SymDim) else p for p in pad], mode, value)
        return ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (padded,), "steps": (1,)})
    rank, pad = len(x.shape), [int(p) for p in pad]
    if len(pad) % 2 or len(pad) > 2 * rank:
        raise refuse(ctx, f"padding {pad} of a tensor of rank {rank}")
    begins, ends = [0] * rank, [0] * rank
    crop: list[tuple[int, int, int]] = []
    for i in range(len(pad) // 2):
        axis, b, e = rank - 1 - i, pad[2 * i], pad[2 * i + 1]
        if (b < 0 or e < 0) and mode != "constant":
            raise refuse(ctx, f"negative {mode} padding {pad}")
        if b < 0 or e < 0:
            crop.append((axis, max(-b, 0), e if e < 0 else 2**63 - 1))
        begins[axis], ends[axis] = max(b, 0), max(e, 0)
    if crop:
        axes, starts, stops = zip(*sorted(crop), strict=True)
        x = ctx.emit(Op.SLICE, [x], {"axes": axes, "starts": starts, "ends": stops, "steps": (1,) * len(axes)})
    if not any(begins) and not any(ends):
        return x
    return ctx.emit(Op.PAD, [x], {"pads": (*begins, *ends), "mode": _MODES[mode], "value": float(value)})


def _fill_pad(ctx: Any, x: ComputationNode, pad: Sequence[Any], value: float) -> ComputationNode:
    """``x`` padded with ``value`` where a pad is a dim of its own (unbounded: the cached length ``past_seq``): the
    static pads first, then each dynamic one as ``value`` expanded to the axis' other sizes and that dim,
    ``Concat``-ed on its side. A dynamic pad must be a sum of dims with nonnegative coefficients, a size that no
    input makes negative (torch crops on a negative pad, which a fill cannot)."""
    x = _pad(ctx, x, [0 if isinstance(p, SymDim) else p for p in pad], "constant", value)
    fill = ctx.new_param(f"{ctx.fx_node.name}_fill", np.asarray(value, dtype=x.dtype))
    for i, p in enumerate(pad):
        if not isinstance(p, SymDim):
            continue
        try:
            size = canonical_dim(p.dim)
            terms = dim_terms(size)
        except ShapeError:  # a negative term, which the IR writes no dim of
            terms = [(-1, ())]
        if any(c < 0 or any(not is_dim_name(n) for n in names) for c, names in terms):
            raise refuse(ctx, f"padding by {p.dim!r}, a dynamic size that may be negative")
        axis = len(x.shape) - 1 - i // 2
        block = ctx.emit(Op.EXPAND, [fill], {"shape": tuple(size if a == axis else d for a, d in enumerate(x.shape))})
        x = ctx.emit(Op.CONCAT, [block, x] if i % 2 == 0 else [x, block], {"axis": axis})
    return x


@register(aten.constant_pad_nd.default)
def _constant_pad_nd(ctx, x, pad, value=0):
    return _pad(ctx, x, pad, "constant", value)


@register(aten.pad.default)
def _pad_any(ctx, x, pad, mode="constant", value=None):
    if mode == "circular":
        return _circular(ctx, x, pad)
    if mode not in _MODES:
        raise refuse(ctx, f"{mode} padding")
    return _pad(ctx, x, pad, mode, 0.0 if value is None else value)


def _circular(ctx: Any, x: ComputationNode, pad: Sequence[Any]) -> ComputationNode:
    """Circular padding (a convolution's ``padding_mode="circular"``): each padded axis wraps around, the last
    ``begin`` elements ``Concat``-ed before it and the first ``end`` after it (``Slice``\\ s; any axis size)."""
    if any(not isinstance(p, int) or p < 0 for p in pad) or len(pad) % 2 or len(pad) > 2 * len(x.shape):
        raise refuse(ctx, f"circular padding {list(pad)} (static, nonnegative pads of at most every axis)")
    for i in range(len(pad) // 2):
        axis, b, e = len(x.shape) - 1 - i, int(pad[2 * i]), int(pad[2 * i + 1])
        parts = [ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (-b,), "ends": (SLICE_END,), "steps": (1,)})
                 ] if b else []
        parts.append(x)
        if e:
            parts.append(ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (e,), "steps": (1,)}))
        if len(parts) > 1:
            x = ctx.emit(Op.CONCAT, parts, {"axis": axis})
    return x


@register(aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default)
def _reflection_pad(ctx, x, padding):
    return _pad(ctx, x, padding, "reflect")


@register(aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default)
def _replication_pad(ctx, x, padding):
    return _pad(ctx, x, padding, "replicate")


@register(aten.repeat.default)
def _repeat(ctx, x, repeats):
    extra = len(repeats) - len(x.shape)
    if extra < 0:
        raise refuse(ctx, f"repeat {list(repeats)} of fewer axes than the tensor's {len(x.shape)}")
    if extra:
        x = ctx.emit(Op.UNSQUEEZE, [x], {"axes": tuple(range(extra))})
    counts = [dim_of(ctx, r) for r in repeats]
    if any(isinstance(c, str) for c in counts):  # DeBERTa-v2: relative embeddings repeated once per batch row
        return _repeat_dynamic(ctx, x, counts)
    if all(c == 1 for c in counts):
        return x
    return ctx.emit(Op.TILE, [x], {"repeats": tuple(counts)})


def _repeat_dynamic(ctx: Any, x: ComputationNode, counts: Sequence[Dim]) -> ComputationNode:
    """``repeat`` with a dynamic count: tiling axis ``i`` (size ``n``) ``c`` times is a new axis of
    size ``c`` in front of it, broadcast (``Expand``), folded into it (``Reshape`` to ``c * n``);
    the static counts stay one ``Tile``."""
    static = tuple(c if isinstance(c, int) else 1 for c in counts)
    if any(c != 1 for c in static):
        x = ctx.emit(Op.TILE, [x], {"repeats": static})
    shape = tuple(x.shape)
    dynamic = [i for i, c in enumerate(counts) if isinstance(c, str)]
    wide = ctx.emit(Op.UNSQUEEZE, [x], {"axes": tuple(i + k for k, i in enumerate(dynamic))})
    spread: list[Dim] = []
    for i, d in enumerate(shape):
        if i in dynamic:
            spread.append(counts[i])
        spread.append(d)
    wide = ctx.emit(Op.EXPAND, [wide], {"shape": tuple(spread)})
    folded = tuple(dim_product([counts[i], d]) if i in dynamic else d for i, d in enumerate(shape))
    return ctx.emit(Op.RESHAPE, [wide], {"shape": folded})
