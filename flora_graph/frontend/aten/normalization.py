"""ATen converters that emit the normalization family (``Softmax``, ``LayerNorm``, ``RMSNorm``).

``softmax.int``/``_softmax`` -> ``Softmax`` (refused with a dtype change);
``layer_norm`` -> ``LayerNorm`` (a bias without a weight gets a weight of ones);
``rms_norm`` -> ``RMSNorm`` (``eps=None``: the input dtype's machine epsilon, as torch).
"""

from __future__ import annotations

import torch

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend.aten.registry import register
from flora_graph.ir import Op

__all__: list[str] = []

aten = torch.ops.aten


@register(aten.softmax.int, aten._softmax.default)
def _softmax(ctx, x, dim, dtype_or_half=None):
    if isinstance(dtype_or_half, torch.dtype) or dtype_or_half is True:
        raise UnsupportedOpError("softmax with a dtype change is not supported", {"softmax(dtype=...)": [ctx.where()]})
    return ctx.emit(Op.SOFTMAX, [x], {"axis": int(dim)})


@register(aten.layer_norm.default)
def _layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if weight is None and bias is not None:
        weight = ctx.tensor(1.0, like=bias, shape=bias.shape)
    ins = [x] + [t for t in (weight, bias) if t is not None]
    return ctx.emit(Op.LAYER_NORM, ins, {"axis": -len(normalized_shape), "epsilon": float(eps)})


@register(aten.rms_norm.default)
def _rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(getattr(torch, x.dtype)).eps
    ins = [x] if weight is None else [x, weight]
    return ctx.emit(Op.RMS_NORM, ins, {"axis": -len(normalized_shape), "epsilon": float(eps)})
