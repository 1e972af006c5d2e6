"""RWKV (transformers' ``RwkvForCausalLM``, RWKV-4) with its states in the cache, for any number of tokens.

An RWKV block mixes each token with the one before it (a "token shift") in its time-mixing (attention) and
channel-mixing (feed-forward) halves, and runs the WKV recurrence, per channel::

    out[t] = (num + exp(u + k[t]) * v[t]) / (den + exp(u + k[t]))
    num = exp(w) * num + exp(k[t]) * v[t],    den = exp(w) * den + exp(k[t])        (w = -exp(time_decay))

transformers passes the states as a list of five ``[batch, hidden, layers]`` tensors (``state``), writes them in
place, runs the recurrence as a Python loop over positions (which torch.export unrolls and fixes to the example's
length), takes no cache object and ignores the attention mask (padding runs through the recurrence as tokens).

:func:`rwkv_forward` is the causal LM's forward that the cache export calls in place of the class's, and that
:func:`~flora_graph.frontend.traceable.traceable_modules` swaps in for a capture without the cache: the same modules (embeddings, layer norms, the projections with
their LoRA layers, the head), each layer's states in a ``LinearAttentionLayer`` of a transformers ``DynamicCache``
(:func:`rwkv_cache`): the two token-shift states as ``conv`` states ``[batch, hidden, 1]`` (``conv``: time mixing,
``conv.1``: channel mixing) and the recurrence's as the ``recurrent`` state ``[batch, 3, attention_hidden]``
(``num``, ``den`` and the log of their scale). The recurrence is one
:func:`~flora_graph.frontend.selective_scan.linear_scan` from the kept state, in float64 and scaled by the largest
exponent of the call so that nothing overflows (nor underflows where one call's exponents span more than float32's
range), and the state it keeps is scaled back to ``den = 1``: transformers' loop keeps a running maximum instead, the
same values up to rounding. Left padding (positions the mask marks 0 before a row's
first token) adds nothing to the WKV state nor decays it, and the row's first token mixes with zeros, as an unpadded
row's does: a left-padded batch gives each row its logits alone. (Padding after a row's last token would leave zeros
as its token-shift states: the export's callers pad on the left.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flora_graph.frontend.cache_states import call_cache, keep_state, kept_state, linear_cache, real_tokens
from flora_graph.frontend.selective_scan import linear_scan

__all__ = ["is_rwkv_lm", "rwkv_cache", "rwkv_forward"]

_ATTENTION = ("time_decay", "time_first", "time_mix_key", "time_mix_value", "time_mix_receptance", "key", "value",
              "receptance", "output")
_FEED_FORWARD = ("time_mix_key", "time_mix_receptance", "key", "receptance", "value")


def is_rwkv_lm(model: nn.Module) -> bool:
    """An RWKV causal LM: a ``head`` over an ``rwkv`` model of ``embeddings``, ``blocks`` (each with ``ln1``, ``ln2``,
    an ``attention`` of time-mixing parameters and projections, a ``feed_forward`` of channel-mixing ones) and
    ``ln_out``."""
    body = getattr(model, "rwkv", None)
    blocks = getattr(body, "blocks", None)
    return isinstance(getattr(model, "head", None), nn.Module) and isinstance(blocks, nn.ModuleList) and len(blocks) > 0 \
        and all(hasattr(body, a) for a in ("embeddings", "ln_out", "layers_are_rescaled")) and all(
            hasattr(b, "ln1") and hasattr(b, "ln2") and all(hasattr(b.attention, a) for a in _ATTENTION)
            and all(hasattr(b.feed_forward, a) for a in _FEED_FORWARD) for b in blocks)


def rwkv_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` with a ``LinearAttentionLayer`` of two states for each block of ``model``."""
    return linear_cache(len(model.rwkv.blocks), 2)


