"""Kolibri 1.1's sparse attention indexer as one traceable computation over every query at once.

Each query of a sparse layer attends to its first ``num_sink_tokens`` and last ``num_local_tokens`` keys and to the
``topk`` best scoring keys of a pool; an indexer layer's pool is every key for a short context, else the blocks of
``compression`` keys whose averaged keys score best (``pool_size`` keys). transformers computes this per batch row,
per group of queries that share their first visible key, in Python loops over ``unique().tolist()`` and with
``topk(min(k, keys))``: data-dependent control flow that torch.export cannot trace.

:func:`pooled_indexer_forward` computes the same masks for every query in one pass:

- a query's positions count from its first visible key (``start``) as transformers' do, and a rule applies to the
  queries whose visible span (``length``) exceeds its budget, the others keeping every visible key, as there;
- the pool's blocks are aligned to the row's start (the last query's: the one that sees the most), their sums read
  off a cumulative sum over the row's keys shifted to start there, one block per key position (those past the last
  full block are never kept);
- ``top_k_mask`` runs on scores padded with ``k`` entries of ``-inf``, so ``topk`` takes ``k`` of any number of keys
  and, where fewer than ``k`` are finite, keeps every finite one, as ``topk(min(k, keys))`` does; ties go to the
  earlier key, as there.

The block alignment is the one assumption: every query of a row whose span exceeds the pool shares the row's
start (true of causal masks over left-padded rows, which is what the indexed layers get).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["is_pooled_indexer", "pooled_indexer_forward"]

_ATTRIBUTES = ("topk", "pool_size", "compression", "num_local_tokens", "num_sink_tokens", "is_pool_source", "num_heads")


def is_pooled_indexer(module: nn.Module) -> bool:
    """Kolibri 1.1's indexer: the attributes :data:`_ATTRIBUTES`, ``select_pool`` / ``select_tokens`` and the
    module's ``nvfp4_fake_quantize``."""
    return "forward" not in vars(module) and all(hasattr(module, a) for a in _ATTRIBUTES) \
        and all(callable(getattr(module, m, None)) for m in ("select_pool", "select_tokens", "score", "top_k_mask")) \
        and callable(getattr(sys.modules.get(type(module).__module__), "nvfp4_fake_quantize", None))


def _top_k_mask(module: nn.Module, scores: torch.Tensor, k: int) -> torch.Tensor:
    """``module.top_k_mask(scores, k)`` for any number of columns: the scores padded with ``k`` of ``-inf``."""
    padded = nn.functional.pad(scores, (0, k), value=float("-inf"))
    return module.top_k_mask(padded, k)[..., : scores.shape[-1]]


def _scores(module: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``module.score`` of each row: ``[batch, heads, queries, dim]`` against ``[batch, keys, dim]``, the heads' ReLU
    logits added in head order as it adds them."""
    keys_t = keys.transpose(1, 2)
    total = torch.zeros((), dtype=queries.dtype, device=queries.device)
    for h in range(queries.shape[1]):
        total = total + torch.matmul(queries[:, h], keys_t).relu()
    return total * module.head_weight


def _shifted(keys: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``keys[b, start[b] + j]`` at ``[b, j]`` (``[batch, keys, dim]``), zeros past the last key."""
    count = keys.shape[1]
    j = torch.arange(count, device=keys.device)
    at = start[:, None] + j[None, :]  # [batch, keys]
    inside = at < count
    gathered = keys.gather(1, at.clamp(max=count - 1)[..., None].expand(-1, -1, keys.shape[-1]))
    return gathered * inside[..., None]


def pooled_indexer_forward(module: nn.Module, path: str = "") -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``module``'s forward (see :func:`is_pooled_indexer`) for every query at once: ``(selected [batch, 1, queries,
    keys], pool [batch, queries, keys])``, the masks transformers' loops give."""
    quantize = sys.modules[type(module).__module__].nvfp4_fake_quantize

    def forward(query_states: torch.Tensor, key_states: torch.Tensor, attention_mask: torch.Tensor,
                index_pool: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        visible = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
        count = visible.shape[-1]
        starts = visible.int().argmax(-1)  # [batch, queries]
        ends = count - visible.flip(-1).int().argmax(-1)
        lengths = (ends - starts) * visible.any(-1)
        positions = torch.arange(count, device=visible.device)
        relative = positions - starts[..., None]  # [batch, queries, keys]: a key's place from the query's first
        routing_queries = quantize(query_states[:, : module.num_heads]).float()  # [batch, heads, queries, dim]
        if module.is_pool_source:
            index_pool = _pool(module, quantize, routing_queries, key_states, visible, starts, lengths, relative)
        routing_keys = quantize(key_states[:, 0]).float()  # [batch, keys, dim]
        scores = _scores(module, routing_queries, routing_keys)
        local_from = lengths[..., None] - module.num_local_tokens
        sinks = (relative >= 0) & (relative < module.num_sink_tokens)
        local = (relative >= local_from) & (relative < lengths[..., None])
        candidates = index_pool & ~sinks & (relative >= 0) & (relative < local_from)
        chosen = _top_k_mask(module, scores.masked_fill(~candidates, float("-inf")), module.topk)
        budget = module.topk + module.num_local_tokens + module.num_sink_tokens
        long_rows = (lengths > budget)[..., None]
        selected = torch.where(long_rows, (chosen | sinks | local) & visible, visible)
        return selected.unsqueeze(1), index_pool

    return forward


def _pool(module: nn.Module, quantize: Callable[[torch.Tensor], torch.Tensor], routing_queries: torch.Tensor,
          key_states: torch.Tensor, visible: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
          relative: torch.Tensor) -> torch.Tensor:
    """The pool of candidate keys ``[batch, queries, keys]`` (see the module docstring)."""
    c = module.compression
    count = visible.shape[-1]
    start = starts[:, -1]  # the row's start: its last query's, which sees the most
    unseen = ~visible.any(1)  # keys no query sees (padding) count as zeros in their block
    keys = _shifted(key_states[:, 0].masked_fill(unseen[..., None], 0.0).float(), start)  # [batch, keys, dim]
    block = torch.arange(count, device=keys.device)  # a block per key position, of which the full ones are used
    total = None
    for i in range(c):  # each block's keys added in order, as transformers sums a block
        at = (block * c + i).clamp(max=count - 1)
        part = keys.gather(1, at[None, :, None].expand(keys.shape[0], -1, keys.shape[-1]))
        total = part if total is None else total + part
    summaries = quantize(total / c)  # [batch, blocks, dim]
    scores = _scores(module, routing_queries, summaries)
    span = lengths[..., None]
    scores = torch.where(block < span // c, scores, 0.0)
    scores = scores.masked_fill(block >= (span + c - 1) // c, float("-inf"))
    chosen = _top_k_mask(module, scores, module.pool_size // c)  # [batch, queries, blocks]
    in_block = (relative.clamp(min=0) // c).clamp(max=count - 1)
    keep = chosen.gather(-1, in_block) & (relative >= 0)
    long_rows = (lengths > module.pool_size)[..., None]
    return torch.where(long_rows, keep & visible, visible)
