"""xLSTM (transformers' ``xLSTMForCausalLM``: xLSTM-7B's mLSTM blocks) with its states in the cache, for any number of
tokens.

Each head of an mLSTM layer keeps a matrix memory ``C`` ``[dk, dv]``, a normalizer ``n`` ``[dk]`` and a stabilizer
``m``; per token, with ``lf = logsigmoid(f)``::

    m' = max(lf + m, i),   C' = exp(lf + m - m') C + exp(i - m') k vᵀ,   n' = exp(lf + m - m') n + exp(i - m') k
    h  = (q/√dk)ᵀ C' / (max(|(q/√dk) · n'|, exp(-m')) + eps)

transformers keeps the states in an ``xLSTMCache`` of its own (written in place) and runs them as a Python loop over
positions below its chunk size, a chunked kernel over whole chunks and a step kernel for one token: torch.export
fixes the length, and the mask is not read.

:func:`xlstm_forward` is the causal LM's forward in one closed form for any number of tokens from the kept state
(the stabilizer ``m`` after each token is ``F + max(m, max over earlier j of i_j - F_j)`` with ``F`` the running sum
of ``lf``; each token's output weighs every earlier token by ``exp(F_t - F_j + i_j - m_t)``, at most 1), the same
values as the loop up to rounding. Each layer's three states are the ``recurrent`` states (``recurrent``: ``C``,
``recurrent.1``: ``n``, ``recurrent.2``: ``m``) of a ``LinearAttentionLayer`` (:func:`xlstm_cache`). Padding (a
position the mask marks 0) adds nothing and decays nothing: a left-padded batch gives each row its logits alone.
The cache export calls it in place of the class's forward, and
:func:`~flora_graph.frontend.traceable.traceable_modules` swaps it in for a capture without the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.frontend.cache_states import call_cache, keep_state, kept_state, linear_cache, real_tokens

__all__ = ["is_xlstm_lm", "xlstm_cache", "xlstm_forward"]

_LAYER = ("mlstm_backend", "multihead_norm", "out_proj", "ogate_act_fn")


def is_xlstm_lm(model: nn.Module) -> bool:
    """An xLSTM causal LM: an ``lm_head`` over a ``backbone`` of ``embeddings``, ``blocks`` (each a ``norm_mlstm``, an
    ``mlstm_layer`` with its ``mlstm_backend``, a ``norm_ffn`` and an ``ffn``) and ``out_norm``."""
    body = getattr(model, "backbone", None)
    blocks = getattr(body, "blocks", None)
    return isinstance(getattr(model, "lm_head", None), nn.Module) and isinstance(blocks, nn.ModuleList) and \
        len(blocks) > 0 and all(hasattr(body, a) for a in ("embeddings", "out_norm")) and all(
            all(hasattr(b, a) for a in ("norm_mlstm", "mlstm_layer", "norm_ffn", "ffn"))
            and all(hasattr(b.mlstm_layer, a) for a in _LAYER) for b in blocks)


def xlstm_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` with a ``LinearAttentionLayer`` of three states for each block of ``model``."""
    return linear_cache(len(model.backbone.blocks), 3)