def rwkv_forward(model: nn.Module) -> Callable[..., Any]:
    """``model``'s forward (see :func:`is_rwkv_lm`) with its states in ``past_key_values`` (or ``cache``), a cache
    laid out as :func:`rwkv_cache` lays it out, read (zeros where it holds none) and written back; returns
    transformers' ``CausalLMOutputWithPast`` (``logits``, ``past_key_values``: that cache, or a new one, where
    ``use_cache``, by default the config's). ``attention_mask``
    ``[batch, seq]`` (the new tokens') marks padding. The model's output layers are rescaled for inference first,
    as its own first forward in eval mode does."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    body, config = model.rwkv, model.config
    if not model.training:
        body._rescale_layers()  # in place, once: what the model's own forward does before its first eval step
    halve_every = int(config.rescale_every) if body.layers_are_rescaled else 0

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, cache: Any = None, use_cache: bool | None = None, **kwargs: Any) -> Any:
        cache, use_cache = call_cache(past_key_values, cache, use_cache, config, lambda: rwkv_cache(model))
        real = real_tokens(attention_mask, input_ids)
        hidden = body.embeddings(input_ids)
        for i, block in enumerate(body.blocks):
            layer = cache.layers[i]
            if i == 0:
                hidden = block.pre_ln(hidden)
            x = _padding_zeroed(block.ln1(hidden), real)
            att = block.attention
            shifted = _shifted(x, _state(layer, "conv", 0, x))
            k = att.key(_mix(x, shifted, att.time_mix_key))
            v = att.value(_mix(x, shifted, att.time_mix_value))
            r = torch.sigmoid(att.receptance(_mix(x, shifted, att.time_mix_receptance)))
            recurrent = kept_state(layer, "recurrent", 0)
            if recurrent is None:
                recurrent = k.new_zeros(k.shape[0], 3, k.shape[-1], dtype=torch.float32)
            wkv, recurrent = _wkv(att.time_decay, att.time_first, k, v, recurrent, real)
            keep_state(layer, "conv", 0, x[:, -1:].transpose(1, 2))
            keep_state(layer, "recurrent", 0, recurrent)
            hidden = hidden + att.output(r * wkv.to(r.dtype))
            x = _padding_zeroed(block.ln2(hidden), real)
            ff = block.feed_forward
            shifted = _shifted(x, _state(layer, "conv", 1, x))
            key = torch.square(torch.relu(ff.key(_mix(x, shifted, ff.time_mix_key))))
            receptance = torch.sigmoid(ff.receptance(_mix(x, shifted, ff.time_mix_receptance)))
            keep_state(layer, "conv", 1, x[:, -1:].transpose(1, 2))
            hidden = hidden + receptance * ff.value(key)
            if halve_every > 0 and (i + 1) % halve_every == 0:
                hidden = hidden / 2
        return CausalLMOutputWithPast(logits=model.head(body.ln_out(hidden)), past_key_values=cache if use_cache else None)

    return forward


def _padding_zeroed(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    return x if real is None else torch.where(real[..., None], x, torch.zeros_like(x))


def _state(layer: Any, kind: str, index: int, x: torch.Tensor) -> torch.Tensor:
    """The token-shift state ``[batch, hidden]`` the cache layer keeps (``[batch, hidden, 1]``), zeros where none."""
    kept = kept_state(layer, kind, index)
    return torch.zeros_like(x[:, 0]) if kept is None else kept[..., -1].to(x.dtype)


def _shifted(x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Each position's previous token: ``previous`` (the kept state) for the first. (Cut after the concatenation:
    ``x[:, :-1]`` makes torch.export guard ``seq - 1 != 1`` and retry the export.)"""
    return torch.cat([previous[:, None], x], dim=1)[:, :x.shape[1]]


def _mix(x: torch.Tensor, shifted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * weight + shifted * (1 - weight)


def _wkv(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         state: torch.Tensor, real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The WKV outputs ``[batch, seq, channels]`` and the state after them, ``[batch, 3, channels]`` (float32):
    ``num`` and ``den`` scaled by ``exp(-scale)``, and ``scale`` (zeros: an empty state). In float64, scaled by the
    call's largest exponent: the exponents of one call may span more than float32's range below it (a running
    maximum, transformers' loop, rescales at every token instead)."""
    k, v, u = k.double(), v.double(), time_first.double()
    if real is not None:  # padding adds nothing (exp(-inf) = 0) and leaves the state undecayed
        k = k.masked_fill(~real[..., None], float("-inf"))
    num, den, scale = state.double().unbind(1)
    scale = torch.where(den > 0, scale, float("-inf"))  # an empty state has no scale of its own
    top = torch.maximum(torch.maximum(scale, k.amax(1)), (u + k).amax(1))  # [batch, channels]: no exponent above 0
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    carried = torch.exp(scale - top)
    h0 = torch.stack([num * carried, den * carried], dim=1)  # [batch, 2, channels]
    decay = torch.exp(-torch.exp(time_decay.double())).expand_as(k)
    if real is not None:
        decay = torch.where(real[..., None], decay, torch.ones_like(decay))
    weight = torch.exp(k - top[:, None])
    states = linear_scan(torch.stack([decay, decay], dim=2), torch.stack([weight * v, weight], dim=2), h0, 1)
    before = torch.cat([h0[:, None], states], dim=1)[:, :k.shape[1]]  # [batch, seq, 2, channels]: before each token
    first = torch.exp(u + k - top[:, None])
    numerator, denominator = before[:, :, 0] + first * v, before[:, :, 1] + first
    out = torch.where(denominator > 0, numerator / denominator, torch.zeros_like(numerator))  # 0/0 at padding
    last_num, last_den = states[:, -1].unbind(1)
    last_den = last_den.clamp_min(torch.finfo(torch.float64).tiny)
    kept = torch.stack([last_num / last_den, torch.ones_like(last_den), top + torch.log(last_den)], dim=1)
    return out.float(), kept.float()
