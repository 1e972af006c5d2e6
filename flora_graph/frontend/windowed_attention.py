"""Longformer's and LED's encoder attention (a sliding window beside global tokens) as one masked attention.

transformers computes it in chunks of the window: the sequence padded to a whole number of windows (a branch on
the padding's length), overlapping chunks made by ``as_strided``, and the global tokens gathered by ``nonzero``
into a count read into Python (``.item()``). torch.export refuses each of those on a dynamic sequence, and
torch.onnx with it. The same attention, written over every key with a mask:

* a query that is no global token attends, with the layer's ``query`` / ``key`` / ``value``, the keys within
  ``one_sided_attn_window_size`` of it that are neither padding nor global, and every global key: the keys
  transformers' band and its global slots hold, each once;
* a global token's query attends every key that is not padding, with the layer's ``query_global`` /
  ``key_global`` / ``value_global``, as transformers' global pass does;
* a padding query's output is zero.

Scores are masked with the dtype's lowest value and the softmax runs in float32, as transformers' do. It costs
``seq * seq`` scores a head where the chunks cost ``seq * (2 * window + 1)``: exact, for any length without padding
to whole windows (the swap of ``_pad_to_window_size`` pads nothing), and for any number of global tokens a row.
:func:`~flora_graph.frontend.traceable.traceable_modules` swaps it in while capturing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["is_padded_to_windows", "is_windowed_attention", "unpadded_windows", "windowed_attention_forward"]

_CLASSES = ("LongformerSelfAttention", "LEDEncoderSelfAttention")
_PADDED = ("LongformerModel", "LEDEncoder")


def is_windowed_attention(module: nn.Module) -> bool:
    """Longformer's (and LED's encoder's) self-attention: its window, heads and the local and global projections."""
    return type(module).__name__ in _CLASSES and "forward" not in vars(module) and all(
        hasattr(module, a) for a in ("query", "key", "value", "query_global", "key_global", "value_global",
                                     "one_sided_attn_window_size", "num_heads", "head_dim"))


def windowed_attention_forward(module: nn.Module, path: str = "") -> Callable[..., tuple[torch.Tensor]]:
    """``module``'s forward as the masked attention of the module's docstring: ``hidden_states`` ``[batch, seq,
    hidden]`` and the layer's ``attention_mask`` ``[batch, seq]`` (negative: padding, zero: local, positive: global,
    as the model makes it) in, ``(output,)`` out."""
    heads, dim, window = int(module.num_heads), int(module.head_dim), int(module.one_sided_attn_window_size)

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, is_index_masked: Any = None,
                is_index_global_attn: Any = None, is_global_attn: Any = None, output_attentions: bool = False,
                **kwargs: Any) -> tuple[torch.Tensor]:
        if output_attentions:
            raise NotImplementedError(f"{path or type(module).__name__}: the attention probabilities of the "
                                      "chunked form are not computed by the masked form")
        batch, seq, _ = hidden_states.shape

        def split(x: torch.Tensor) -> torch.Tensor:  # [batch, seq, hidden] -> [batch, heads, seq, dim]
            return x.view(batch, seq, heads, dim).transpose(1, 2)

        low = torch.finfo(hidden_states.dtype).min
        padding, glob = attention_mask < 0, attention_mask > 0
        local = ~padding & ~glob

        def attend(query: nn.Module, key: nn.Module, value: nn.Module, keep: torch.Tensor) -> torch.Tensor:
            """Every query over the keys ``keep`` (``[batch, query or 1, key]``) allows it; padding queries zero."""
            q = split(query(hidden_states) / math.sqrt(dim))
            scores = torch.matmul(q, split(key(hidden_states)).transpose(-1, -2)).masked_fill(~keep[:, None], low)
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
            return torch.matmul(probs.masked_fill(padding[:, None, :, None], 0.0), split(value(hidden_states)))

        pos = torch.arange(seq, device=hidden_states.device)
        band = (pos[:, None] - pos[None, :]).abs() <= window  # [query, key]
        out = attend(module.query, module.key, module.value, (band[None] & local[:, None, :]) | glob[:, None, :])
        # the global tokens' own pass: every key that is not padding, with the global projections
        out_g = attend(module.query_global, module.key_global, module.value_global, ~padding[:, None, :])
        out = torch.where(glob[:, None, :, None], out_g, out)
        return (out.transpose(1, 2).reshape(batch, seq, heads * dim),)

    return forward


def is_padded_to_windows(module: nn.Module) -> bool:
    """Longformer's model and LED's encoder, which pad their input to whole windows (``_pad_to_window_size``)."""
    return type(module).__name__ in _PADDED and callable(getattr(module, "_pad_to_window_size", None)) \
        and "_pad_to_window_size" not in vars(module)


def unpadded_windows(module: nn.Module, path: str = "") -> Callable[..., tuple[Any, ...]]:
    """``module``'s ``_pad_to_window_size`` that pads nothing: ``(0, *its inputs but pad_token_id)``, the order it
    returns them in (Longformer's ids, mask, token types, positions, embeddings; LED's ids, mask, embeddings)."""
    signature = inspect.signature(module._pad_to_window_size)
    returned = [name for name in signature.parameters if name != "pad_token_id"]

    def pad(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        given = signature.bind(*args, **kwargs).arguments
        return (0, *(given.get(name) for name in returned))

    return pad
