"""PEFT LoRA on nn.MultiheadAttention (captured merged) and on Conv1d over a dynamic length; PEFT's other tuners,
as PEFT runs them or (HRA, SHiRA, BOFT, C3A) merged."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from torch import nn

from flora_graph.frontend import capture
from flora_graph.passes import optimize
from flora_graph.runtimes import compile

DIMS = {"x": {0: "batch", 1: "seq"}}


class Block(nn.Module):
    def __init__(self, padding: int = 1) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv1d(16, 16, 3, padding=padding)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.out(self.conv(y.transpose(1, 2)).transpose(1, 2))


def adapted(targets: list[str], padding: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = peft.get_peft_model(Block(padding), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            for b in getattr(module, "lora_B", {}).values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.3)
    return model.eval()


def _check(model: nn.Module, graph, shapes=((3, 7), (1, 4))) -> None:
    for backend in ("numpy", "onnxruntime", "torchscript"):
        exe = compile(graph, backend)
        for b, s in shapes:
            x = torch.randn(b, s, 16, generator=torch.Generator().manual_seed(s))
            with torch.no_grad():
                want = model(x).numpy()
            got = next(iter(exe(x=x.numpy()).values()))
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"{backend} at {(b, s)}")


def test_lora_on_multihead_attention_is_captured_merged_and_the_model_is_restored() -> None:
    model = adapted(["attn", "conv"])
    mha = model.base_model.model.attn
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    graph = capture(model, torch.randn(2, 5, 16), DIMS)
    assert not mha.merged
    assert isinstance(mha.get_base_layer().in_proj_weight, nn.Parameter)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit, not W + BA - BA
    sites = {n.meta.get("module") for n in graph.nodes if n.meta.get("role") == "lora_down"}
    assert sites == {"conv"}  # the attention's adapter is baked in; the conv's stays a LoRA site
    _check(model, graph)
    _check(model, optimize(graph, "fused"))
    _check(model, optimize(graph, "merged"))


@pytest.mark.parametrize("padding", [1, 0])  # same length, and a valid conv: seq - 2
def test_conv1d_lora_over_a_dynamic_length(padding: int) -> None:
    model = adapted(["conv"], padding)
    graph = capture(model, torch.randn(2, 5, 16), DIMS)
    assert graph.outputs[next(iter(graph.outputs))].shape[1] == ("seq" if padding else "seq-2")
    _check(model, graph)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


TUNERS = {  # PEFT tuners whose adapted layers torch.export, or the ATen table, cannot take unmerged
    "hra": lambda: peft.HRAConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "shira": lambda: peft.ShiraConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["up", "down"], init_weights=False),
    "c3a": lambda: peft.C3AConfig(block_size=8, target_modules=["up", "down"], init_weights=False),
}


def tuned(config: peft.PeftConfig) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """:class:`Mlp` adapted by ``config``, every adapter weight nonzero, in eval mode; an input and its output, which
    the adapter changes (checked)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Mlp(), config).eval()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.1)
        want = model(x)
        with model.disable_adapter():
            assert not torch.allclose(model(x), want, atol=1e-4)
    return model, x, want


@pytest.mark.parametrize("tuner", sorted(TUNERS))
def test_untraceable_tuner_layers_are_captured_merged_and_the_model_is_restored(tuner: str) -> None:
    model, x, want = tuned(TUNERS[tuner]())
    before = {k: (v, v.detach().clone()) for k, v in model.named_parameters()}
    graph = capture(model, torch.randn(2, 5, 16), DIMS)
    after = dict(model.named_parameters())
    assert all(after[k] is p and torch.equal(p, data) for k, (p, data) in before.items())  # the same tensors, untouched
    assert not any(getattr(m, "merged", False) for m in model.modules())
    _check(model, graph)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # the adapter still applies in eager


TRACED_TUNERS = {  # PEFT tuners other than LoRA whose layers capture as PEFT runs them
    "adalora": lambda: peft.AdaLoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False, total_step=10),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "ia3": lambda: peft.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"], init_ia3_weights=False),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["up", "down"], init_weights=False),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=16, target_modules=["up", "down"], init_weights=False),
    "randlora": lambda: peft.RandLoraConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "miss": lambda: peft.MissConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "vblora": lambda: peft.VBLoRAConfig(r=4, target_modules=["up", "down"], vector_length=8, num_vectors=16),
    "delora": lambda: peft.DeloraConfig(r=4, target_modules=["up", "down"], init_weights=False),
    "road": lambda: peft.RoadConfig(group_size=8, target_modules=["up", "down"], init_weights=False),
}


@pytest.mark.parametrize("tuner", sorted(TRACED_TUNERS))
def test_other_tuners_capture_as_peft_runs_them(tuner: str) -> None:
    model, _, _ = tuned(TRACED_TUNERS[tuner]())
    _check(model, capture(model, torch.randn(2, 5, 16), DIMS))
