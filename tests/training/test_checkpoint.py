"""Resuming ``Flora``: bit-for-bit across a resample, by name, and clear errors for another model's state."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from flora_graph.flora import Flora, OptimizerError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        x = torch.randn(32, 16, generator=gen)
        out.append((x, x[:, :4].sin()))
    return out


def _steps(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def _make(model: nn.Module, named=None) -> Flora:
    return Flora(named if named is not None else model.named_parameters(), lr=1e-2, rank=4, kappa=3, weight_decay=1e-2)


@pytest.mark.parametrize("split", [2, 3, 4])  # before, exactly at, and after the resample at step 3
def test_resume_is_bit_for_bit_across_a_resample(tmp_path: Path, split: int):
    batches = _batches(8)
    ref = _model()
    ref_opt = _make(ref)
    _steps(ref, ref_opt, batches)

    first = _model()
    opt = _make(first)
    _steps(first, opt, batches[:split])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, path)

    ckpt = torch.load(path, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = _make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    _steps(resumed, opt2, batches[split:])
    for (name, a), b in zip(ref.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert int(opt2.state[resumed[0].weight]["resamples"]) == 2


def test_resume_into_a_reordered_optimizer_matches_by_name(tmp_path: Path):
    batches = _batches(6)
    ref = _model()
    ref_opt = _make(ref)
    _steps(ref, ref_opt, batches)

    first = _model()
    opt = _make(first)
    _steps(first, opt, batches[:4])
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = _make(resumed, list(reversed(list(resumed.named_parameters()))))
    opt2.load_state_dict(ckpt["opt"])
    _steps(resumed, opt2, batches[4:])
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_is_plain_and_keeps_seeds_and_steps():
    m = _model()
    opt = _make(m)
    _steps(m, opt, _batches(4))
    sd = opt.state_dict()
    st = sd["state"][0]
    assert st["step"].dtype == torch.int64 and int(st["step"]) == 4
    assert st["seed"].dtype == torch.int64 and int(st["resamples"]) == 1
    assert sd["param_groups"][0]["param_names"][0] == "0.weight"
    assert sd["flora"] == {"format": 1, "skipped_steps": 0}


def test_loaded_state_does_not_alias_the_dict():
    m = _model()
    opt = _make(m)
    _steps(m, opt, _batches(2))
    sd = copy.deepcopy(opt.state_dict())
    opt2 = _make(m)
    opt2.load_state_dict(sd)
    before = sd["state"][0]["exp_avg_c"].clone()
    _steps(m, opt2, _batches(1))
    assert torch.equal(sd["state"][0]["exp_avg_c"], before)


def test_options_are_restored_from_the_state_dict():
    m = _model()
    opt = _make(m)
    _steps(m, opt, _batches(1))
    opt.param_groups[0]["lr"] = 0.123
    opt2 = _make(m)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.123


# --------------------------------------------------------------------------- another model's state
def _trained_state() -> dict:
    m = _model()
    opt = _make(m)
    _steps(m, opt, _batches(1))
    return copy.deepcopy(opt.state_dict())


def test_state_of_a_model_with_other_names_raises_naming_the_parameter():
    other = nn.Sequential()
    other.add_module("enc", nn.Linear(16, 32))
    other.add_module("dec", nn.Linear(32, 16))
    opt = _make(other)
    with pytest.raises(OptimizerError, match=r"'enc\.weight'"):
        opt.load_state_dict(_trained_state())


def test_state_of_a_model_with_other_shapes_raises_naming_the_parameter():
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = _make(other)
    before = {id(p): dict(s) for p, s in opt.state.items()}
    with pytest.raises(OptimizerError, match=r"'0\.weight'.*\(64, 16\)"):
        opt.load_state_dict(_trained_state())
    assert {id(p): dict(s) for p, s in opt.state.items()} == before  # nothing was changed


def test_state_without_names_or_not_a_state_dict_raises():
    m = _model()
    plain = torch.optim.Adam(m.parameters())
    with pytest.raises(OptimizerError, match="param_names"):
        _make(m).load_state_dict(plain.state_dict())
    with pytest.raises(OptimizerError, match="not an optimizer state dict"):
        _make(m).load_state_dict({"weights": 1})


def test_state_with_other_options_raises():
    m = _model()
    sd = _trained_state()
    opt = Flora(m.named_parameters(), lr=1e-2, rank=4)
    sd["param_groups"][0]["second_moment"] = "adam"  # the saved tensors are factored
    with pytest.raises(OptimizerError, match=r"'0\.weight'.*exp_avg_sq"):
        opt.load_state_dict(sd)
