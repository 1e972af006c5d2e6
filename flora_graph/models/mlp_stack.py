"""A deep stack of adapted projections: the compiler's scale test.

Each block has seven projections with a transformer's names (``q``, ``k``, ``v``, ``o``,
``gate``, ``up``, ``down``) in an attention-free mixer and a gated MLP, so 32 blocks carry
224 adapters. Sibling projections (q/k/v, gate/up) read one input, as in a transformer.
"""

from __future__ import annotations

import torch
from torch import nn

from flora_graph.adapters import apply_lora
from flora_graph.models.seeding import seed_lora_b

__all__ = ["PROJECTIONS", "MLPStack", "build_mlp_stack"]

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.gate = nn.Linear(width, hidden)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mixed = self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)
        h = h + self.o(mixed)
        return h + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class MLPStack(nn.Module):
    """``layers`` blocks of seven projections over ``[batch, width]`` inputs."""

    def __init__(self, layers: int = 32, width: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_mlp_stack(layers: int = 32, width: int = 128, hidden: int = 256, rank: int = 8, seed: int = 0) -> nn.Module:
    """An :class:`MLPStack` with LoRA on all seven projections of every block (nonzero ``B``)."""
    torch.manual_seed(seed)
    model = MLPStack(layers, width, hidden)
    with torch.no_grad():  # keep activations bounded through a deep residual stack
        for p in model.parameters():
            p.mul_(0.1)
    apply_lora(model, list(PROJECTIONS), rank=rank, alpha=2 * rank)
    seed_lora_b(model, seed + 1, 0.01)
    return model.eval()
