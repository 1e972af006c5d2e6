"""ATen converters that emit the pooling family (``MaxPool2d``, ``AvgPool2d``, ``Resize``, ``GridSample``).

``max_pool2d`` / ``max_pool2d_with_indices`` (values only; the indices refused when used) ->
``MaxPool2d``; ``avg_pool2d`` -> ``AvgPool2d`` (``divisor_override`` refused; ``ceil_mode`` over a dynamic H
or W needs windows that cannot start past the input, and an average that counts its padding is refused in ceil
mode where that gains a window);
``adaptive_avg_pool2d`` / ``_adaptive_avg_pool2d`` and ``adaptive_max_pool2d`` (values only) -> ``ReduceMean`` /
``ReduceMax`` over H, W for a 1x1 output, else ``AvgPool2d`` / ``MaxPool2d`` when each input size is divisible
by its output size, else torch's (maybe overlapping) windows one axis after the other, a ``Slice`` and a
reduction each, ``Concat``-ed (static sizes; likewise the 1-D and 3-D adaptive averages);
``upsample_nearest2d.vec`` / ``upsample_bilinear2d.vec`` / ``_upsample_bilinear2d_aa`` / ``_upsample_bicubic2d_aa``
-> ``Resize`` (scale factors only when they give whole output sizes; antialiased bilinear and bicubic without
``align_corners``);
``upsample_nearest1d.vec`` / ``upsample_linear1d.vec`` -> ``Resize`` of ``[N, C, 1, L]``.

``grid_sampler_2d`` / ``grid_sampler`` (4-D input) -> ``GridSample`` (bilinear, nearest, bicubic;
zeros, border, reflection padding).

3-D pooling is separable, so it is two 2-D poolings: ``max_pool3d`` / ``max_pool3d_with_indices``
(values only), ``avg_pool3d`` and ``adaptive_avg_pool3d`` / ``_adaptive_avg_pool3d`` (1x1x1 or
divisible sizes; other sizes by windows) pool ``[N, C*D, H, W]`` over H and W, then ``[N, C, D, H'*W']`` over D (a
``(kD, 1)`` window), with the same refusals as in 2-D. A max of maxima is the max of the box;
an average of averages is the box's average, since both torch's divisor (the window's size, or
with ``count_include_pad=False`` its unpadded size) and the box are products over the axes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flora_graph.frontend.aten.registry import refuse, refuse_used_outputs, register, size_ints
from flora_graph.ir import Op
from flora_graph.ops.pooling import ceil_adds_counted_window

__all__: list[str] = []

aten = torch.ops.aten


def _pair(v: Any, default: Any = None) -> tuple[int, int]:
    return size_ints(v, 2, default)  # type: ignore[return-value]


def _spatial(ctx, x) -> tuple[int, int]:
    if len(x.shape) != 4 or not all(isinstance(d, int) for d in x.shape[2:]):
        raise refuse(ctx, "only NCHW input with static H and W is supported")
    return int(x.shape[2]), int(x.shape[3])


def _nchw(ctx, x) -> None:
    """A window pooling's input: NCHW, H and W static or dynamic (a dynamic one has a floor-division size)."""
    if len(x.shape) != 4:
        raise refuse(ctx, f"only NCHW input is supported, got rank {len(x.shape)}")


def _ceil(ctx, x, ceil_mode) -> dict[str, int]:
    """The ``ceil_mode`` attribute (over a dynamic H or W, the IR's shape rule takes windows that cannot start past
    the input alone, and refuses the others by name)."""
    return {"ceil_mode": 1} if ceil_mode else {}


