"""ATen converters that emit the normalization family (``Softmax``, ``LayerNorm``, ``RMSNorm``).

``softmax.int``/``_softmax`` -> ``Softmax`` and ``log_softmax.int``/``_log_softmax`` ->
``LogSoftmax`` (a ``dtype`` or ``half_to_float`` casts the input first, as torch);
``native_layer_norm`` -> ``LayerNorm`` (mean/rstd refused when used);
``batch_norm`` (eval) / ``_native_batch_norm_legit_no_training`` -> ``BatchNorm``;
``group_norm`` / ``native_group_norm`` -> ``GroupNorm``;
``layer_norm`` -> ``LayerNorm`` (a bias without a weight gets a weight of ones);
``rms_norm`` -> ``RMSNorm`` (``eps=None``: the input dtype's machine epsilon, as torch).
"""

from __future__ import annotations

import torch

from flora_graph.frontend.aten.registry import as_dtype, refuse, refuse_used_outputs, register
from flora_graph.ir import Op

__all__: list[str] = []

aten = torch.ops.aten


def _softmax_input(ctx, x, dtype_or_half):
    """``x`` in the dtype the softmax computes in: ``dtype`` (``softmax.int``), float32 for
    ``half_to_float=True`` (``_softmax``), else its own."""
    if isinstance(dtype_or_half, torch.dtype):
        return as_dtype(ctx, x, str(dtype_or_half).removeprefix("torch."))
    if dtype_or_half is True:
        return as_dtype(ctx, x, "float32")
    return x


@register(aten.softmax.int, aten._softmax.default)
def _softmax(ctx, x, dim, dtype_or_half=None):
    return ctx.emit(Op.SOFTMAX, [_softmax_input(ctx, x, dtype_or_half)], {"axis": int(dim)})


@register(aten.log_softmax.int, aten._log_softmax.default)
def _log_softmax(ctx, x, dim, dtype_or_half=None):
    return ctx.emit(Op.LOG_SOFTMAX, [_softmax_input(ctx, x, dtype_or_half)], {"axis": int(dim)})


@register(aten.native_layer_norm.default)
def _native_layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    refuse_used_outputs(ctx, "the mean/rstd outputs", 1, 2)
    return (_layer_norm(ctx, x, normalized_shape, weight, bias, eps), None, None)


def _batch_norm_node(ctx, x, weight, bias, mean, var, eps):
    if mean is None or var is None:
        raise refuse(ctx, "batch norm without running statistics")
    c = x.shape[1]
    weight = ctx.tensor(1.0, like=mean, shape=(c,)) if weight is None else weight
    bias = ctx.tensor(0.0, like=mean, shape=(c,)) if bias is None else bias
    return ctx.emit(Op.BATCH_NORM, [x, weight, bias, mean, var], {"epsilon": float(eps)})


@register(aten._native_batch_norm_legit_no_training.default)
def _batch_norm_no_training(ctx, x, weight, bias, mean, var, momentum, eps):
    refuse_used_outputs(ctx, "the saved mean/rstd outputs", 1, 2)
    return (_batch_norm_node(ctx, x, weight, bias, mean, var, eps), None, None)


@register(aten.batch_norm.default)
def _batch_norm(ctx, x, weight, bias, mean, var, training, momentum, eps, cudnn_enabled=True):
    if training:
        raise refuse(ctx, "batch norm in training mode; call model.eval()")
    return _batch_norm_node(ctx, x, weight, bias, mean, var, eps)


@register(aten.native_group_norm.default)
def _native_group_norm(ctx, x, weight, bias, n, c, hw, group, eps):
    refuse_used_outputs(ctx, "the mean/rstd outputs", 1, 2)
    return (_group_norm_node(ctx, x, group, weight, bias, eps), None, None)


@register(aten.group_norm.default)
def _group_norm(ctx, x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return _group_norm_node(ctx, x, num_groups, weight, bias, eps)


def _group_norm_node(ctx, x, groups, weight, bias, eps):
    if weight is None and bias is not None:
        weight = ctx.tensor(1.0, like=bias, shape=bias.shape)
    ins = [x] + [t for t in (weight, bias) if t is not None]
    return ctx.emit(Op.GROUP_NORM, ins, {"groups": int(groups), "epsilon": float(eps)})


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
