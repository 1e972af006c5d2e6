"""``Flora(update=...)``: the paper's rule against its formulas written out, option checks, name-keyed state.

The reference follows Algorithm 2 of arXiv:2402.03293 in the paper's own orientation (momentum
``M`` of shape ``n x r``, projection ``A`` of shape ``r x m``): at ``t % kappa == 0``
``M <- M A_old A_new^T``; then ``M <- beta M + (1 - beta) U A^T`` and the update is ``M A``, where
``U`` is the step's Adafactor-normalised gradient; RMS clipping and the step follow as in Flora.
A wide matrix (``n <= m``) is the transposed problem.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flora_graph.flora import Flora, OptimizerError, gaussian_projection, param_seed
from flora_graph.flora.options import UPDATES


def _grads(shape: tuple[int, int], steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def _paper_reference(w0: torch.Tensor, grads: list[torch.Tensor], rank: int, kappa: int, beta: float, lr: float,
                     seed: int, name: str) -> torch.Tensor:
    """The paper's formulas, literally, in float64 (tall: as written; wide: on the transposes)."""
    wide = w0.shape[0] <= w0.shape[1]
    w = (w0.T if wide else w0).double().clone()
    n, m = w.shape
    eps1 = 1e-30
    row = torch.zeros(n, dtype=torch.float64)
    col = torch.zeros(m, dtype=torch.float64)
    mom = torch.zeros(n, rank, dtype=torch.float64)  # m_t: n x r
    epoch = 0
    a = gaussian_projection(param_seed(seed, name, 0), rank, m).double()  # A_0: r x m, N(0, 1/r)
    for t, g in enumerate(grads, start=1):
        g = (g.T if wide else g).double()
        b2 = 1.0 - t**-0.8  # Adafactor's beta2 schedule
        row = b2 * row + (1 - b2) * ((g**2).mean(dim=1) + eps1)
        col = b2 * col + (1 - b2) * ((g**2).mean(dim=0) + eps1)
        u = g / (torch.outer(row, col) / row.mean()).sqrt()
        if t % kappa == 0:  # resample A and transfer the momentum: m'_t = m_{t-1} A_{t-1} A_t^T
            epoch += 1
            a_new = gaussian_projection(param_seed(seed, name, epoch), rank, m).double()
            mom = mom @ a @ a_new.T
            a = a_new
        mom = beta * mom + (1 - beta) * u @ a.T  # m_t = beta m'_t + (1 - beta) g_t A_t^T
        d = mom @ a  # the update m_t A_t (unbiased decompression)
        rms = d.square().mean().sqrt()
        w = w - lr * d / max(1.0, float(rms))  # clip_threshold 1
    return (w.T if wide else w).float()


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)], ids=["tall", "wide"])
def test_paper_rule_follows_the_papers_formulas(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    w0 = w.detach().clone()
    grads = _grads(shape, 7)
    opt = Flora([("w", w)], lr=0.05, rank=2, kappa=3, beta1=0.9, update="paper", seed=11)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert opt.state[w]["exp_avg_c"].shape == (2, max(shape))
    assert int(opt.state[w]["resamples"]) == 2  # steps 3 and 6
    expected = _paper_reference(w0, grads, rank=2, kappa=3, beta=0.9, lr=0.05, seed=11, name="w")
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


def test_the_three_rules_differ_and_scaled_is_the_default() -> None:
    shape = (6, 8)
    out = {}
    for update in (None, "scaled", "lift", "paper"):
        w = torch.nn.Parameter(torch.ones(shape))
        kwargs = {} if update is None else {"update": update}
        opt = Flora([("w", w)], lr=0.05, rank=2, kappa=2, **kwargs)
        for g in _grads(shape, 3):
            w.grad = g
            opt.step()
        out[update] = w.detach().clone()
    assert torch.equal(out[None], out["scaled"])
    assert not torch.allclose(out["scaled"], out["lift"])
    assert not torch.allclose(out["lift"], out["paper"])


def test_update_is_validated_with_the_choices_listed() -> None:
    w = torch.nn.Parameter(torch.ones(4, 4))
    assert UPDATES == ("scaled", "lift", "paper")
    with pytest.raises(OptimizerError, match=r"update must be one of \('scaled', 'lift', 'paper'\), got 'unbiased'"):
        Flora([("w", w)], lr=0.1, update="unbiased")
    opt = Flora([("w", w)], lr=0.1)
    with pytest.raises(OptimizerError, match=r"param group 1: update must be one of"):
        opt.add_param_group({"params": [("v", torch.nn.Parameter(torch.ones(3)))], "update": 3})


def test_a_state_dict_without_update_loads_and_keeps_the_groups_rule() -> None:
    w = torch.nn.Parameter(torch.ones(6, 8))
    opt = Flora([("w", w)], lr=0.05, rank=2, update="paper")
    w.grad = torch.ones(6, 8)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["update"]  # saved before the option existed
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["update"] == "paper"


def test_sharded_state_dict_round_trip_resumes_bit_exact_in_one_process() -> None:
    shape = (6, 8)
    grads = _grads(shape, 6)

    def make() -> tuple[torch.nn.Parameter, torch.nn.Parameter, Flora]:
        w, b = torch.nn.Parameter(torch.ones(shape)), torch.nn.Parameter(torch.zeros(8))
        return w, b, Flora([("w", w), ("b", b)], lr=0.05, rank=2, kappa=2, update="paper")

    w, b, opt = make()
    for i, g in enumerate(grads):
        w.grad = g
        b.grad = None if i < 2 else g[0]  # b gets no gradient at first: no state to save yet
        opt.step()
        if i == 0:
            saved = copy.deepcopy(opt.sharded_state_dict())
            w_saved = w.detach().clone()
    assert set(saved["state"]) == {"w", "b"} and int(saved["state"]["b"]["step"]) == 0
    assert saved["flora"]["world_size"] == 1
    w2, b2, opt2 = make()
    with torch.no_grad():
        w2.copy_(w_saved)
    opt2.load_sharded_state_dict(saved)
    assert b2 not in opt2.state or not opt2.state[b2]  # never stepped: still no state
    for i, g in enumerate(grads[1:], start=1):
        w2.grad = g
        b2.grad = None if i < 2 else g[0]
        opt2.step()
    assert torch.equal(w2, w) and torch.equal(b2, b)
    template = opt2.sharded_state_dict(template=True)
    assert int(template["state"]["w"]["step"]) == 0 and not math.isnan(float(template["state"]["w"]["exp_avg_c"].sum()))


def test_residual_scale_is_the_sketched_norm_ratio_capped_at_one() -> None:
    from flora_graph.flora.momentum import residual_scale

    gen = torch.Generator().manual_seed(5)
    c, pu = torch.randn(4, 30, generator=gen), torch.randn(4, 30, generator=gen)
    assert residual_scale(0.5 * c, c) == pytest.approx(0.5)
    assert residual_scale(c, pu) == pytest.approx(min(1.0, float(c.norm() / pu.norm())))
    assert residual_scale(2 * c, c) == 1.0  # capped: the fresh update is never amplified
    assert residual_scale(c, torch.zeros_like(pu)) == 1.0 and residual_scale(torch.zeros_like(c), torch.zeros_like(pu)) == 0.0


@pytest.mark.parametrize(("kind", "low", "high"), [("noise", 0.15, 0.3), ("constant", 0.99, 1.0)])
def test_scaled_rule_shrinks_noise_to_the_momentums_norm_and_keeps_a_steady_gradient(kind: str, low: float,
                                                                                      high: float) -> None:
    """Independent gradients: ``rho`` near ``sqrt((1 - b) / (1 + b))`` = 0.23 (how much an EMA shrinks noise); a
    gradient that never changes: ``rho`` near 1 (the momentum has caught up with it)."""
    from flora_graph.flora import compress

    gen = torch.Generator().manual_seed(8)
    w = torch.nn.Parameter(torch.zeros(48, 64))
    opt = Flora([("w", w)], lr=1e-3, rank=8, beta1=0.9, beta2=0.999, clip_threshold=None)
    fixed = torch.randn(48, 64, generator=gen)
    for _ in range(80):
        w.grad = fixed.clone() if kind == "constant" else torch.randn(48, 64, generator=gen)
        opt.step()
    st = opt.state[w]
    proj = gaussian_projection(param_seed(0, "w", 0), 8, 48)
    v = torch.outer(st["exp_avg_sq_row"], st["exp_avg_sq_col"]) / st["exp_avg_sq_row"].mean() / (1 - 0.999**80)
    u = w.grad / v.sqrt()
    rho = min(1.0, float(st["exp_avg_c"].norm() / compress(u, proj).norm()))
    assert low < rho <= high, rho
