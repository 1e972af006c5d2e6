"""ATen converters that emit the normalization family (``Softmax``, ``LayerNorm``, ``RMSNorm``).

``softmax.int``/``_softmax`` -> ``Softmax`` and ``log_softmax.int``/``_log_softmax`` ->
``LogSoftmax`` (a ``dtype`` or ``half_to_float`` casts the input first, as torch);
``native_layer_norm`` -> ``LayerNorm`` (mean/rstd refused when used);
``batch_norm`` (eval; in training only without running statistics, then as ``no_stats``) /
``_native_batch_norm_legit_no_training`` / ``_native_batch_norm_legit``
(``training=False``) -> ``BatchNorm``; ``_native_batch_norm_legit.no_stats`` (batch statistics) ->
``BatchNorm`` over the batch's ``ReduceMean`` / ``ReduceVar`` (the saved mean and rstd as outputs);
``_native_batch_norm_legit_functional`` (what functionalization makes of it) -> the same, plus the
running statistics moved by ``momentum`` (training) or passed through (eval);
``group_norm`` / ``native_group_norm`` -> ``GroupNorm``; ``instance_norm`` -> ``GroupNorm`` with one
group per channel (or ``BatchNorm`` with its running statistics, ``use_input_stats=False``);
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


@register(aten._native_batch_norm_legit.default)
def _batch_norm_legit(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Eval mode: ``BatchNorm`` with the running statistics (graphs that are not functionalized)."""
    if training:
        raise refuse(ctx, "batch norm in training mode (it updates the running statistics in place); call model.eval()")
    refuse_used_outputs(ctx, "the saved mean/rstd outputs", 1, 2)
    return (_batch_norm_node(ctx, x, weight, bias, running_mean, running_var, eps), None, None)


def _batch_axes(ctx, x) -> tuple[int, ...]:
    """The axes batch statistics reduce: every axis of ``x`` [N, C, ...] but 1 (C static)."""
    if len(x.shape) < 2 or not isinstance(x.shape[1], int):
        raise refuse(ctx, "batch norm needs x [N, C, ...] with a static C")
    return (0, *range(2, len(x.shape)))


def _batch_stats(ctx, x, weight, bias, eps):
    """``x`` normalised by the batch's own mean and biased variance: ``(y, mean, rstd)``, each statistic ``[C]``."""
    axes = _batch_axes(ctx, x)
    mean = ctx.emit(Op.REDUCE_MEAN, [x], {"axes": axes, "keepdims": 0})
    var = ctx.emit(Op.REDUCE_VAR, [x], {"axes": axes, "keepdims": 0, "correction": 0.0})
    rstd = ctx.emit(Op.RSQRT, [ctx.emit(Op.ADD, [var, ctx.scalar(float(eps), var.dtype)])])
    return _batch_norm_node(ctx, x, weight, bias, mean, var, eps), mean, rstd


@register(aten._native_batch_norm_legit.no_stats)
def _batch_norm_no_stats(ctx, x, weight, bias, training, momentum, eps):
    """``(y, mean, rstd)`` from the batch's own statistics (``F.batch_norm`` without running ones)."""
    if not training:
        raise refuse(ctx, "batch norm without statistics in eval mode")
    return _batch_stats(ctx, x, weight, bias, eps)


@register(aten._native_batch_norm_legit_functional.default)
def _batch_norm_functional(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """``(y, save_mean, save_rstd, new_running_mean, new_running_var)``: in training, the batch's statistics
    and the running ones moved toward them, ``momentum * batch + (1 - momentum) * running`` (the unbiased
    variance, as torch); in eval, the running statistics, unchanged."""
    if not training:
        refuse_used_outputs(ctx, "the saved mean/rstd outputs", 1, 2)
        return (_batch_norm_node(ctx, x, weight, bias, running_mean, running_var, eps), None, None,
                running_mean, running_var)
    y, mean, rstd = _batch_stats(ctx, x, weight, bias, eps)
    unbiased = ctx.emit(Op.REDUCE_VAR, [x], {"axes": _batch_axes(ctx, x), "keepdims": 0, "correction": 1.0})

    def moved(running, batch):
        keep = ctx.emit(Op.MUL, [running, ctx.scalar(1.0 - float(momentum), running.dtype)])
        return ctx.emit(Op.ADD, [ctx.emit(Op.MUL, [as_dtype(ctx, batch, running.dtype),
                                                   ctx.scalar(float(momentum), running.dtype)]), keep])

    return y, mean, rstd, moved(running_mean, mean), moved(running_var, unbiased)


@register(aten.instance_norm.default)
def _instance_norm(ctx, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                   cudnn_enabled=True):
    """Each sample's channels normalised on their own: ``GroupNorm`` with ``C`` groups; with
    ``use_input_stats=False``, ``BatchNorm`` with the running statistics."""
    if not use_input_stats:
        return _batch_norm_node(ctx, x, weight, bias, running_mean, running_var, eps)
    if running_mean is not None or running_var is not None:
        raise refuse(ctx, "instance norm that updates running statistics in place")
    if len(x.shape) < 3 or not isinstance(x.shape[1], int):
        raise refuse(ctx, "instance norm needs x [N, C, ...] with a static C")
    return _group_norm_node(ctx, x, x.shape[1], weight, bias, eps)


@register(aten.batch_norm.default)
def _batch_norm(ctx, x, weight, bias, mean, var, training, momentum, eps, cudnn_enabled=True):
    if training and (mean is not None or var is not None):
        raise refuse(ctx, "batch norm in training mode (it updates the running statistics in place); call model.eval()")
    if training:  # no running statistics: the batch's own, nothing updated
        return _batch_stats(ctx, x, weight, bias, eps)[0]
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
