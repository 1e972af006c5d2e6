"""ATen converters that emit the linear family (``Linear``, ``MatMul``, ``Conv2d``).

``linear`` -> ``Linear``; ``matmul``/``mm``/``bmm`` -> ``MatMul``; ``addmm`` (GPT-2's
``Conv1D``) -> ``MatMul`` plus ``Mul``/``Add`` for ``alpha``, ``beta`` and the bias;
``conv2d`` (both overloads, ``padding="same"``/``"valid"`` included) and 2-D
non-transposed ``convolution`` -> ``Conv2d``. The capture-time LoRA Linear op
(``flora_graph::lora_linear``) has its converter in :mod:`flora_graph.frontend.lora_op`.
"""

from __future__ import annotations

from typing import Any

import torch

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend.aten.registry import as_dtype, register
from flora_graph.ir import Op

__all__: list[str] = []

aten = torch.ops.aten


@register(aten.linear.default)
def _linear(ctx, x, w, b=None):
    return ctx.emit(Op.LINEAR, [x, w] + ([b] if b is not None else []))


@register(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ctx, a, b):
    return ctx.emit(Op.MATMUL, [a, b])


@register(aten.addmm.default)
def _addmm(ctx, bias, a, b, *, beta=1, alpha=1):
    """``beta * bias + alpha * (a @ b)`` (GPT-2's ``Conv1D``)."""
    y = ctx.emit(Op.MATMUL, [a, b])
    if alpha != 1:
        y = ctx.emit(Op.MUL, [y, as_dtype(ctx, alpha, y.dtype)])
    if beta == 0:
        return y
    if beta != 1:
        bias = ctx.emit(Op.MUL, [bias, as_dtype(ctx, beta, bias.dtype)])
    return ctx.emit(Op.ADD, [y, bias])


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (int(v[0]), int(v[-1]))


@register(aten.conv2d.default, aten.conv2d.padding)
def _conv2d(ctx, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same" with stride 1
            total = [d * (k - 1) for d, k in zip(_pair(dilation), w.shape[2:], strict=True)]
            if any(t % 2 for t in total):
                raise UnsupportedOpError("asymmetric 'same' padding", {"aten.conv2d.padding": [ctx.where()]})
            padding = [t // 2 for t in total]
    attrs = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation), "groups": int(groups)}
    return ctx.emit(Op.CONV2D, [x, w] + ([b] if b is not None else []), attrs)


@register(aten.convolution.default)
def _convolution(ctx, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed or len(w.shape) != 4:
        raise UnsupportedOpError("only 2-D, non-transposed convolutions are supported", {"aten.convolution.default": [ctx.where()]})
    return _conv2d(ctx, x, w, b, stride, padding, dilation, groups)
