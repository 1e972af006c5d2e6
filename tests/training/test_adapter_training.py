"""``FloraAdapter.update_parameters``: momentum and second moment used, merge-before-resample, transfer, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flora_graph.adapters import FloraAdapter
from flora_graph.adapters.flora import next_projection_seed
from flora_graph.errors import AdapterError


def _nonzero_b(f: FloraAdapter, seed: int = 0) -> FloraAdapter:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        f.lora_B.copy_(torch.randn(f.lora_B.shape, generator=gen))
    return f


def _regression(seed: int = 1) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    gen = torch.Generator().manual_seed(seed)
    target = base.weight.detach() + 0.5 * torch.randn(8, 16, generator=gen)  # a full-rank change
    x = torch.randn(256, 16, generator=gen)
    return base, x, x @ target.T + base.bias.detach()


def _step(f: FloraAdapter, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    f.zero_grad()
    loss = (f(x) - y).square().mean()
    loss.backward()
    f.update_parameters(lr)
    return loss.item()


# --------------------------------------------------------------------------- resample
@pytest.mark.parametrize("base", [nn.Linear(12, 10), nn.Conv2d(3, 6, 3, padding=1)], ids=["linear", "conv"])
def test_output_is_unchanged_across_a_resample(base):
    torch.manual_seed(2)
    f = _nonzero_b(FloraAdapter(base, rank=3, alpha=6, seed=5))
    x = torch.randn(4, 12) if isinstance(base, nn.Linear) else torch.randn(2, 3, 7, 7)
    before, a_before, w_before = f(x).detach(), f.lora_A.detach().clone(), f.base_layer.weight.detach().clone()
    f.resample()
    torch.testing.assert_close(f(x), before, rtol=1e-5, atol=1e-5)
    assert f.seed == next_projection_seed(5)
    assert torch.count_nonzero(f.lora_B) == 0
    assert not torch.allclose(f.lora_A, a_before)
    torch.testing.assert_close(f.lora_A.detach(), f.projection(f.seed), rtol=0, atol=0)
    assert not torch.allclose(f.base_layer.weight, w_before)


def test_resample_every_interval_steps_and_output_continuity():
    base, x, y = _regression()
    f = FloraAdapter(base, rank=2, resampling_interval=3, seed=1)
    seeds = []
    for _ in range(6):
        _step(f, x, y, 0.01)
        seeds.append(f.seed)
    assert f.current_step == 6
    assert seeds[0] == seeds[1] == 1 and seeds[2] == seeds[3] == seeds[4] == next_projection_seed(1)
    assert seeds[5] == next_projection_seed(seeds[4])


def test_momentum_is_transferred_with_the_right_matrix():
    base, x, y = _regression()
    f = FloraAdapter(base, rank=2, resampling_interval=100, seed=1)
    for _ in range(3):
        _step(f, x, y, 0.01)
    m = f.training_state()["momentum"]
    a_old = f.lora_A.detach().clone()
    f.resample()
    a_new = f.lora_A.detach()
    # decompress with the old projection (M @ A_old, out x in), compress with the new (@ A_new^T)
    torch.testing.assert_close(f.training_state()["momentum"], (m @ a_old) @ a_new.T, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(f.training_state()["momentum"], m @ a_new @ a_old.T, atol=1e-4)


# --------------------------------------------------------------------------- the update uses the moments
def test_update_uses_momentum_and_second_moment():
    base, x, y = _regression()
    f = FloraAdapter(base, rank=2, momentum_decay=0.8, second_moment_decay=0.9, resampling_interval=100)
    m = torch.zeros(8, 2)
    v = torch.zeros(8)
    b = torch.zeros(8, 2)
    for t in (1, 2, 3):
        f.zero_grad()
        (f(x) - y).square().mean().backward()
        g = f.lora_B.grad.detach().clone()
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * g.square().mean(dim=1)
        b = b - 0.01 * (m / (1 - 0.8**t)) / ((v / (1 - 0.9**t)).sqrt() + 1e-8).unsqueeze(1)
        f.update_parameters(0.01)
        torch.testing.assert_close(f.lora_B.detach(), b, rtol=1e-5, atol=1e-7)
    assert f.current_step == 3


def test_without_adaptive_lr_the_update_is_bias_corrected_momentum():
    base, x, y = _regression()
    f = FloraAdapter(base, rank=2, momentum_decay=0.5, use_adaptive_lr=False, resampling_interval=100)
    f.zero_grad()
    (f(x) - y).square().mean().backward()
    g = f.lora_B.grad.detach().clone()
    f.update_parameters(0.1)
    torch.testing.assert_close(f.lora_B.detach(), -0.1 * g)
    assert f.training_state()["second_moment"].abs().sum() == 0  # not used, not updated


def test_trains_a_full_rank_regression_beyond_a_fixed_projection():
    base, x, y = _regression()
    f = FloraAdapter(base, rank=4, resampling_interval=20, seed=3)
    losses = [_step(f, x, y, 0.02) for _ in range(300)]
    assert losses[-1] < 0.1 * losses[0]
    base2, _, _ = _regression()
    fixed = FloraAdapter(base2, rank=4, resampling_interval=10**6, seed=3)  # never resamples: plain LoRA
    fixed_losses = [_step(fixed, x, y, 0.02) for _ in range(300)]
    assert losses[-1] < 0.5 * fixed_losses[-1]  # resampling lets the update's rank grow


# --------------------------------------------------------------------------- resume, errors
def test_resume_from_module_and_training_state_is_bit_for_bit(tmp_path: Path):
    base, x, y = _regression()
    ref = FloraAdapter(base, rank=2, resampling_interval=4, seed=2)
    for _ in range(10):
        _step(ref, x, y, 0.01)

    base, x, y = _regression()
    f = FloraAdapter(base, rank=2, resampling_interval=4, seed=2)
    for _ in range(5):
        _step(f, x, y, 0.01)
    torch.save({"module": f.state_dict(), "train": f.training_state()}, tmp_path / "a.pt")
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    base, x, y = _regression()
    g = FloraAdapter(base, rank=2, resampling_interval=4, seed=2)
    g.load_state_dict(ckpt["module"])
    g.load_training_state(ckpt["train"])
    for _ in range(5):
        _step(g, x, y, 0.01)
    assert g.current_step == 10 and g.seed == ref.seed
    for a, b in zip(ref.state_dict().values(), g.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_use_raises_naming_the_module_and_changes_nothing():
    base, x, y = _regression()
    f = FloraAdapter(base, rank=2, module_name="ffn.up")
    with pytest.raises(AdapterError, match=r"'ffn\.up'.*backward"):
        f.update_parameters(0.1)
    (f(x) - y).square().mean().backward()
    with pytest.raises(AdapterError, match="lr"):
        f.update_parameters(-1.0)
    with pytest.raises(AdapterError, match="lr"):
        f.update_parameters(math.nan)
    f.lora_B.grad[0, 0] = math.inf
    b = f.lora_B.detach().clone()
    with pytest.raises(AdapterError, match=r"'ffn\.up'.*non-finite"):
        f.update_parameters(0.1)
    assert torch.equal(f.lora_B, b) and f.current_step == 0
    with pytest.raises(AdapterError, match="momentum"):
        f.load_training_state({"seed": 1, "current_step": 0, "momentum": torch.zeros(3, 3), "second_moment": None})


def test_unfrozen_base_takes_an_sgd_step():
    base, x, y = _regression()
    f = FloraAdapter(base, rank=2, freeze_base=False)
    f.zero_grad()
    (f(x) - y).square().mean().backward()
    w, g = base.weight.detach().clone(), base.weight.grad.clone()
    f.update_parameters(0.1)
    torch.testing.assert_close(base.weight.detach(), w - 0.1 * g)


def test_conv_adapter_trains_across_resamples():
    torch.manual_seed(3)
    # a transfer multiplies the momentum's norm by about sqrt(fan_in / r) (fresh noise, unbiased),
    # so the interval must let it decay: momentum_decay ** interval * sqrt(27 / 2) < 1
    f = FloraAdapter(nn.Conv2d(3, 6, 3, padding=1), rank=2, resampling_interval=15, seed=4)
    teacher = nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    y = teacher(x).detach()
    losses = [_step(f, x, y, 0.01) for _ in range(45)]
    assert f.current_step == 45 and f.seed == next_projection_seed(next_projection_seed(next_projection_seed(4)))
    assert f.training_state()["momentum"].shape == (6, 2)
    assert losses[-1] < 0.9 * losses[0]
