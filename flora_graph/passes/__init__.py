"""Passes: one module per pass, ``Pipeline``, rules as data, and ``optimize`` with its presets.

Every pass is registered by name in :data:`PASSES` when this package is imported::

    from flora_graph.passes import optimize
    fast = optimize(graph, "fused")      # adapters separate and swappable
    baked = optimize(graph, "merged")    # adapters merged into the base weights
    served = optimize(graph, "fused", slots="swappable")  # adapter slots: weights are graph inputs
"""

from __future__ import annotations

# importing the pass modules registers them
from flora_graph.passes import (  # noqa: F401
    adapter_slots,
    constant_fold,
    cse,
    dce,
    drop_zero_lora,
    fold_lora_scale,
    fuse_base_and_down,
    fuse_kv_attention,
    fuse_lora_siblings,
    fuse_rms_norm,
    fuse_rotary,
    fuse_sink_attention,
    fuse_softcap_attention,
    group_experts,
    merge_lora,
    pack_linears,
    pack_slots,
    reassociate_low_rank,
    share_kv_heads,
    simplify,
)
from flora_graph.passes.base import PASSES, PassError, PassFn, PassResult, get_pass, register_pass
from flora_graph.passes.lora_pattern import LoRAMatch, find_lora
from flora_graph.passes.optimize import BACKEND_DEFAULTS, PRESET_OPTIONS, PRESETS, optimize, optimize_with_report
from flora_graph.passes.pipeline import PassRecord, Pipeline, PipelineReport
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = [
    "BACKEND_DEFAULTS",
    "PASSES",
    "PRESETS",
    "PRESET_OPTIONS",
    "LoRAMatch",
    "Match",
    "MatchResult",
    "PassError",
    "PassFn",
    "PassRecord",
    "PassResult",
    "Pat",
    "Pipeline",
    "PipelineReport",
    "Rule",
    "RuleSet",
    "find_lora",
    "get_pass",
    "optimize",
    "optimize_with_report",
    "register_pass",
]
