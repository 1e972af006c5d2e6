"""The embedded default model of ``flora-graph demo``: a small CNN block feeding an MLP.

It needs no download and exercises most of the op set: convolutions (stride, padding),
ReLU/GELU/SiLU, flatten, Linear, LayerNorm, a residual add and a softmax head.
"""

from __future__ import annotations

import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter, apply_lora
from flora_graph.models.seeding import seed_lora_b

__all__ = ["DemoNet", "build_demo_model", "demo_inputs"]


class DemoNet(nn.Module):
    """``[batch, 3, 16, 16]`` images -> ``[batch, classes]`` probabilities."""

    def __init__(self, channels: int = 8, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.fc_in = nn.Linear(2 * channels * 8 * 8, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc_mid = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(image))
        h = nn.functional.gelu(self.conv2(h))
        h = self.norm(self.fc_in(h.flatten(1)))
        h = h + nn.functional.silu(self.fc_mid(h))
        return torch.softmax(self.head(h), dim=-1)


def build_demo_model(rank: int = 4, seed: int = 0, adapter_cls: type[LoRAAdapter] = LoRAAdapter) -> nn.Module:
    """``DemoNet`` with LoRA on every conv and linear layer and a nonzero, seeded ``B``."""
    torch.manual_seed(seed)
    model = DemoNet()
    apply_lora(model, ["conv1", "conv2", "fc_in", "fc_mid", "head"], rank=rank, alpha=2 * rank, adapter_cls=adapter_cls)
    seed_lora_b(model, seed + 1, 0.05)
    return model.eval()


def demo_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded example inputs for :class:`DemoNet`."""
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, 16, 16, generator=gen)}
