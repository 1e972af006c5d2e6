"""Recurrent states in a transformers ``DynamicCache`` for the forwards that keep them there in place of a model's own
(:mod:`~flora_graph.frontend.rwkv`, :mod:`~flora_graph.frontend.xlstm`): one ``LinearAttentionLayer`` a layer, its
states by kind (``conv``, ``recurrent``) and index, as the cache export reads and writes them; and the recurrent
state of the swapped layers of :mod:`~flora_graph.frontend.selective_scan` and
:mod:`~flora_graph.frontend.recurrent_block`, set without an in-place write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["call_cache", "keep_recurrent_state", "keep_state", "kept_state", "linear_cache", "real_tokens"]


def linear_cache(layers: int, states: int) -> Any:
    """An empty ``DynamicCache`` of ``layers`` ``LinearAttentionLayer``\\ s, each with room for ``states`` states of a
    kind."""
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionLayer

    cache = DynamicCache()
    cache.layers = [LinearAttentionLayer(number_of_states=states) for _ in range(layers)]
    return cache


def call_cache(past_key_values: Any, cache: Any, use_cache: bool | None, config: Any,
               empty: Callable[[], Any]) -> tuple[Any, bool]:
    """The cache a state-keeping forward runs on (``past_key_values``, else ``cache``, else ``empty()``) and whether it
    returns it (``use_cache``, by default the config's)."""
    cache = past_key_values if past_key_values is not None else cache
    return (empty() if cache is None else cache), bool(config.use_cache) if use_cache is None else use_cache


def real_tokens(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``[batch, seq]``, true where a new token is not padding: the new tokens' part of ``attention_mask`` (``None``
    for no mask)."""
    return None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:].bool()


def kept_state(layer: Any, kind: str, index: int) -> torch.Tensor | None:
    """The ``kind`` state ``index`` the cache layer holds, or ``None``."""
    return getattr(layer, f"{kind}_states").get(index)


def keep_recurrent_state(cache: Any, layer: int, value: torch.Tensor) -> None:
    """Make ``value`` the recurrent state of ``cache``'s ``layer`` (a transformers cache): assigned, where the cache's
    own ``update_recurrent_state`` copies it into the tensor it holds, an in-place write that makes capture
    retrace the program to functionalize it."""
    held = cache.layers[layer] if isinstance(getattr(cache, "layers", None), list) else None
    if held is not None and isinstance(getattr(held, "recurrent_states", None), dict):
        keep_state(held, "recurrent", 0, value)
    else:
        cache.update_recurrent_state(value, layer)


def keep_state(layer: Any, kind: str, index: int, value: torch.Tensor) -> None:
    """Make ``value`` the layer's ``kind`` state ``index`` (a new tensor, not written into the old one)."""
    getattr(layer, f"{kind}_states")[index] = value
    getattr(layer, f"is_{kind}_states_initialized")[index] = True
    layer.has_previous_state[index] = True
    layer.dtype, layer.device = value.dtype, value.device
    if kind == "conv":
        layer.conv_kernel_size[index] = value.shape[-1]