def xlstm_forward(model: nn.Module) -> Callable[..., Any]:
    """``model``'s forward (see :func:`is_xlstm_lm`) with its states in ``past_key_values`` (or ``cache``), a cache laid
    out as :func:`xlstm_cache` lays it out, read (zeros where it holds none, as transformers starts) and written back;
    returns transformers' ``CausalLMOutputWithPast`` (``logits``, soft-capped as the model caps them;
    ``past_key_values``: that cache, or a new one, where ``use_cache``, by default the config's). ``attention_mask``
    ``[batch, seq]`` (the new tokens') marks padding."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    body, config = model.backbone, model.config

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, cache: Any = None, use_cache: bool | None = None, **kwargs: Any) -> Any:
        cache, use_cache = call_cache(past_key_values, cache, use_cache, config, lambda: xlstm_cache(model))
        real = real_tokens(attention_mask, input_ids)
        hidden = body.embeddings(input_ids)
        for block, layer in zip(body.blocks, cache.layers, strict=True):
            hidden = hidden + _mlstm_layer(block.mlstm_layer, block.norm_mlstm(hidden), layer, real, config)
            hidden = hidden + block.ffn(block.norm_ffn(hidden))
        hidden = body.out_norm(hidden)
        logits = _soft_cap(model.lm_head(hidden.to(model.lm_head.weight.dtype)).float(), config.output_logit_soft_cap)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache else None)

    return forward


def _soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def _mlstm_layer(layer: nn.Module, x: torch.Tensor, kept: Any, real: torch.Tensor | None, config: Any) -> torch.Tensor:
    """transformers' ``xLSTMLayer.forward`` on ``x`` ``[batch, seq, hidden]``, its states in the cache layer ``kept``."""
    batch, seq, _ = x.shape
    heads = config.num_heads
    if config.weight_mode == "single":
        query, key, value, o_preact = layer.q(x), layer.k(x), layer.v(x), layer.ogate_preact(x)
        i_preact = _soft_cap(layer.igate_preact(x), config.gate_soft_cap)
        f_preact = _soft_cap(layer.fgate_preact(x), config.gate_soft_cap)
    else:  # fused
        query, key, value, o_preact = torch.tensor_split(
            layer.qkv_opreact(x), (layer.qk_dim, 2 * layer.qk_dim, 2 * layer.qk_dim + layer.v_dim), dim=-1)
        i_preact, f_preact = torch.tensor_split(_soft_cap(layer.ifgate_preact(x), config.gate_soft_cap), (heads,), dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, seq, heads, -1).transpose(1, 2)

    q, k, v = split(query), split(key), split(value)
    state = [kept_state(kept, "recurrent", j) for j in range(3)]
    if state[0] is None:
        state = [q.new_zeros(batch, heads, q.shape[-1], v.shape[-1], dtype=torch.float32),
                 q.new_zeros(batch, heads, q.shape[-1], dtype=torch.float32),
                 q.new_zeros(batch, heads, 1, dtype=torch.float32)]
    h, state = _mlstm(q, k, v, i_preact.transpose(1, 2), f_preact.transpose(1, 2), *state, real, config.eps)
    for j, t in enumerate(state):
        keep_state(kept, "recurrent", j, t)
    h_norm = layer.multihead_norm(h.transpose(1, 2)).reshape(batch, seq, -1)
    return layer.out_proj(layer.ogate_act_fn(o_preact) * h_norm)


def _mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, igate: torch.Tensor, fgate: torch.Tensor,
           c0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, real: torch.Tensor | None,
           eps: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every token's ``h`` ``[batch, heads, seq, dv]`` (``q``'s dtype) and the states after the last, from ``c0``
    ``[batch, heads, dk, dv]``, ``n0`` ``[batch, heads, dk]`` and ``m0`` ``[batch, heads, 1]`` (float32), in the closed
    form of the module docstring; ``igate`` / ``fgate`` ``[batch, heads, seq]``."""
    dtype, seq = q.dtype, q.shape[2]
    q, k, v, i = q.float() * q.shape[-1] ** -0.5, k.float(), v.float(), igate.float()
    lf = F.logsigmoid(fgate.float())
    if real is not None:  # padding: no input, no decay
        mask = real[:, None, :]
        i = i.masked_fill(~mask, float("-inf"))
        lf = torch.where(mask, lf, torch.zeros_like(lf))
    cum = lf.cumsum(-1)  # [batch, heads, seq]
    index = torch.arange(seq, device=q.device)
    causal = index[None, :] <= index[:, None]  # [t, j]: j at or before t
    rise = torch.where(causal, (i - cum)[..., None, :], torch.full_like(cum[..., None, :], float("-inf")))
    m = cum + torch.maximum(m0, rise.amax(-1))  # [batch, heads, seq]: the stabilizer after each token
    weights = torch.where(causal, torch.exp(cum[..., :, None] - cum[..., None, :] + i[..., None, :] - m[..., :, None]),
                          torch.zeros_like(rise))  # [batch, heads, t, j]
    carried = torch.exp(m0 + cum - m)  # [batch, heads, seq]: what is left of the kept state's scale
    scores = weights * (q @ k.transpose(-1, -2))
    numerator = carried[..., None] * (q @ c0) + scores @ v
    qn = carried * (q * n0[:, :, None, :]).sum(-1) + scores.sum(-1)
    h = numerator / (torch.maximum(qn.abs(), torch.exp(-m)) + eps)[..., None]
    last = weights[:, :, -1]  # [batch, heads, j]: each token's weight in the last state
    c = carried[..., -1, None, None] * c0 + (k * last[..., None]).transpose(-1, -2) @ v
    n = carried[..., -1, None] * n0 + (k * last[..., None]).sum(2)
    return h.to(dtype), [c, n, m[..., -1:]]
