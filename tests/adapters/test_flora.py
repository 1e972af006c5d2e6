"""FloraAdapter: the seeded projection, the LoRA forward/merge contract, constructor validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.adapters import FloraAdapter, LoRAAdapter, apply_lora
from flora_graph.errors import AdapterError


def _nonzero(adapter: LoRAAdapter, seed: int = 0) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen).to(adapter.lora_B.dtype))
    return adapter


def _expected_projection(rank: int, fan_in: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rank, fan_in, generator=gen) / math.sqrt(rank)


# --------------------------------------------------------------------------- projection
def test_is_a_lora_adapter_with_defaults():
    f = FloraAdapter(nn.Linear(8, 6), rank=2)
    assert isinstance(f, LoRAAdapter)
    assert f.resampling_interval == 1000
    assert f.current_step == 0
    assert f.seed == 42
    assert f.momentum_decay == pytest.approx(0.9)
    assert f.second_moment_decay == pytest.approx(0.999)
    assert f.use_adaptive_lr is True
    assert f.is_base_frozen
    assert f.scaling == 1.0


def test_properties_follow_arguments():
    f = FloraAdapter(
        nn.Linear(8, 6),
        rank=2,
        alpha=8,
        resampling_interval=7,
        momentum_decay=0.0,
        second_moment_decay=0.5,
        use_adaptive_lr=False,
        freeze_base=False,
        seed=3,
    )
    assert (f.resampling_interval, f.current_step, f.seed) == (7, 0, 3)
    assert f.scaling == 4.0
    assert f.momentum_decay == 0.0 and f.second_moment_decay == 0.5 and f.use_adaptive_lr is False
    assert not f.is_base_frozen
    assert all(p.requires_grad for p in f.base_layer.parameters())


def test_a_is_the_seeded_projection_and_b_is_zero():
    torch.manual_seed(0)  # the global RNG must not matter
    f = FloraAdapter(nn.Linear(12, 10), rank=3, seed=7)
    torch.testing.assert_close(f.lora_A.detach(), _expected_projection(3, 12, 7), rtol=0, atol=0)
    torch.testing.assert_close(f.projection(7), f.lora_A.detach(), rtol=0, atol=0)
    assert torch.count_nonzero(f.lora_B) == 0


def test_same_seed_same_a_different_seed_different_a():
    torch.manual_seed(1)
    a = FloraAdapter(nn.Linear(12, 10), rank=3, seed=5)
    torch.manual_seed(2)
    b = FloraAdapter(nn.Linear(12, 10), rank=3, seed=5)
    c = FloraAdapter(nn.Linear(12, 10), rank=3, seed=6)
    assert torch.equal(a.lora_A, b.lora_A)
    assert not torch.allclose(a.lora_A, c.lora_A)
    # and it is not LoRA's kaiming init
    d = LoRAAdapter(nn.Linear(12, 10), rank=3)
    assert not torch.allclose(a.lora_A, d.lora_A)


def test_conv_projection_shape_and_values():
    f = FloraAdapter(nn.Conv2d(3, 8, 3), rank=4, seed=11)
    assert f.lora_A.shape == (4, 3, 3, 3)
    assert f.lora_B.shape == (8, 4, 1, 1)
    torch.testing.assert_close(f.lora_A.detach().flatten(1), _expected_projection(4, 27, 11), rtol=0, atol=0)


def test_projection_entries_are_normal_with_variance_one_over_rank():
    rank = 16
    f = FloraAdapter(nn.Linear(4096, 64), rank=rank, seed=123)
    a = f.lora_A.detach().double()
    n = a.numel()  # 65,536 samples
    var = a.var().item()
    # std error of the sample variance is ~ var * sqrt(2 / n) ~ 0.35%; allow 5%
    assert abs(var - 1 / rank) < 0.05 / rank
    assert abs(a.mean().item()) < 5 / math.sqrt(rank * n)
    # normal, not uniform: about 68.3% of the entries lie within one standard deviation
    inside = (a.abs() < 1 / math.sqrt(rank)).double().mean().item()
    assert 0.66 < inside < 0.71
    # a kaiming-uniform A of this layer would have variance 1 / (3 * 4096): far smaller
    assert var > 100 / (3 * 4096)


def test_projection_dtype_follows_base():
    f = FloraAdapter(nn.Linear(16, 8).half(), rank=2, seed=3)
    assert f.lora_A.dtype == torch.float16
    torch.testing.assert_close(f.lora_A, _expected_projection(2, 16, 3).half(), rtol=0, atol=0)


# --------------------------------------------------------------------------- forward / merge
def test_forward_linear_matches_formula():
    torch.manual_seed(3)
    f = _nonzero(FloraAdapter(nn.Linear(10, 6), rank=3, alpha=12))
    x = torch.randn(2, 4, 10)
    want = f.base_layer(x) + 4.0 * (x @ f.lora_A.T @ f.lora_B.T)
    torch.testing.assert_close(f(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 6])
def test_merge_linear_equals_unmerged(rank):
    torch.manual_seed(4)
    f = _nonzero(FloraAdapter(nn.Linear(10, 6), rank=rank, alpha=16))
    x = torch.randn(5, 10)
    merged = f.merge_to_original_layer()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), f(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged.weight, f.base_layer.weight, atol=1e-4)


def test_forward_and_merge_conv():
    torch.manual_seed(5)
    f = _nonzero(FloraAdapter(nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2), rank=2))
    x = torch.randn(2, 3, 11, 10)
    base = f.base_layer
    w = base.weight.detach().double()
    delta = (f.lora_B.detach().double().flatten(1) @ f.lora_A.detach().double().flatten(1)).reshape(w.shape)
    want = F.conv2d(
        x.double(), w + f.scaling * delta, base.bias.detach().double(), base.stride, base.padding, base.dilation
    )
    torch.testing.assert_close(f(x).double(), want, rtol=1e-4, atol=1e-4)
    merged = f.merge_to_original_layer()
    assert type(merged) is nn.Conv2d
    torch.testing.assert_close(merged(x), f(x), rtol=1e-4, atol=1e-4)


def test_parameters_round_trip():
    torch.manual_seed(6)
    f = _nonzero(FloraAdapter(nn.Linear(6, 4), rank=2))
    assert f.parameter_count == 2 * 6 + 4 * 2
    g = FloraAdapter(nn.Linear(6, 4), rank=2, seed=99)
    g.load_state_dict(f.state_dict())
    g.set_parameters(f.get_parameters())
    x = torch.randn(3, 6)
    torch.testing.assert_close(g(x), f(x), rtol=0, atol=0)


def test_merge_non_finite_names_module():
    m = nn.Sequential()
    m.add_module("ffn", nn.Linear(8, 8))
    apply_lora(m, ["ffn"], rank=2, adapter_cls=FloraAdapter)
    with torch.no_grad():
        m.ffn.lora_B.fill_(float("inf"))
    with pytest.raises(AdapterError, match="ffn"):
        m.ffn.merge_to_original_layer()


# --------------------------------------------------------------------------- validation
BAD_KWARGS = [
    dict(resampling_interval=0),
    dict(resampling_interval=-5),
    dict(resampling_interval=2.5),
    dict(resampling_interval=True),
    dict(momentum_decay=-0.1),
    dict(momentum_decay=1.0),
    dict(momentum_decay=float("nan")),
    dict(second_moment_decay=-0.1),
    dict(second_moment_decay=1.0),
    dict(second_moment_decay="0.9"),
    dict(seed=1.5),
]


@pytest.mark.parametrize("kwargs", BAD_KWARGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_bad_arguments_raise_naming_module(kwargs):
    (arg,) = kwargs
    with pytest.raises(AdapterError, match=arg):
        FloraAdapter(nn.Linear(8, 8), rank=2, **kwargs)
    m = nn.Sequential()
    m.add_module("attn_out", nn.Linear(8, 8))
    with pytest.raises(AdapterError, match=rf"'attn_out'.*{arg}"):
        apply_lora(m, ["attn_out"], rank=2, adapter_cls=FloraAdapter, **kwargs)
    assert type(m.attn_out) is nn.Linear
    assert m.attn_out.weight.requires_grad


@pytest.mark.parametrize(
    "kwargs", [dict(momentum_decay=0.0), dict(second_moment_decay=0.0), dict(resampling_interval=1)]
)
def test_boundary_arguments_are_accepted(kwargs):
    FloraAdapter(nn.Linear(8, 8), rank=2, **kwargs)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, 9])
def test_bad_rank_raises(rank):
    m = nn.Sequential()
    m.add_module("proj", nn.Linear(8, 8))
    with pytest.raises(AdapterError, match=r"'proj'.*rank"):
        apply_lora(m, ["proj"], rank=rank, adapter_cls=FloraAdapter)


def test_unsupported_base_raises():
    with pytest.raises(AdapterError, match="Embedding"):
        FloraAdapter(nn.Embedding(10, 4), rank=1)


def test_apply_lora_passes_flora_arguments():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    names = apply_lora(m, ["0", "1"], rank=2, adapter_cls=FloraAdapter, seed=9, resampling_interval=10)
    assert names == ["0", "1"]
    for name in names:
        f = m.get_submodule(name)
        assert isinstance(f, FloraAdapter)
        assert f.seed == 9 and f.resampling_interval == 10 and f.module_name == name
        torch.testing.assert_close(f.lora_A.detach(), _expected_projection(2, 8, 9), rtol=0, atol=0)
