"""Seeded nonzero LoRA weights for the built-in models (a zero ``B`` would make every check trivial)."""

from __future__ import annotations

import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter

__all__ = ["seed_lora_b"]


def seed_lora_b(model: nn.Module, seed: int, std: float) -> nn.Module:
    """Fill every adapter's ``B`` with ``N(0, std^2)`` from a generator seeded by ``seed``, in module order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)
    return model
