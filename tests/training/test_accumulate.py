"""``FloraAccumulator``: compressed micro-batch sums, decompressed once, with any torch optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora_graph.flora import (
    Flora,
    FloraAccumulator,
    OptimizerError,
    compress,
    decompress,
    gaussian_projection,
    stable_seed,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 10))


def _micro_batches(k: int, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randn(16, 20, generator=gen)
        out.append((x, x[:, :10].cos()))
    return out


def _accumulate(model: nn.Module, acc: FloraAccumulator, batches) -> None:
    for x, y in batches:
        ((model(x) - y).square().mean() / len(batches)).backward()
        acc.accumulate()
        assert all(p.grad is None for p in model.parameters())
    acc.finalize()


def test_four_micro_batches_equal_the_decompressed_sum():
    model = _model()
    batches = _micro_batches(4)
    grads = []
    for x, y in batches:
        model.zero_grad()
        ((model(x) - y).square().mean() / 4).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    acc = FloraAccumulator(model.named_parameters(), rank=4, seed=3, projection="gaussian")
    assert acc.compressed_shape("0.weight") == (4, 40) and acc.compressed_shape("0.bias") == (40,)
    _accumulate(model, acc, batches)
    for name, p in model.named_parameters():
        total = sum(g[name] for g in grads)
        if p.dim() == 2:
            proj = gaussian_projection(stable_seed("flora.accumulate", 3, name, 0), 4, min(p.shape))
            want = decompress(compress(total, proj), proj, tuple(p.shape))
            assert not torch.allclose(want, total, atol=1e-3)  # compression is lossy ...
        else:
            want = total  # ... 1-D tensors are summed in full
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)
    assert acc.steps == 1 and acc.micro_batches == 0


def test_each_step_draws_a_new_projection():
    model = _model()
    acc = FloraAccumulator(model.named_parameters(), rank=4)
    batches = _micro_batches(1)
    _accumulate(model, acc, batches)
    first = model[0].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    _accumulate(model, acc, batches)
    assert not torch.allclose(first, model[0].weight.grad)


@pytest.mark.parametrize(
    "make", [lambda p: torch.optim.SGD(p, lr=0.5), lambda p: torch.optim.Adam(p, lr=1e-2)], ids=["sgd", "adam"]
)
def test_works_with_torch_optimizers(make):
    model = _model()
    opt = make(model.parameters())
    acc = FloraAccumulator(model.named_parameters(), rank=8)
    batches = _micro_batches(4)

    def loss() -> float:
        with torch.no_grad():
            return sum((model(x) - y).square().mean().item() for x, y in batches) / 4

    start = loss()
    w = model[2].weight.detach().clone()
    _accumulate(model, acc, batches)
    g = model[2].weight.grad.clone()
    opt.step()
    if isinstance(opt, torch.optim.SGD):
        torch.testing.assert_close(model[2].weight.detach(), w - 0.5 * g)
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        _accumulate(model, acc, batches)
        opt.step()
    assert loss() < 0.6 * start


def test_works_with_flora():
    model = _model()
    opt = Flora(model.named_parameters(), lr=1e-2, rank=4, kappa=10)
    acc = FloraAccumulator(model.named_parameters(), rank=8)
    batches = _micro_batches(4)
    for _ in range(3):
        _accumulate(model, acc, batches)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert int(opt.state[model[0].weight]["step"]) == 3


def test_memory_of_buffers_follows_the_formula():
    acc = FloraAccumulator(nn.Linear(256, 128).named_parameters(), rank=8)
    assert acc.accumulation_bytes() == 4 * (8 * 256 + 128)


def test_non_finite_micro_batch_raises_and_keeps_buffers():
    model = _model()
    acc = FloraAccumulator(model.named_parameters(), rank=4)
    x, y = _micro_batches(1)[0]
    (model(x) - y).square().mean().backward()
    acc.accumulate()
    before = {k: v.clone() for k, v in acc.buffers.items()}
    (model(x) - y).square().mean().backward()
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(OptimizerError, match=r"'2\.bias'"):
        acc.accumulate()
    assert acc.micro_batches == 1
    assert all(torch.equal(before[k], acc.buffers[k]) for k in before)


def test_misuse_raises():
    model = _model()
    with pytest.raises(OptimizerError, match="rank"):
        FloraAccumulator(model.named_parameters(), rank=0)
    with pytest.raises(OptimizerError, match="finalize"):
        FloraAccumulator(model.named_parameters()).finalize()


def test_state_dict_round_trip_mid_accumulation():
    model = _model()
    acc = FloraAccumulator(model.named_parameters(), rank=4, seed=1)
    batches = _micro_batches(4)
    _accumulate(model, acc, batches)
    for x, y in batches[:2]:
        ((model(x) - y).square().mean() / 4).backward()
        acc.accumulate()
    sd = acc.state_dict()
    acc2 = FloraAccumulator(model.named_parameters(), rank=4, seed=99)
    acc2.load_state_dict(sd)
    finished = []
    for a in (acc, acc2):
        for x, y in batches[2:]:
            model.zero_grad(set_to_none=True)
            ((model(x) - y).square().mean() / 4).backward()
            a.accumulate()
        a.finalize()
        finished.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in finished[0].items():
        assert torch.equal(g, finished[1][n])
    other = FloraAccumulator(nn.Linear(3, 3).named_parameters(), rank=1)
    with pytest.raises(OptimizerError, match="names differ"):
        other.load_state_dict(sd)
