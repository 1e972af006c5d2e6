"""ATen converters that emit the attention family (``ScaledDotProductAttention``).

``scaled_dot_product_attention`` and the kernels torch.export may record instead
(``_scaled_dot_product_flash_attention_for_cpu``, ``_scaled_dot_product_efficient_attention``,
which return a tuple whose other entries are ``None``) -> ``SDPA``. ``enable_gqa`` stays
grouped-query attention where q, k and v share a rank >= 3 and the key/value heads divide the
query heads; otherwise each key/value head is repeated to the query's head count
(``Unsqueeze``/``Expand``/``Reshape`` of k and v). A float mask is cast to the query's dtype;
attention dropout is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flora_graph.errors import ShapeError
from flora_graph.frontend.aten.registry import as_dtype, refuse, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim
from flora_graph.ops.attention import gqa_group

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten


def _repeat_heads(ctx: CaptureContext, t: ComputationNode, heads: Dim) -> ComputationNode:
    """``t [.., Hk, S, E]`` with each head repeated to ``heads`` (torch's ``enable_gqa``)."""
    shape = t.shape
    hk = shape[-3]
    if not isinstance(hk, int) or not isinstance(heads, int) or heads % hk:
        raise refuse(ctx, f"grouped-query attention of {heads} query heads over {hk} key/value heads")
    if heads == hk:
        return t
    rank = len(shape)
    wide = ctx.emit(Op.UNSQUEEZE, [t], {"axes": (rank - 2,)})
    wide = ctx.emit(Op.EXPAND, [wide], {"shape": (*shape[:-2], heads // hk, *shape[-2:])})
    return ctx.emit(Op.RESHAPE, [wide], {"shape": (*shape[:-3], heads, *shape[-2:])})


def _sdpa_node(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa=False):
    if dropout_p:
        raise refuse(ctx, f"attention dropout {dropout_p} (export the model in eval mode with dropout 0)")
    grouped = False
    if enable_gqa:
        try:
            grouped = gqa_group(q.shape, k.shape, v.shape) > 1
        except ShapeError:  # not grouped-query heads the op takes: repeat them (or refuse, naming why)
            grouped = False
        if not grouped:
            k, v = _repeat_heads(ctx, k, q.shape[-3]), _repeat_heads(ctx, v, q.shape[-3])
    inputs = [q, k, v]
    if mask is not None:
        inputs.append(mask if mask.dtype == "bool" else as_dtype(ctx, mask, q.dtype))
    attrs = {"is_causal": int(bool(is_causal)), "scale": float(scale or 0.0), "enable_gqa": int(grouped)}
    return ctx.emit(Op.SDPA, inputs, attrs)


@register(aten.scaled_dot_product_attention.default)
def _sdpa(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    return _sdpa_node(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@register(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_flash_cpu(ctx, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    return (_sdpa_node(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale), None)  # (output, logsumexp)


@register(aten._scaled_dot_product_efficient_attention.default)
def _sdpa_efficient(ctx, q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    return (_sdpa_node(ctx, q, k, v, attn_bias, dropout_p, is_causal, scale), None, None, None)
