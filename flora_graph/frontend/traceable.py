"""Forms of Hugging Face models that ``torch.export`` cannot trace, swapped for equal ones while capturing.

* **Mixture-of-experts** (Mixtral, Qwen2-MoE, ...): transformers' default experts implementation,
  ``grouped_mm``, sorts tokens by expert with ``histc`` and calls a custom op
  (``transformers.grouped_mm_fallback``) that no exporter converts. Its ``batched_mm``
  implementation computes the same outputs with batched matrix products over the selected
  experts, which torch.export traces; :func:`traceable_experts` selects it for the capture and
  restores the model's choice after. (``eager`` loops over the experts present in the batch, a
  data-dependent loop torch.export refuses.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["TRACEABLE_EXPERTS", "traceable_experts"]

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
