"""ATen converters that emit the pooling family (``MaxPool2d``, ``AvgPool2d``, ``Resize``).

``max_pool2d`` / ``max_pool2d_with_indices`` (values only; the indices refused when used) ->
``MaxPool2d``; ``avg_pool2d`` -> ``AvgPool2d`` (``ceil_mode`` and ``divisor_override`` refused);
``adaptive_avg_pool2d`` / ``_adaptive_avg_pool2d`` -> ``ReduceMean`` over H, W for a 1x1 output,
else ``AvgPool2d`` when each input size is divisible by its output size (refused otherwise);
``upsample_nearest2d.vec`` / ``upsample_bilinear2d.vec`` -> ``Resize`` (scale factors only when
they give whole output sizes).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flora_graph.frontend.aten.registry import refuse, refuse_used_outputs, register
from flora_graph.ir import Op

__all__: list[str] = []

aten = torch.ops.aten


def _pair(v: Any, default: Any = None) -> tuple[int, int]:
    if v is None or (isinstance(v, list | tuple) and not v):
        v = default
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (int(v[0]), int(v[-1]))


def _spatial(ctx, x) -> tuple[int, int]:
    if len(x.shape) != 4 or not all(isinstance(d, int) for d in x.shape[2:]):
        raise refuse(ctx, "only NCHW input with static H and W is supported")
    return int(x.shape[2]), int(x.shape[3])


def _max_pool(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    if ceil_mode:
        raise refuse(ctx, "ceil_mode=True")
    _spatial(ctx, x)
    kernel = _pair(kernel_size)
    attrs = {"kernel": kernel, "stride": _pair(stride, kernel), "padding": _pair(padding), "dilation": _pair(dilation)}
    return ctx.emit(Op.MAX_POOL2D, [x], attrs)


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
    if ceil_mode:
        raise refuse(ctx, "ceil_mode=True")
    if divisor_override is not None:
        raise refuse(ctx, "divisor_override")
    _spatial(ctx, x)
    kernel = _pair(kernel_size)
    attrs = {"kernel": kernel, "stride": _pair(stride, kernel), "padding": _pair(padding),
             "count_include_pad": int(bool(count_include_pad))}
    return ctx.emit(Op.AVG_POOL2D, [x], attrs)


@register(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool2d(ctx, x, output_size):
    oh, ow = _pair(output_size)
    if len(x.shape) != 4:
        raise refuse(ctx, "only NCHW input is supported")
    if (oh, ow) == (1, 1):
        return ctx.emit(Op.REDUCE_MEAN, [x], {"axes": (2, 3), "keepdims": 1})
    h, w = _spatial(ctx, x)
    if h % oh or w % ow:
        raise refuse(ctx, f"output size {(oh, ow)} that does not divide the input size {(h, w)}")
    kernel = (h // oh, w // ow)
    return ctx.emit(Op.AVG_POOL2D, [x], {"kernel": kernel, "stride": kernel, "padding": (0, 0), "count_include_pad": 1})


def _resize(ctx, x, output_size, scale_factors, mode: str, align_corners: bool):
    h, w = _spatial(ctx, x)
    if output_size is not None:
        size = _pair(output_size)
    else:
        sh, sw = (float(s) for s in _pair_float(scale_factors))
        size = (math.floor(h * sh), math.floor(w * sw))
        if size[0] != h * sh or size[1] != w * sw:
            raise refuse(ctx, "scale factors that do not give whole output sizes")
    return ctx.emit(Op.RESIZE, [x], {"size": size, "mode": mode, "align_corners": int(bool(align_corners))})


def _pair_float(v: Any) -> tuple[float, float]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (float(v[0]), float(v[-1]))


@register(aten.upsample_nearest2d.vec)
def _upsample_nearest2d(ctx, x, output_size, scale_factors):
    return _resize(ctx, x, output_size, scale_factors, "nearest", False)


@register(aten.upsample_bilinear2d.vec)
def _upsample_bilinear2d(ctx, x, output_size, align_corners, scale_factors):
    return _resize(ctx, x, output_size, scale_factors, "linear", align_corners)
