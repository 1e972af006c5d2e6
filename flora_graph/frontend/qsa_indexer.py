"""Qwen4-Exp's QSA token indexer as one traceable computation over every query at once.

Each query of an indexed attention layer attends to the keys of its best ``budget / compression`` blocks and to its
visible keys past the last complete block. A block is ``compression`` consecutive visible keys; its score is the ReLU
logits of the query's indexer heads, added, against the block's keys averaged, normed and rotated at the block's first
key's position. transformers computes this per batch row and per query, in Python loops over ``nonzero`` and with
``topk(min(k, blocks))``: data-dependent control flow that torch.export cannot trace.

:func:`qsa_indexer_forward` runs the module's own forward with a selection that computes the same mask for every query
in one pass:

- the blocks are aligned to the row's first visible key (its last query's: the one that sees the most), their keys
  read off the row's keys shifted to start there, one block per key position (those past a query's last complete
  block are never chosen);
- the block scores are padded with ``k`` entries of ``-inf``, so ``topk`` takes ``k`` of any number of blocks and,
  where fewer than ``k`` blocks are complete, keeps every complete one, as ``topk(min(k, blocks))`` does.

The block alignment is the one assumption: each query's visible keys are the first ones of its row's, the row's
contiguous (true of causal masks over left-padded rows, which is what the indexed layers get).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["is_qsa_indexer", "qsa_indexer_forward"]

_ATTRIBUTES = ("token_budget", "compress_ratio", "block_topk", "index_head_dim", "k_layernorm")


def is_qsa_indexer(module: nn.Module) -> bool:
    """Qwen4-Exp's QSA indexer: the attributes :data:`_ATTRIBUTES`, a ``_select_tokens`` of the arguments its
    forward passes, and an ``apply_rotary_pos_emb`` in the module's own module."""
    if "forward" in vars(module) or not all(hasattr(module, a) for a in _ATTRIBUTES):
        return False
    select = getattr(type(module), "_select_tokens", None)
    if not callable(select):
        return False
    names = list(inspect.signature(select).parameters)[1:7]
    return names == ["hidden_states", "q", "raw_keys", "full_cos", "full_sin", "attention_mask"] \
        and callable(getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None))


def qsa_indexer_forward(module: nn.Module, path: str = "") -> Callable[..., torch.Tensor]:
    """``module``'s forward (see :func:`is_qsa_indexer`) with its token selection computed for every query at once:
    the ``[batch, 1, queries, keys]`` mask of the keys each query keeps, the one transformers' loops give."""
    rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb

    def select(hidden_states: torch.Tensor, q: torch.Tensor, raw_keys: torch.Tensor, full_cos: torch.Tensor,
               full_sin: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        return _selected(module, rotate, q, raw_keys, full_cos, full_sin, attention_mask)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        module._select_tokens = select  # an instance attribute over the class's loops, for this call
        try:
            return type(module).forward(module, *args, **kwargs)
        finally:
            del module._select_tokens

    return forward


def _selected(module: nn.Module, rotate: Callable[..., torch.Tensor], q: torch.Tensor, raw_keys: torch.Tensor,
              full_cos: torch.Tensor, full_sin: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The selection mask (see the module docstring). ``q``: ``[batch, queries, heads, dim]``, rotated; ``raw_keys``:
    ``[batch, keys, dim]``; ``full_cos`` / ``full_sin``: ``[batch, keys, rotary dim]``; ``attention_mask``: ``[batch,
    1, queries, keys]``, bool (True: visible) or float (0: visible)."""
    c, k = module.compress_ratio, module.block_topk
    visible = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
    count = visible.shape[-1]
    start = visible[:, -1].int().argmax(-1)  # [batch]: the row's first visible key
    seen = visible.sum(-1)  # [batch, queries]: each query's visible keys
    complete = seen // c  # its complete blocks
    block = torch.arange(count, device=visible.device)  # a block per key position, the complete ones used
    first = (start[:, None] + block[None, :] * c).clamp(max=count - 1)  # [batch, blocks]: a block's first key
    total = None
    for i in range(c):  # each block's keys added in order
        at = (start[:, None] + block[None, :] * c + i).clamp(max=count - 1)
        part = raw_keys.float().gather(1, at[..., None].expand(-1, -1, raw_keys.shape[-1]))
        total = part if total is None else total + part
    pooled = module.k_layernorm((total / c).to(raw_keys.dtype))  # [batch, blocks, dim]
    cos = full_cos.gather(1, first[..., None].expand(-1, -1, full_cos.shape[-1]))
    sin = full_sin.gather(1, first[..., None].expand(-1, -1, full_sin.shape[-1]))
    keys = rotate(pooled.unsqueeze(2), cos=cos, sin=sin, unsqueeze_dim=2).squeeze(2)  # [batch, blocks, dim]
    logits = torch.einsum("bqhd,bkd->bqkh", q.float(), keys.float())
    scores = logits.relu().sum(-1) / math.sqrt(module.index_head_dim)  # [batch, queries, blocks]
    usable = block[None, None, :] < complete[..., None]
    padded = nn.functional.pad(scores.masked_fill(~usable, float("-inf")), (0, k), value=float("-inf"))
    top = padded.topk(k, dim=-1).indices
    chosen = torch.zeros_like(padded, dtype=torch.bool).scatter(-1, top, True)[..., :count] & usable
    relative = (block[None, :] - start[:, None]).clamp(min=0)  # [batch, keys]: a key's place from the row's first
    in_chosen = chosen.gather(-1, (relative // c)[:, None, :].expand(-1, chosen.shape[1], -1))
    tail = relative[:, None, :] >= complete[..., None] * c
    return ((in_chosen | tail) & visible).unsqueeze(1)
