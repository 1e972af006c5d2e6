"""Causal LMs whose own forward keeps its recurrent states outside a transformers cache, and the forward (with its
cache) that keeps them in one instead: RWKV (:mod:`~flora_graph.frontend.rwkv`) and xLSTM
(:mod:`~flora_graph.frontend.xlstm`). The cache export calls that forward in place of the class's
(:mod:`~flora_graph.frontend.causal_lm`), and :func:`~flora_graph.frontend.traceable.traceable_modules` swaps it in
for a capture without the cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from flora_graph.frontend.rwkv import is_rwkv_lm, rwkv_cache, rwkv_forward
from flora_graph.frontend.xlstm import is_xlstm_lm, xlstm_cache, xlstm_forward

__all__ = ["STATE_FORWARDS", "StateForward", "state_forward"]


class StateForward(NamedTuple):
    """Which models (``picks``), the forward for one (``forward(model)``) and its empty cache (``cache(model)``)."""

    picks: Callable[[nn.Module], bool]
    forward: Callable[[nn.Module], Callable[..., Any]]
    cache: Callable[[nn.Module], Any]


STATE_FORWARDS = (StateForward(is_rwkv_lm, rwkv_forward, rwkv_cache),
                  StateForward(is_xlstm_lm, xlstm_forward, xlstm_cache))


def state_forward(model: nn.Module) -> StateForward | None:
    """The entry of :data:`STATE_FORWARDS` that picks ``model``, or ``None``."""
    return next((entry for entry in STATE_FORWARDS if entry.picks(model)), None)