def _max_pool(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    _nchw(ctx, x)
    kernel = _pair(kernel_size)
    attrs = {"kernel": kernel, "stride": _pair(stride, kernel), "padding": _pair(padding), "dilation": _pair(dilation)}
    return ctx.emit(Op.MAX_POOL2D, [x], {**attrs, **_ceil(ctx, x, ceil_mode)})


@register(aten.max_pool2d.default)
def _max_pool2d(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return _max_pool(ctx, x, kernel_size, stride, padding, dilation, ceil_mode)


@register(aten.max_pool2d_with_indices.default)
def _max_pool2d_with_indices(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    refuse_used_outputs(ctx, "the indices output", 1)
    return (_max_pool(ctx, x, kernel_size, stride, padding, dilation, ceil_mode), None)


@register(aten.avg_pool2d.default)
def _avg_pool2d(ctx, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    if divisor_override is not None:
        raise refuse(ctx, "divisor_override")
    _nchw(ctx, x)
    kernel = _pair(kernel_size)
    attrs = {"kernel": kernel, "stride": _pair(stride, kernel), "padding": _pair(padding),
             "count_include_pad": int(bool(count_include_pad)), **_ceil(ctx, x, ceil_mode)}
    if ceil_adds_counted_window(x.shape, attrs):
        raise refuse(ctx, "ceil_mode=True with count_include_pad=True and padding, where ceil mode adds a window")
    return ctx.emit(Op.AVG_POOL2D, [x], attrs)


@register(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool2d(ctx, x, output_size):
    return _adaptive2d(ctx, x, output_size, Op.AVG_POOL2D)


@register(aten.adaptive_max_pool2d.default)
def _adaptive_max_pool2d(ctx, x, output_size):
    """Values only (the indices refused when used), as :func:`_adaptive2d` takes them."""
    refuse_used_outputs(ctx, "the indices output", 1)
    return (_adaptive2d(ctx, x, output_size, Op.MAX_POOL2D), None)


def _adaptive2d(ctx, x, output_size, pool: Op):
    """Adaptive average or max pooling over H, W: one reduction for a 1x1 output; a pooling window of ``size //
    out`` where each size divides; otherwise torch's windows (``floor(i * size / out)`` to ``ceil((i + 1) * size /
    out)``, which may overlap) one axis after the other (:func:`_adaptive_windows`), static sizes only."""
    oh, ow = _pair(output_size)
    if len(x.shape) != 4:
        raise refuse(ctx, "only NCHW input is supported")
    reduce = Op.REDUCE_MEAN if pool is Op.AVG_POOL2D else Op.REDUCE_MAX
    if (oh, ow) == (1, 1):
        return ctx.emit(reduce, [x], {"axes": (2, 3), "keepdims": 1})
    h, w = _spatial(ctx, x)
    if h % oh or w % ow:
        return _adaptive_windows(ctx, _adaptive_windows(ctx, x, 2, oh, reduce), 3, ow, reduce)
    kernel = (h // oh, w // ow)
    attrs = {"kernel": kernel, "stride": kernel, "padding": (0, 0)}
    if pool is Op.AVG_POOL2D:
        attrs["count_include_pad"] = 1
    else:
        attrs["dilation"] = (1, 1)
    return ctx.emit(pool, [x], attrs)


def _adaptive_windows(ctx, x, axis: int, out: int, reduce: Op):
    """Adaptive pooling along one static ``axis`` of ``x``: output ``i`` reduces (``ReduceMean``/``ReduceMax``) the
    ``Slice`` from ``floor(i * size / out)`` to ``ceil((i + 1) * size / out)``; the ``out`` results ``Concat``-ed.
    Separable: a box's mean is the mean of its rows' means (equal-sized rows), its max the max of theirs."""
    size = x.shape[axis]
    if not isinstance(size, int):
        raise refuse(ctx, f"adaptive pooling of a dynamic axis of size {size!r} to {out}")
    if size == out:
        return x
    parts = [ctx.emit(reduce, [ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (i * size // out,),
                                                         "ends": (-(-(i + 1) * size // out),), "steps": (1,)})],
                      {"axes": (axis,), "keepdims": 1}) for i in range(out)]
    return parts[0] if out == 1 else ctx.emit(Op.CONCAT, parts, {"axis": axis})


def _resize(ctx, x, output_size, scale_factors, mode: str, align_corners: bool, antialias: bool = False):
    h, w = _spatial(ctx, x)
    if output_size is not None:
        size = _pair(output_size)
    else:
        sh, sw = (float(s) for s in _pair_float(scale_factors))
        size = (math.floor(h * sh), math.floor(w * sw))
        if size[0] != h * sh or size[1] != w * sw:
            raise refuse(ctx, "scale factors that do not give whole output sizes")
    attrs = {"size": size, "mode": mode, "align_corners": int(bool(align_corners))}
    return ctx.emit(Op.RESIZE, [x], {**attrs, "antialias": 1} if antialias else attrs)


def _pair_float(v: Any) -> tuple[float, float]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (float(v[0]), float(v[-1]))


@register(aten.upsample_nearest2d.vec)
def _upsample_nearest2d(ctx, x, output_size, scale_factors):
    return _resize(ctx, x, output_size, scale_factors, "nearest", False)


@register(aten.upsample_bilinear2d.vec)
def _upsample_bilinear2d(ctx, x, output_size, align_corners, scale_factors):
    return _resize(ctx, x, output_size, scale_factors, "linear", align_corners)


_ANTIALIASED = {aten._upsample_bilinear2d_aa.default: "linear", aten._upsample_bilinear2d_aa.vec: "linear",
                aten._upsample_bicubic2d_aa.default: "cubic", aten._upsample_bicubic2d_aa.vec: "cubic"}
"""The antialiased resizes -> their ``Resize`` mode (torch's plain bicubic decomposes before capture)."""


@register(*_ANTIALIASED)
def _upsample_antialiased(ctx, x, output_size, align_corners, *scales):
    """``F.interpolate(mode="bilinear" or "bicubic", antialias=True)`` (a vision tower's resize of its position table,
    DINOv2 with registers') -> ``Resize`` with ``antialias`` (without ``align_corners``): to ``output_size`` where
    given (``.default`` always gives it; its ``scales_h``, ``scales_w`` only restate it), else by ``.vec``'s scale
    factors."""
    mode = _ANTIALIASED[ctx.fx_node.target]
    if align_corners:
        raise refuse(ctx, f"antialiased {'bilinear' if mode == 'linear' else 'bicubic'} resizing with align_corners=True")
    vec = ctx.fx_node.target in (aten._upsample_bilinear2d_aa.vec, aten._upsample_bicubic2d_aa.vec)
    factors = scales[0] if vec else None
    return _resize(ctx, x, output_size, factors, mode, False, antialias=True)


@register(aten.upsample_linear1d.vec, aten.upsample_nearest1d.vec)
def _upsample_1d(ctx, x, output_size, *rest):
    """``[N, C, L]`` (or ``[C, L]``) as ``[N, C, 1, L]`` through the 2-D ``Resize`` (SAM's relative-position tables
    resized to its feature map's span)."""
    linear = ctx.fx_node.target is aten.upsample_linear1d.vec
    align_corners, scale_factors = (rest[0], rest[1]) if linear else (False, rest[0])
    size = None if output_size is None else (1, *size_ints(output_size, 1))
    scales = None if scale_factors is None else (1.0, float(next(iter(scale_factors))))
    return _as_2d(ctx, x, lambda plane: _resize(ctx, plane, size, scales, "linear" if linear else "nearest",
                                                 align_corners))


# --------------------------------------------------------------------------- 3-D pooling: two 2-D poolings
def _pool3d(ctx, x, op: Op, kernel, stride, padding, **attrs):
    """``op`` (``MaxPool2d``/``AvgPool2d``) over D, H, W of ``x`` [N, C, D, H, W] (or [C, D, H, W]): over
    H, W of ``[N, C*D, H, W]``, then over D of ``[N, C, D, H'*W']``; ``attrs`` per axis (``dilation``) or one
    value (``count_include_pad``)."""
    if len(x.shape) not in (4, 5) or not all(isinstance(d, int) for d in x.shape[-3:]):
        raise refuse(ctx, "only [N, C, D, H, W] or [C, D, H, W] input with static D, H and W is supported")
    batched = len(x.shape) == 5
    if not batched:
        x = ctx.emit(Op.UNSQUEEZE, [x], {"axes": (0,)})
    c, d, h, w = x.shape[1:]
    per_axis = {k: v for k, v in attrs.items() if isinstance(v, tuple)}
    shared = {k: v for k, v in attrs.items() if not isinstance(v, tuple)}
    planes = ctx.emit(Op.RESHAPE, [x], {"shape": (0, -1, h, w)})
    hw = ctx.emit(op, [planes], {"kernel": kernel[1:], "stride": stride[1:], "padding": padding[1:], **shared,
                                 **{k: v[1:] for k, v in per_axis.items()}})
    ho, wo = hw.shape[2:]
    depth = ctx.emit(Op.RESHAPE, [hw], {"shape": (0, c, d, ho * wo)})
    dd = ctx.emit(op, [depth], {"kernel": (kernel[0], 1), "stride": (stride[0], 1), "padding": (padding[0], 0),
                                **shared, **{k: (v[0], 1) for k, v in per_axis.items()}})
    out = ctx.emit(Op.RESHAPE, [dd], {"shape": (0, 0, dd.shape[2], ho, wo)})
    return out if batched else ctx.emit(Op.SQUEEZE, [out], {"axes": (0,)})


def _max_pool3d_values(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    if ceil_mode:
        raise refuse(ctx, "ceil_mode=True")
    kernel = size_ints(kernel_size, 3)
    return _pool3d(ctx, x, Op.MAX_POOL2D, kernel, size_ints(stride, 3, kernel), size_ints(padding, 3),
                   dilation=size_ints(dilation, 3))


@register(aten.max_pool3d.default)
def _max_pool3d(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return _max_pool3d_values(ctx, x, kernel_size, stride, padding, dilation, ceil_mode)


@register(aten.max_pool3d_with_indices.default)
def _max_pool3d_with_indices(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    refuse_used_outputs(ctx, "the indices output", 1)
    return (_max_pool3d_values(ctx, x, kernel_size, stride, padding, dilation, ceil_mode), None)


@register(aten.avg_pool3d.default)
def _avg_pool3d(ctx, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    if ceil_mode:
        raise refuse(ctx, "ceil_mode=True")
    if divisor_override is not None:
        raise refuse(ctx, "divisor_override")
    kernel = size_ints(kernel_size, 3)
    return _pool3d(ctx, x, Op.AVG_POOL2D, kernel, size_ints(stride, 3, kernel), size_ints(padding, 3),
                   count_include_pad=int(bool(count_include_pad)))


@register(aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool3d.default)
def _adaptive_avg_pool3d(ctx, x, output_size):
    out = size_ints(output_size, 3)
    rank = len(x.shape)
    if rank not in (4, 5):
        raise refuse(ctx, "only [N, C, D, H, W] or [C, D, H, W] input is supported")
    if out == (1, 1, 1):
        return ctx.emit(Op.REDUCE_MEAN, [x], {"axes": (rank - 3, rank - 2, rank - 1), "keepdims": 1})
    sizes = x.shape[-3:]
    if not all(isinstance(s, int) for s in sizes):
        raise refuse(ctx, f"output size {out} of a dynamic input size {tuple(sizes)}")
    if any(s % o for s, o in zip(sizes, out, strict=True)):
        for axis, o in zip(range(rank - 3, rank), out, strict=True):
            x = _adaptive_windows(ctx, x, axis, o, Op.REDUCE_MEAN)
        return x
    kernel = tuple(s // o for s, o in zip(sizes, out, strict=True))
    return _pool3d(ctx, x, Op.AVG_POOL2D, kernel, kernel, (0, 0, 0), count_include_pad=1)


@register(aten.avg_pool1d.default)
def _avg_pool1d(ctx, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True):
    """``[N, C, L]`` (or ``[C, L]``) as ``[N, C, 1, L]`` through the 2-D average pooling."""
    if ceil_mode:
        raise refuse(ctx, "ceil_mode=True")
    kernel = size_ints(kernel_size, 1)
    attrs = {"kernel": (1, kernel[0]), "stride": (1, size_ints(stride, 1, kernel)[0]), "padding": (0, size_ints(padding, 1)[0]),
             "count_include_pad": int(bool(count_include_pad))}
    return _as_2d(ctx, x, lambda plane: ctx.emit(Op.AVG_POOL2D, [plane], attrs))


@register(aten.adaptive_avg_pool1d.default)
def _adaptive_avg_pool1d(ctx, x, output_size):
    (out,) = size_ints(output_size, 1)
    if out == 1:
        return ctx.emit(Op.REDUCE_MEAN, [x], {"axes": (len(x.shape) - 1,), "keepdims": 1})
    length = x.shape[-1]
    if not isinstance(length, int):
        raise refuse(ctx, f"output size {out} of a dynamic input length {length!r}")
    if length % out:
        return _adaptive_windows(ctx, x, len(x.shape) - 1, out, Op.REDUCE_MEAN)
    k = length // out
    attrs = {"kernel": (1, k), "stride": (1, k), "padding": (0, 0), "count_include_pad": 1}
    return _as_2d(ctx, x, lambda plane: ctx.emit(Op.AVG_POOL2D, [plane], attrs))


def _as_2d(ctx, x, pool):
    """``pool`` over ``x`` [N, C, L] or [C, L] seen as [N, C, 1, L]; the result back in ``x``'s rank."""
    if len(x.shape) not in (2, 3):
        raise refuse(ctx, "only [N, C, L] or [C, L] input is supported")
    axes = (2,) if len(x.shape) == 3 else (0, 2)
    return ctx.emit(Op.SQUEEZE, [pool(ctx.emit(Op.UNSQUEEZE, [x], {"axes": axes}))], {"axes": axes})


# --------------------------------------------------------------------------- grid sampling
_GRID_MODES = {0: "linear", 1: "nearest", 2: "cubic"}  # torch's interpolation_mode codes
_GRID_PADDING = {0: "zeros", 1: "border", 2: "reflection"}  # torch's padding_mode codes


@register(aten.grid_sampler_2d.default, aten.grid_sampler.default)
def _grid_sampler(ctx, x, grid, interpolation_mode, padding_mode, align_corners):
    if len(x.shape) != 4:
        raise refuse(ctx, "grid sampling of a 5-D input (grid_sampler_3d)")
    if interpolation_mode not in _GRID_MODES or padding_mode not in _GRID_PADDING:
        raise refuse(ctx, f"grid sampling with mode {interpolation_mode} and padding {padding_mode}")
    return ctx.emit(Op.GRID_SAMPLE, [x, grid], {"mode": _GRID_MODES[interpolation_mode],
                                               "padding_mode": _GRID_PADDING[padding_mode],
                                               "align_corners": int(bool(align_corners))})
