"""MiniMax's lightning attention in a form torch.export traces at any length, from any state.

MiniMax (MiniMax-Text-01) alternates softmax attention with *lightning attention*: per head, a linear
attention whose state decays by ``lambda = exp(-slope)`` a token,

    S_t = lambda * S_{t-1} + k_t^T v_t,        o_t = q_t S_t,

``S`` ``[head_dim, head_dim]``, kept in the cache between calls. transformers writes it as Python loops: over
blocks of ``block_size`` tokens when the cache holds no state (a count torch.export fixes from the example's
length), and over the tokens one by one when it does. :func:`decayed_linear_attention` computes the same outputs
and final state for any number of tokens from any state, in closed form:

    o_t = lambda^(t+1) q_t S_0 + sum_{s <= t} lambda^(t-s) (q_t . k_s) v_s,
    S_T = lambda^T S_0 + sum_s lambda^(T-1-s) k_s^T v_s

(what the blocks compute within each block, over the whole call), so one graph prefills and decodes.
:func:`lightning_forward` is the attention module's forward around it;
:func:`~flora_graph.frontend.traceable.traceable_modules` swaps it in while capturing.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["decayed_linear_attention", "is_lightning_attention", "lightning_forward"]


def decayed_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``[batch, heads, seq, head_dim]`` and the final state ``[batch, heads, head_dim, head_dim]`` of the
    decayed linear attention above over ``q``, ``k``, ``v`` ``[batch, heads, seq, head_dim]``, each head's state
    decaying by ``exp(-slope)`` a token (``slope`` ``[heads, 1, 1]``), from ``state``."""
    seq = q.shape[2]
    t = torch.arange(seq, device=q.device, dtype=q.dtype)
    gap = t[:, None] - t[None, :]  # t - s
    decay = torch.where(gap >= 0, torch.exp(-slope * gap.clamp(min=0)), torch.zeros((), dtype=q.dtype))  # [h, t, s]
    out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)
    out = out + torch.matmul(q * torch.exp(-slope * (t[:, None] + 1)), state)
    keys = k * torch.exp(-slope * (seq - 1 - t)[:, None])
    return out, state * torch.exp(-slope * seq) + torch.matmul(keys.transpose(-1, -2), v)


def is_lightning_attention(module: nn.Module) -> bool:
    """MiniMax's lightning attention module: its per-head ``slope_rate`` ``[heads, 1, 1]``, ``qkv_proj``,
    ``output_gate``, ``norm`` and ``out_proj``, and a ``forward(hidden_states, position_embeddings, attention_mask,
    cache)`` over a cache with ``get_linear_cache`` / ``set_linear_cache``; its modeling module's
    ``apply_mask_to_padding_states``."""
    if "forward" in vars(module) or not all(hasattr(module, a) for a in (
            "slope_rate", "qkv_proj", "output_gate", "norm", "out_proj", "act_fn", "head_dim", "num_attention_heads",
            "layer_idx", "block_size")):
        return False
    try:
        params = tuple(inspect.signature(type(module).forward).parameters)[1:4]
    except (TypeError, ValueError):
        return False
    return params == ("hidden_states", "position_embeddings", "attention_mask") and \
        isinstance(module.slope_rate, torch.Tensor) and module.slope_rate.dim() == 3 and \
        callable(getattr(sys.modules.get(type(module).__module__), "apply_mask_to_padding_states", None))


def lightning_forward(module: nn.Module, path: str = "") -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``module``'s forward (see :func:`is_lightning_attention`) with :func:`decayed_linear_attention` for its loops:
    the same projections, padding mask, norm and output gate; the state from the cache (zeros where it holds none)
    and back into it. (``path``, the module's name in the model, is not needed: the module knows its layer.)"""
    masked = sys.modules[type(module).__module__].apply_mask_to_padding_states
    heads, dim = module.num_attention_heads, module.head_dim

    def forward(hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: torch.Tensor | None = None,
                cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cache = kwargs.pop("past_key_values", cache)
        batch, seq, _ = hidden_states.shape
        qkv = module.act_fn(module.qkv_proj(hidden_states))
        qkv = masked(qkv, attention_mask)
        q, k, v = torch.split(qkv.reshape(batch, seq, heads, 3 * dim), dim, dim=3)
        state = cache.get_linear_cache(module.layer_idx) if cache is not None else None
        if state is None:
            state = torch.zeros(batch, heads, dim, dim, dtype=v.dtype, device=v.device)
        out, state = decayed_linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              module.slope_rate, state)
        out = module.norm(out.transpose(1, 2).reshape(batch, seq, heads * dim))
        out = module.out_proj(F.sigmoid(module.output_gate(hidden_states)) * out)
        if cache is not None:
            cache.set_linear_cache(module.layer_idx, state)
        return out, state

    return forward
