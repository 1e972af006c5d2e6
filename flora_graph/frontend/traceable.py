"""Forms of Hugging Face models that ``torch.export`` cannot trace, swapped for equal ones while capturing.

* **Mixture-of-experts** (Mixtral, Qwen2-MoE, ...): transformers' default experts implementation,
  ``grouped_mm``, sorts tokens by expert with ``histc`` and calls a custom op
  (``transformers.grouped_mm_fallback``) that no exporter converts. Its ``batched_mm``
  implementation computes the same outputs with batched matrix products over the selected
  experts, which torch.export traces; :func:`traceable_experts` selects it for the capture and
  restores the model's choice after. (``eager`` loops over the experts present in the batch, a
  data-dependent loop torch.export refuses.)
* **PEFT LoRA on** ``nn.MultiheadAttention``: PEFT merges the adapter into a plain tensor for each
  call, which torch.export refuses ("a fake tensor in the exported program constant's list").
  :func:`merged_peft_attention` merges those layers for the capture, so they are captured merged
  (their adapter baked into ``in_proj_weight`` / ``out_proj.weight``; the graph has no LoRA site
  for them), and puts the original parameters back, bit for bit, after.

Mamba-1's selective scan (a Python loop over positions) has its own module,
:mod:`~flora_graph.frontend.selective_scan`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

__all__ = ["TRACEABLE_EXPERTS", "merged_peft_attention", "traceable_experts"]

TRACEABLE_EXPERTS = "batched_mm"
_UNTRACEABLE = {None, "grouped_mm", "eager"}


@contextlib.contextmanager
def traceable_experts(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every experts module of ``model`` whose implementation torch.export cannot
    trace runs ``batched_mm``; yields the paths of the modules switched. Restored on exit."""
    experts = [(path, module.config) for path, module in model.named_modules()
               if hasattr(module, "_apply_gate") and hasattr(type(getattr(module, "config", None)), "_experts_implementation")]
    originals = {id(cfg): (cfg, getattr(cfg, "_experts_implementation_internal", None)) for _, cfg in experts}
    paths = [path for path, cfg in experts if originals[id(cfg)][1] in _UNTRACEABLE]
    changed = [(cfg, was) for cfg, was in originals.values() if was in _UNTRACEABLE]
    for cfg, _ in changed:
        cfg._experts_implementation_internal = TRACEABLE_EXPERTS
    try:
        yield paths
    finally:
        for cfg, was in changed:
            cfg._experts_implementation_internal = was


@contextlib.contextmanager
def merged_peft_attention(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every PEFT LoRA ``MultiheadAttention`` of ``model`` that is not merged is merged;
    yields their paths. On exit they are unmerged and their original parameters restored exactly."""
    saved = []
    for path, module in model.named_modules():
        if type(module).__name__ != "MultiheadAttention" or not hasattr(module, "lora_A") or getattr(module, "merged", True):
            continue
        base = module.get_base_layer()
        out_base = base.out_proj.get_base_layer()
        saved.append((path, module, base, base.in_proj_weight, out_base, out_base.weight))
    try:
        for _, module, *_ in saved:
            module.merge()
        yield [s[0] for s in saved]
    finally:
        for _, module, base, w_in, out_base, w_out in saved:
            if module.merged:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module.unmerge()  # PEFT's bookkeeping; then the original parameters, not a subtraction's result
            del base.in_proj_weight
            base.register_parameter("in_proj_weight", w_in)
            del out_base.weight
            out_base.register_parameter("weight", w_out)
