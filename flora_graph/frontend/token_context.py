"""Token ids kept in a recurrent cache state, as float states of token id + 1.

Qwen4-Exp's per-layer embeddings (PLE) hash each token's n-grams, reading the last ``ngram_size - 1`` tokens of the
sequence so far from a convolution state of its cache that holds token ids (``int64``), end-of-text ids where no token
came before. A package's recurrent states are float inputs and outputs, zeros for an empty cache (what ONNX Runtime
GenAI and the :class:`~flora_graph.serving.generate.Generator` give a new row), so while capturing, the module reads
and writes such a state through :class:`TokenStates`: a float state holds token id + 1, 0 standing for no token,
which reads as end-of-text, the module's own filler. Exact while ids are below 2**24, float32's whole numbers
(:func:`token_context_forward` refuses a vocabulary past that).

Its n-grams restart after each end-of-text token: transformers finds the last one before each position by a ``cummax``
over the history, which a graph of a dynamic length runs as a doubling scan of 31 steps. The swap asks instead
whether one of the ``shift`` tokens before a position is end-of-text (``shift`` shifted comparisons, ``shift`` below
the n-gram size): the same tokens, a few nodes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.errors import GraphError

__all__ = ["TokenStates", "is_token_context_embedding", "token_context_forward"]

EXACT_IDS = 2**24
"""Token ids below this are whole float32 numbers (with the + 1 of :class:`TokenStates`, ids below ``EXACT_IDS - 1``)."""


def is_token_context_embedding(module: nn.Module) -> bool:
    """Qwen4-Exp's n-gram embedding: an ``int`` ``context_len``, ``eos_token_id`` and ``unigram_vocab_size``, an
    ``ngram_embedding`` and a forward of ``(input_ids, cache)``."""
    if "forward" in vars(module) or not isinstance(getattr(module, "ngram_embedding", None), nn.Embedding):
        return False
    if not all(isinstance(getattr(module, a, None), int) for a in ("context_len", "eos_token_id", "unigram_vocab_size")):
        return False
    return list(inspect.signature(type(module).forward).parameters)[1:3] == ["input_ids", "cache"]


class TokenStates:
    """``cache`` (a transformers cache) as a module that keeps token ids in its convolution states sees it: the conv
    states it reads are the float states decoded (``id + 1``, 0 for no token, read as ``filler``), those it writes
    encoded; the rest of the cache as it is."""

    def __init__(self, cache: Any, filler: int) -> None:
        self._cache, self._filler = cache, filler

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        state = self._cache.get_conv_state(layer_idx, state_idx=state_idx)
        if state is None:
            return None
        ids = state.round().long() - 1
        return torch.where(ids < 0, torch.full_like(ids, self._filler), ids)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: Any) -> Any:
        return self._cache.update_conv_state((conv_states + 1).float(), layer_idx, state_idx=state_idx, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def token_context_forward(module: nn.Module, path: str = "") -> Callable[..., torch.Tensor]:
    """``module``'s forward (see :func:`is_token_context_embedding`) with its cache seen through
    :class:`TokenStates` and its n-grams' restarts found without a scan (see the module docstring). Raises
    :class:`GraphError` naming ``path`` where its vocabulary has ids that float32 does not hold exactly."""
    if module.unigram_vocab_size >= EXACT_IDS - 1 or module.eos_token_id >= EXACT_IDS - 1:
        raise GraphError(f"{path or type(module).__name__}: a vocabulary of {module.unigram_vocab_size} ids, past the "
                         f"{EXACT_IDS - 1} that a float32 cache state holds exactly")

    eos = module.eos_token_id
    own_shift = callable(getattr(type(module), "_shift_right_ignore_eos", None))

    def shift_right(token_ids: torch.Tensor, shift: int, **_: Any) -> torch.Tensor:
        """``token_ids`` shifted right by ``shift`` within the runs between end-of-text tokens, end-of-text where the
        run (or the history) starts less than ``shift`` tokens before."""
        if shift == 0:
            return token_ids
        count = token_ids.shape[1]
        is_eos = (token_ids == eos).long()
        near = torch.zeros_like(is_eos)
        for k in range(1, shift + 1):  # an end-of-text token k places before
            near = near + F.pad(is_eos, (k, 0))[:, :count]
        shifted = F.pad(token_ids, (shift, 0), value=eos)[:, :count]
        return torch.where(near == 0, shifted, torch.full_like(token_ids, eos))

    def forward(input_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> torch.Tensor:
        seen = cache if cache is None else TokenStates(cache, eos)
        if own_shift:  # an instance attribute over the class's cummax, for this call
            module._shift_right_ignore_eos = shift_right
        try:
            return type(module).forward(module, input_ids, seen, **kwargs)
        finally:
            if own_shift:
                del module._shift_right_ignore_eos

    return forward
