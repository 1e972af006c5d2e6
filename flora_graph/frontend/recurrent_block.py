"""Griffin's recurrent block (RecurrentGemma) in a form that keeps its states in the cache and traces at any length.

RecurrentGemma alternates windowed attention with Griffin's recurrent block: two projections of the input, one
through a short depthwise causal convolution and a real-gated linear recurrent unit (RG-LRU),

    a_t = exp(-8 * r_t * softplus(c)),    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t),

(``r_t``, ``i_t``: sigmoid gates of ``x_t``, block-diagonal per head; the state restarts where a position is 0), the
other through a GeLU, multiplied and projected back. transformers keeps the convolution's last inputs and the
recurrence's state in attributes of the modules, not in the cache, branches on the number of tokens (a prefill
convolves from zeros, one token steps from the kept inputs) and loops over positions in Python, so torch.export
fixes the length and a flat cache cannot carry the states.

:func:`recurrent_block_forward` is the block's forward with both states in the cache's linear-attention layer of
its own index (which transformers' ``DynamicCache`` lays out for these layers and the model leaves empty): the
convolution over the kept inputs and the new ones (the cache's ``update_conv_state``), the recurrence over
:func:`~flora_graph.frontend.selective_scan.linear_scan` from the kept state, for any number of tokens, so one
graph prefills and decodes. Padding (left of a row's first token) enters the convolution as zeros, as before an
unpadded row's first token, and the recurrence restarts at a row's position 0: a padded row computes what it computes
alone (transformers' block convolves the padding's projections into the first tokens).
:func:`~flora_graph.frontend.traceable.traceable_modules` swaps it in while capturing and while reading the cache's
layout off an eager step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.errors import GraphError
from flora_graph.frontend.cache_states import keep_recurrent_state
from flora_graph.frontend.selective_scan import linear_scan

__all__ = ["is_recurrent_block", "recurrent_block_forward"]

_LRU = ("recurrent_param", "input_gate_weight", "input_gate_bias", "recurrent_gate_weight", "recurrent_gate_bias",
        "num_attention_heads", "block_width")


def is_recurrent_block(module: nn.Module) -> bool:
    """Griffin's recurrent block: ``linear_x``, ``linear_y``, ``linear_out``, a depthwise ``conv_1d`` of
    ``conv1d_width`` taps, ``act_fn`` and an ``rg_lru`` with its per-head gate weights and ``recurrent_param``."""
    lru = getattr(module, "rg_lru", None)
    return "forward" not in vars(module) and lru is not None and all(hasattr(module, a) for a in (
        "linear_x", "linear_y", "linear_out", "conv_1d", "conv1d_width", "act_fn", "lru_width")) and \
        all(hasattr(lru, a) for a in _LRU) and isinstance(module.conv_1d, nn.Conv1d)


def recurrent_block_forward(module: nn.Module, path: str) -> Callable[..., tuple[torch.Tensor, None]]:
    """``module``'s forward (see :func:`is_recurrent_block`; ``path``, its name in the model, ends in
    ``layers.{i}.<name>``, ``i`` its cache layer) with the convolution's last inputs and the recurrence's state
    ``[batch, lru_width]`` in the cache, read (zeros where it holds none) and written back.

    Raises :class:`GraphError` where ``path`` names no layer."""
    found = re.search(r"(?:^|\.)layers\.(\d+)\.[^.]+$", path)
    if found is None:
        raise GraphError(f"recurrent block {path!r}: its path names no layer (layers.<i>.<block>), so its cache "
                         "layer is unknown")
    layer, lru, width = int(found.group(1)), module.rg_lru, module.conv1d_width
    heads, block = lru.num_attention_heads, lru.block_width

    def gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, seq, channels = x.shape
        per_head = x.reshape(batch * seq, heads, block).permute(1, 0, 2)
        return torch.sigmoid(torch.baddbmm(bias[:, None, :], per_head, weight).transpose(0, 1)
                             .reshape(batch, seq, channels))

    def forward(input_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = True, cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.pop("past_key_values", cache) if use_cache else None
        seq = input_states.shape[1]
        y = module.act_fn(module.linear_y(input_states))
        x = module.linear_x(input_states).transpose(1, 2)  # [batch, lru_width, seq]
        real = _real_positions(attention_mask, seq)
        if real is not None:  # padding convolves as the zeros before a row's first token
            x = x * real[:, None, :].to(x.dtype)
        if cache is not None:  # the kept inputs, then the new ones (zeros before a prefill)
            x = cache.update_conv_state(x, layer, conv_kernel_size=width)
        x = module.conv_1d(x)[..., :x.shape[-1]][..., -seq:].transpose(1, 2)  # [batch, seq, lru_width]
        # the RG-LRU, as transformers writes it, over a scan from the kept state
        reset = position_ids[:, :, None] == 0
        log_a = -8.0 * gate(x, lru.recurrent_gate_weight, lru.recurrent_gate_bias) * F.softplus(lru.recurrent_param)
        normalized = x * gate(x, lru.input_gate_weight, lru.input_gate_bias)
        normalized = normalized * (reset + ~reset * torch.sqrt(1 - torch.exp(2 * log_a))).type(x.dtype)
        state = cache.get_recurrent_state(layer) if cache is not None else None
        if state is None:
            state = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)
        states = linear_scan((torch.exp(log_a) * ~reset).float(), normalized.float(), state.float(), 1)
        if cache is not None:
            keep_recurrent_state(cache, layer, states[:, -1])
        return module.linear_out(states.type(x.dtype) * y), None

    return forward


def _real_positions(mask: Any, seq: int) -> torch.Tensor | None:
    """``[batch, seq]``, true where a new token is not padding, read off the attention's mask ``[batch, 1, seq,
    keys]`` (bool, or float with 0 where a query attends), whose new tokens are its last ``seq`` keys: a token
    attends to itself unless it is padding. ``None`` for no mask (nothing padded)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    new = mask[:, 0, :, -seq:]
    attends = new if mask.dtype == torch.bool else new == 0
    index = torch.arange(seq, device=mask.device)
    return (attends & (index[:, None] == index[None, :])).any(-1)  # the diagonal, for any seq
