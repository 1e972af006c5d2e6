"""``Flora.step``'s fast path (cached projections, multi-tensor ops, one work buffer) against a per-tensor reference.

The reference below is the straightforward per-parameter step ``Flora`` used before the fast path:
each projection regenerated from its seed every step, ``(P P^T)^{-1}`` by a float64 solve per
step, one parameter at a time, float32 arithmetic. The two must agree to float32 rounding over
steps that cross resamples (``kappa=3``), for every kind of parameter.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from flora_graph.flora import (
    Flora,
    OptimizerError,
    compress,
    decompress,
    gaussian_projection,
    layout_for,
    lift,
    param_seed,
    transfer,
)
from flora_graph.flora.foreach import clip_scale, subtract_clipped_

SHAPES = {  # name -> (shape, dtype)
    "wide": ((16, 24), torch.float32),  # compressed, n <= m
    "tall": ((40, 16), torch.float32),  # compressed, n > m
    "conv": ((12, 3, 2, 2), torch.float32),  # compressed as 12 x 12
    "half": ((24, 16), torch.bfloat16),  # compressed, 16-bit parameter
    "embed": ((64, 8), torch.float32),  # aspect 8 > 4: full momentum
    "bias": ((16,), torch.float32),  # 1-D
    "norm": ((8,), torch.bfloat16),  # 1-D, 16-bit
}
OPTIONS = {"lr": 0.05, "rank": 4, "kappa": 3, "beta1": 0.8, "seed": 5, "clip_threshold": 0.5, "weight_decay": 0.1}


def _reference_step(named: list[tuple[str, torch.Tensor]], grads: dict[str, torch.Tensor], state: dict[str, Any],
                    o: dict[str, Any]) -> None:
    """One ``Flora`` step written per parameter with the pre-fast-path arithmetic (updates ``named`` and ``state``)."""
    for name, p in named:
        st = state.setdefault(name, {"t": 0, "epoch": 0})
        st["t"] += 1
        t = st["t"]
        layout = layout_for(p.shape, o["rank"])
        g = grads[name].float()
        g = g.reshape(layout.matrix) if layout.matrix is not None else g
        if o.get("beta2") is None:
            beta2t, correction = 1.0 - t ** o.get("decay_rate", -0.8), 1.0
        else:
            beta2t, correction = o["beta2"], 1.0 - o["beta2"] ** t
        eps = 1e-30
        if layout.matrix is not None and o.get("second_moment", "factored") == "factored":
            sq = g.square()
            row = st.setdefault("row", torch.zeros(g.shape[0]))
            col = st.setdefault("col", torch.zeros(g.shape[1]))
            row.mul_(beta2t).add_(sq.mean(dim=1), alpha=1.0 - beta2t).add_((1.0 - beta2t) * eps)
            col.mul_(beta2t).add_(sq.mean(dim=0), alpha=1.0 - beta2t).add_((1.0 - beta2t) * eps)
            r = (row / row.mean()).rsqrt_().mul_(math.sqrt(correction))
            u = (g * r.unsqueeze(1)).mul_(col.rsqrt().unsqueeze(0))
        else:
            v = st.setdefault("v", torch.zeros_like(g))
            v.mul_(beta2t).addcmul_(g, g, value=1.0 - beta2t).add_((1.0 - beta2t) * eps)
            u = g * v.rsqrt().mul_(math.sqrt(correction))
        b1 = o["beta1"]
        if b1 > 0 and layout.compressed:
            k = layout.small
            proj = gaussian_projection(param_seed(o["seed"], name, st["epoch"]), o["rank"], k)
            c = st.setdefault("c", torch.zeros(o["rank"], layout.large))
            if o.get("update", "scaled") in ("scaled", "lift"):
                pu = compress(u, proj)
                c.mul_(b1).add_(pu, alpha=1.0 - b1)
                rho = min(1.0, float(c.norm() / pu.norm())) if o.get("update", "scaled") == "scaled" else 1.0
                d = rho * u + lift(c - rho * pu, proj, layout.matrix)
                if t % o["kappa"] == 0:
                    st["epoch"] += 1
                    c.copy_(compress(d, gaussian_projection(param_seed(o["seed"], name, st["epoch"]), o["rank"], k)))
            else:
                if t % o["kappa"] == 0:
                    st["epoch"] += 1
                    new = gaussian_projection(param_seed(o["seed"], name, st["epoch"]), o["rank"], k)
                    c.copy_(transfer(c, proj, new))
                    proj = new
                c.mul_(b1).add_(compress(u, proj), alpha=1.0 - b1)
                d = decompress(c, proj, layout.matrix)
        elif b1 > 0:
            d = st.setdefault("m", torch.zeros_like(u)).mul_(b1).add_(u, alpha=1.0 - b1)
        else:
            d = u
        work = p.detach().float()
        lr = o["lr"]
        if o.get("relative_step"):
            rms_p = torch.linalg.vector_norm(work).square().sqrt() / math.sqrt(p.numel())
            lr = rms_p.clamp(min=1e-3) * min(1e-2, 1.0 / math.sqrt(t))
        work.mul_(1.0 - lr * o["weight_decay"])
        if o["clip_threshold"] is None:
            scale = torch.ones(()) * lr
        else:
            rms = (torch.linalg.vector_norm(d).square() / d.numel()).sqrt_()
            scale = (rms / o["clip_threshold"]).clamp_(min=1.0).reciprocal_().mul_(lr)
        work.view(d.shape).addcmul_(d, scale, value=-1.0)
        with torch.no_grad():
            p.copy_(work)


def _params(gen: torch.Generator) -> list[tuple[str, nn.Parameter]]:
    return [(n, nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(dt))) for n, (s, dt) in SHAPES.items()]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _state_of(opt: Flora, p: torch.Tensor) -> dict[str, torch.Tensor]:
    st = opt.state[p]
    return {"row": st.get("exp_avg_sq_row"), "col": st.get("exp_avg_sq_col"), "v": st.get("exp_avg_sq"),
            "c": st.get("exp_avg_c"), "m": st.get("exp_avg")}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"update": "lift"},
        {"update": "paper"},
        {"second_moment": "adam"},
        {"second_moment": "adam", "update": "paper", "beta2": 0.99},
        {"beta2": 0.95, "kappa": 1},
        {"relative_step": True, "lr": None, "clip_threshold": None},
        {"beta1": 0.0},
    ],
    ids=["scaled", "lift", "paper", "adam-scaled", "adam-paper-beta2", "beta2-kappa1", "relative-noclip", "no-momentum"],
)
def test_fast_step_matches_the_per_tensor_reference_across_resamples(extra: dict[str, Any]) -> None:
    options = {**OPTIONS, **extra}
    gen = torch.Generator().manual_seed(11)
    named = _params(gen)
    ref = [(n, p.detach().clone()) for n, p in named]
    opt = Flora(named, **options)
    ref_state: dict[str, Any] = {}
    for step in range(7):  # resamples after steps 3 and 6 (kappa=3)
        grads = {n: torch.randn(p.shape, generator=gen).to(p.dtype) for n, p in named}
        before = {n: p.detach().float().clone() for n, p in named}
        for n, p in named:
            p.grad = grads[n].clone()
        opt.step()
        _reference_step(ref, grads, ref_state, options)
        for (n, p), (_, q) in zip(named, ref, strict=True):
            # the parameters agree up to their own rounding (a bf16 one may round the other way: one ulp)
            # and 1e-6 of the step
            ulp = 2.0**-7 if p.dtype == torch.bfloat16 else 2.0**-23
            step_size = float((q.float() - before[n]).abs().max())
            torch.testing.assert_close(p.detach().float(), q.float(), rtol=2 * ulp, atol=1e-6 * step_size,
                                       msg=lambda m, n=n, step=step: f"step {step + 1}: {n}: {m}")
            for key, have in _state_of(opt, p).items():
                if have is not None:
                    err = _relative_error(have, ref_state[n][key].reshape(have.shape))
                    assert err < 1e-6, f"step {step + 1}: {n}: state {key} off by {err:.2e}"
    seeds = {n: int(opt.state[p]["seed"]) for n, p in named if "seed" in opt.state[p]}
    assert seeds == {n: param_seed(5, n, ref_state[n]["epoch"]) for n in seeds}


def test_projection_cache_is_outside_the_state_and_follows_the_seed() -> None:
    gen = torch.Generator().manual_seed(2)
    w = nn.Parameter(torch.randn(16, 24, generator=gen))
    opt = Flora([("w", w)], lr=0.05, rank=4, kappa=2)
    seeds = [param_seed(0, "w", e) for e in (0, 1)]
    w.grad = torch.randn(16, 24, generator=gen)
    opt.step()
    first = opt._bases.get("w", seeds[0], 4, 16, w.device)
    assert first.dual_t is not None  # the step computed it on the cached basis
    w.grad = torch.randn(16, 24, generator=gen)
    opt.step()  # a resample: the cache moves to the next seed
    second = opt._bases.get("w", seeds[1], 4, 16, w.device)
    assert second is not first and second.dual_t is None  # drawn for the transfer, not used for a step yet
    assert torch.equal(second.proj, gaussian_projection(seeds[1], 4, 16))
    w.grad = torch.randn(16, 24, generator=gen)
    opt.step()
    assert opt._bases.get("w", seeds[1], 4, 16, w.device) is second and second.dual_t is not None
    assert set(opt.state[w]) == {"step", "seed", "resamples", "exp_avg_c", "exp_avg_sq_row", "exp_avg_sq_col"}
    sd = opt.state_dict()
    assert set(sd["state"][0]) == set(opt.state[w])
    fresh = Flora([("w", w)], lr=0.05, rank=4, kappa=2)
    fresh.load_state_dict(sd)
    g, start = torch.randn(16, 24, generator=gen), w.detach().clone()
    deltas = []
    for o in (opt, fresh):  # the loaded optimizer regenerates what the other one has cached: the same step
        with torch.no_grad():
            w.copy_(start)
        w.grad = g.clone()
        o.step()
        deltas.append(w.detach() - start)
    assert torch.equal(deltas[0], deltas[1])


def test_an_option_change_that_changes_the_state_still_raises_before_any_change() -> None:
    gen = torch.Generator().manual_seed(4)
    named = _params(gen)
    opt = Flora(named, **OPTIONS)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()
    before = {n: p.detach().clone() for n, p in named}
    steps = {n: int(opt.state[p]["step"]) for n, p in named}
    opt.param_groups[0]["second_moment"] = "adam"
    with pytest.raises(OptimizerError, match=r"'wide'.*second_moment cannot change"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in named)  # "bias" comes later but was not stepped either
    assert {n: int(opt.state[p]["step"]) for n, p in named} == steps
    opt.param_groups[0]["second_moment"] = "factored"
    opt.step()  # back to the options the state was built with: steps again
    assert int(opt.state[named[0][1]]["step"]) == 2


@pytest.mark.parametrize("clip", [None, 0.5, 50.0])  # no clipping, clipped, under the threshold
@pytest.mark.parametrize("relative", [False, True])  # lr a float, or a 0-dim tensor (relative_step)
def test_host_and_device_forms_of_the_clipped_update_agree_with_clip_scale(clip: float | None, relative: bool) -> None:
    """The CPU form (Python floats) is what CPU runs use; the device form (0-dim ops) is what GPUs use."""
    gen = torch.Generator().manual_seed(6)
    p, d = torch.randn(30, 20, generator=gen), torch.randn(30, 20, generator=gen)
    group = {"clip_threshold": clip}
    lr = torch.tensor(0.03) if relative else 0.03
    want = p.clone().addcmul_(d, clip_scale(torch.linalg.vector_norm(d).square(), d.numel(), group, lr), value=-1.0)
    for host in (True, False):
        got = subtract_clipped_(p.clone(), d, torch.linalg.vector_norm(d), d.numel(), group, lr, host=host)
        step = float((want - p).abs().max())  # agree up to p's own rounding and 1e-6 of the step
        torch.testing.assert_close(got, want, rtol=2.0**-22, atol=1e-6 * step)
