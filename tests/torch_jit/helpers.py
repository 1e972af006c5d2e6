"""Models shared by the jit tests: seeded, adapted, nonzero LoRA ``B`` (merges are not trivial)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter, apply_lora
from flora_graph.models import build_mlp_stack

ORT = {"intra_op_threads": 1, "allow_spinning": False}
"""onnxruntime options of the JIT tests: one thread, no spinning."""

ATOL, RTOL = 1e-5, 1e-4
aten = torch.ops.aten


def adapted_stack(seed: int, layers: int = 2, width: int = 16, hidden: int = 24, rank: int = 4) -> nn.Module:
    """A small :class:`MLPStack` with LoRA on every projection and a random nonzero ``B`` per seed."""
    model = build_mlp_stack(layers=layers, width=width, hidden=hidden, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
    return model.eval()


class AdaptedLinear(nn.Module):
    """One ``nn.Linear`` with a LoRA adapter (nonzero ``B``)."""

    def __init__(self, d_in: int = 8, d_out: int = 6, rank: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d_in, d_out)
        apply_lora(self, ["proj"], rank=rank, alpha=2 * rank)
        with torch.no_grad():
            self.proj.lora_B.normal_()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Branchy(nn.Module):
    """A Python branch on a tensor value: a graph break under torch.compile, unexportable by torch.export."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        apply_lora(self, ["fc", "head"], rank=2)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, LoRAAdapter):
                    m.lora_B.normal_()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if x.sum() > 0:
            return self.head(torch.relu(h))
        return self.head(h) * 2.0 - 1.0


class TwoHeads(nn.Module):
    """A tuple output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.trunk = nn.Linear(6, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return self.a(h), torch.softmax(self.b(h), dim=-1)


def unsupported_op() -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """An elementwise torch function whose ATen op the capture table lacks, and that op's name.

    Picked at run time from a few exotic ones, since the op set keeps growing.
    """
    from flora_graph.frontend.aten import ATEN_TABLE

    for fn, op in [(torch.lgamma, aten.lgamma.default), (torch.special.erfinv, aten.erfinv.default),
                   (torch.digamma, aten.digamma.default), (torch.special.i0, aten.i0.default)]:
        if op not in ATEN_TABLE:
            return fn, str(op)
    raise AssertionError("every candidate op is supported now: pick another for the fallback tests")


class Exotic(nn.Module):
    """A linear followed by an op outside the op set (:func:`unsupported_op`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.fc = nn.Linear(5, 5)
        self.op, self.op_name = unsupported_op()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(torch.sigmoid(self.fc(x)) + 0.5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Values and shape, with the package's float32 tolerances."""
    assert isinstance(actual, torch.Tensor)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
