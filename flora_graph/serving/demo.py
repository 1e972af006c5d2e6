"""Demo adapters: one base :class:`~flora_graph.models.DemoNet` and adapted copies of it, each with its own rank.

Used by ``examples/serve_adapters.py``, the serving benchmarks and tests: the copies share
the base weights exactly and carry random, nonzero ``A`` and ``B`` (so each adapter
changes the output), which is what serving many adapters over one base model looks like.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter, apply_lora
from flora_graph.models.demo import DemoNet

__all__ = ["DEMO_TARGETS", "demo_adapter_models", "random_adapter"]

DEMO_TARGETS = ("conv1", "conv2", "fc_in", "fc_mid", "head")
"""The adapted layers of the demo model (every conv and linear layer)."""


def random_adapter(base: nn.Module, rank: int, *, seed: int, targets: Sequence[str] = DEMO_TARGETS,
                   std: float = 0.2) -> nn.Module:
    """A copy of ``base`` with rank-``rank`` LoRA (``alpha = 2 * rank``) on ``targets``, ``A`` and ``B`` ~ N(0, std²)."""
    model = copy.deepcopy(base)
    apply_lora(model, list(targets), rank=rank, alpha=2 * rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * std)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)
    return model.eval()


def demo_adapter_models(ranks: Sequence[int] = (2, 4, 8), *, seed: int = 0,
                        names: Sequence[str] | None = None) -> tuple[nn.Module, dict[str, nn.Module]]:
    """``(base, {name: adapted copy})``: a seeded ``DemoNet`` and one adapter per rank (names ``adapter0``, ...)."""
    names = list(names) if names is not None else [f"adapter{k}" for k in range(len(ranks))]
    if len(names) != len(ranks):
        raise ValueError(f"{len(names)} names for {len(ranks)} ranks")
    torch.manual_seed(seed)
    base = DemoNet().eval()
    return base, {n: random_adapter(base, r, seed=seed + 1 + k) for k, (n, r) in enumerate(zip(names, ranks, strict=True))}
