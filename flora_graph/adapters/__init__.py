"""Adapters: ``LoRAAdapter``, ``FloraAdapter`` and the helpers that install and merge them."""

from __future__ import annotations

from flora_graph.adapters.apply import adapters_of, apply_lora, match_target, merge_all, unload_all
from flora_graph.adapters.flora import FloraAdapter
from flora_graph.adapters.lora import SUPPORTED_BASE_LAYERS, LoRAAdapter

__all__ = [
    "SUPPORTED_BASE_LAYERS",
    "FloraAdapter",
    "LoRAAdapter",
    "adapters_of",
    "apply_lora",
    "match_target",
    "merge_all",
    "unload_all",
]
