"""``FloraAccumulator(projection="orthogonal")`` against independent references: the exact sum and a QR basis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora_graph.flora import FloraAccumulator, OptimizerError, gaussian_projection, stable_seed
from flora_graph.flora.accumulate import PROJECTIONS


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().mean()


def _full_sum(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """The reference: micro-batch gradients summed in ``.grad`` (no accumulator)."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        (_mse(model(x), y) / len(batches)).backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _accumulated(model: nn.Module, acc: FloraAccumulator, batches) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        (_mse(model(x), y) / len(batches)).backward()
        acc.accumulate()
    acc.finalize()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _two_layer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 32))
    gen = torch.Generator().manual_seed(seed + 100)
    batches = [(torch.randn(6, 24, generator=gen), torch.randn(6, 32, generator=gen)) for _ in range(4)]
    return model, batches


def test_orthogonal_is_the_scaled_projection_onto_the_gaussian_row_space():
    model, batches = _two_layer(7)
    want = _full_sum(model, batches)
    acc = FloraAccumulator(model.named_parameters(), rank=8, seed=3, projection="orthogonal")
    assert acc.compressed_shape("0.weight") == (8, 48)  # the same buffers as the default
    assert acc.accumulation_bytes() == FloraAccumulator(model.named_parameters(), rank=8).accumulation_bytes()
    got = _accumulated(model, acc, batches)
    for name in ("0.weight", "2.weight"):  # 48 x 24 (small side: columns), 32 x 48 (small side: rows)
        g = want[name]
        k = min(g.shape)
        proj = gaussian_projection(stable_seed("flora.accumulate", 3, name, 0), 8, k)
        q = torch.linalg.qr(proj.T.double()).Q  # k x 8 orthonormal: an independent route to the same subspace
        a = g.double() if g.shape[0] <= g.shape[1] else g.double().T
        ref = (k / 8) * (q @ (q.T @ a))
        ref = ref if g.shape[0] <= g.shape[1] else ref.T
        torch.testing.assert_close(got[name].double(), ref, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got[name], g, atol=1e-4)  # rank 8 of 24 / 32: lossy
    for name in ("0.bias", "2.bias"):
        torch.testing.assert_close(got[name], want[name])  # 1-D tensors are summed in full


def test_orthogonal_is_exact_at_full_rank_where_gaussian_is_not():
    torch.manual_seed(8)
    model = nn.Linear(16, 32)  # small side 16
    gen = torch.Generator().manual_seed(9)
    batches = [(torch.randn(5, 16, generator=gen), torch.randn(5, 32, generator=gen)) for _ in range(3)]
    want = _full_sum(model, batches)
    exact = _accumulated(model, FloraAccumulator(model.named_parameters(), rank=16, projection="orthogonal"), batches)
    torch.testing.assert_close(exact["weight"], want["weight"], rtol=1e-4, atol=1e-6)
    gauss = _accumulated(model, FloraAccumulator(model.named_parameters(), rank=16, projection="gaussian"), batches)
    assert (gauss["weight"] - want["weight"]).norm() > 0.2 * want["weight"].norm()  # P^T P != I at r = k


def test_orthogonal_is_unbiased_over_seeds():
    model, batches = _two_layer(10)
    want = _full_sum(model, batches)["2.weight"]
    draws = [_accumulated(model, FloraAccumulator(model.named_parameters(), rank=8, seed=s, projection="orthogonal"),
                          batches)["2.weight"] for s in range(300)]
    mean = sum(draws) / len(draws)
    assert (mean - want).norm() < 0.2 * want.norm()  # E[(k / r) Q Q^T] = I: one draw errs ~sqrt(k / r - 1) = 1.7
    assert min((d - want).norm() for d in draws) > 0.5 * want.norm()  # while every single draw is far off


def test_state_dict_round_trip_mid_step_and_mismatch():
    model, batches = _two_layer(11)
    acc = FloraAccumulator(model.named_parameters(), rank=8, seed=1, projection="orthogonal")
    for x, y in batches[:2]:
        (_mse(model(x), y) / 4).backward()
        acc.accumulate()
    sd = acc.state_dict()
    assert sd["projection"] == "orthogonal"
    assert FloraAccumulator(model.named_parameters(), rank=8).state_dict()["projection"] == "orthogonal"  # the default
    acc2 = FloraAccumulator(model.named_parameters(), rank=8, seed=1, projection="orthogonal")
    acc2.load_state_dict(sd)
    finished = []
    for a in (acc, acc2):
        for x, y in batches[2:]:
            model.zero_grad(set_to_none=True)
            (_mse(model(x), y) / 4).backward()
            a.accumulate()
        a.finalize()
        finished.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in finished[0].items():
        assert torch.equal(g, finished[1][n])
    with pytest.raises(OptimizerError, match=r"saved mid-step with projection 'orthogonal', this accumulator's is 'gaussian'"):
        FloraAccumulator(model.named_parameters(), rank=8, projection="gaussian").load_state_dict(sd)
    # between steps nothing pending depends on the kind: a state dict of either kind (or of the time
    # before the key existed, which was gaussian) loads into the default accumulator
    between = acc.state_dict()  # finalized above: between steps
    assert not between["buffers"]
    del between["projection"]
    fresh = FloraAccumulator(model.named_parameters(), rank=8)
    fresh.load_state_dict(between)
    assert fresh.projection == "orthogonal" and fresh.steps == acc.steps


def test_bad_projection_raises():
    assert PROJECTIONS == ("orthogonal", "gaussian")  # the default first
    assert FloraAccumulator(nn.Linear(4, 4).named_parameters()).projection == "orthogonal"
    with pytest.raises(OptimizerError, match="projection must be one of"):
        FloraAccumulator(nn.Linear(4, 4).named_parameters(), projection="random")
