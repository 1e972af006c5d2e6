"""``Flora`` optimizer: compressed state by default, the step's numbers, resampling, names, NaN policy, options."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from flora_graph.errors import FloraGraphError
from flora_graph.flora import (
    Flora,
    NonFiniteGradientError,
    OptimizerError,
    compress,
    gaussian_projection,
    lift,
    param_seed,
    transfer,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 12))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 24, generator=gen)
    return x, torch.sin(x[:, :12]) + 0.5 * x[:, 12:]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    x, y = _data()
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _state_of(opt: Flora, name: str) -> dict[str, torch.Tensor]:
    for g in opt.param_groups:
        for n, p in zip(g["param_names"], g["params"], strict=True):
            if n == name:
                return opt.state[p]
    raise KeyError(name)


# --------------------------------------------------------------------------- defaults compress
def test_defaults_compress_momentum_and_factor_second_moment():
    m = _model()
    opt = Flora(m.named_parameters(), lr=1e-3)
    _train(m, opt, 1)
    w0 = _state_of(opt, "0.weight")  # 48 x 24, rank 8
    assert w0["exp_avg_c"].shape == (8, 48)
    assert w0["exp_avg_sq_row"].shape == (48,) and w0["exp_avg_sq_col"].shape == (24,)
    assert "exp_avg" not in w0 and "exp_avg_sq" not in w0
    assert _state_of(opt, "2.weight")["exp_avg_c"].shape == (8, 48)  # 12 x 48: projected on the 12 side
    assert set(_state_of(opt, "0.bias")) == {"step", "exp_avg", "exp_avg_sq"}
    assert int(w0["seed"]) == param_seed(0, "0.weight", 0)


def test_state_memory_matches_formula():
    m = nn.ModuleDict({"a": nn.Linear(256, 128, bias=False), "b": nn.Linear(64, 200, bias=False)})
    opt = Flora(m.named_parameters(), lr=1e-3, rank=8)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in m.parameters():
        n, k = p.shape
        floats = sum(t.numel() for t in opt.state[p].values() if t.is_floating_point())
        assert floats == 8 * max(n, k) + n + k
        assert floats < n * k / 5  # Adam keeps 2 n k


@pytest.mark.parametrize(
    ("module", "expect"),
    [
        (nn.Embedding(100, 8), "exp_avg"),  # aspect ratio > 4
        (nn.Linear(4, 6, bias=False), "exp_avg"),  # min side < rank
        (nn.Conv2d(4, 16, 3, bias=False), "exp_avg_c"),  # 16 x 36
    ],
)
def test_which_tensors_keep_full_momentum(module, expect):
    opt = Flora(module.named_parameters(), lr=1e-3)
    module.weight.grad = torch.randn_like(module.weight)
    opt.step()
    st = opt.state[module.weight]
    assert expect in st
    if expect == "exp_avg_c":
        assert st["exp_avg_c"].shape == (8, 36)


# --------------------------------------------------------------------------- the step's numbers
def _reference_step(w, grads, *, lr, rank, kappa, b1, seed, name, clip=1.0, wd=0.0, update="scaled"):
    """Flora written out with full n x m intermediates (float64), for a matrix with n <= m."""
    w = w.double().clone()
    n, m = w.shape
    row, col, mom = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64), None
    epoch = 0
    for t, g in enumerate(grads, start=1):
        g = g.double()
        beta2 = 1 - t**-0.8
        row = beta2 * row + (1 - beta2) * (g * g + 1e-30).mean(1)
        col = beta2 * col + (1 - beta2) * (g * g + 1e-30).mean(0)
        u = g / torch.sqrt(torch.outer(row, col) / row.mean())
        p = gaussian_projection(param_seed(seed, name, epoch), rank, n, dtype=torch.float64)
        mom = (1 - b1) * (p @ u) if mom is None else b1 * mom + (1 - b1) * (p @ u)
        # scaled: the fresh update scaled to the sketched momentum's norm; lift: in full
        rho = min(1.0, (mom.norm() / (p @ u).norm()).item()) if update == "scaled" else 1.0
        # the matrix nearest rho u whose compression is the momentum
        d = rho * u + torch.linalg.pinv(p) @ (mom - rho * (p @ u))
        if t % kappa == 0:
            epoch += 1
            mom = gaussian_projection(param_seed(seed, name, epoch), rank, n, dtype=torch.float64) @ d
        rms = d.norm() / math.sqrt(d.numel())
        d = d / max(1.0, (rms / clip).item())
        w = w * (1 - lr * wd) - lr * d
    return w


@pytest.mark.parametrize("update", ["scaled", "lift"])
@pytest.mark.parametrize("shape", [(10, 30), (30, 10)])
def test_step_matches_written_out_formula_across_resamples(shape, update):
    gen = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(shape, generator=gen))
    grads = [torch.randn(shape, generator=gen) for _ in range(7)]
    kw = {"lr": 0.05, "rank": 4, "kappa": 3, "seed": 5, "clip": 0.5, "wd": 0.1}
    if shape[0] <= shape[1]:
        want = _reference_step(w.detach(), grads, b1=0.8, name="w", update=update, **kw)
    else:  # n > m is the transposed problem: the factored second moment and the projection are symmetric
        want = _reference_step(w.detach().T, [g.T for g in grads], b1=0.8, name="w", update=update, **kw).T
    opt = Flora([("w", w)], lr=0.05, rank=4, kappa=3, beta1=0.8, seed=5, clip_threshold=0.5, weight_decay=0.1,
                update=update)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach().double(), want, rtol=1e-5, atol=1e-5)


def _step_direction(w: nn.Parameter, opt: Flora, grad: torch.Tensor) -> torch.Tensor:
    """The direction ``d`` of one step (``lr=1``, ``clip_threshold=None``, no weight decay: ``w -= d``)."""
    before = w.detach().clone()
    w.grad = grad
    opt.step()
    return before - w.detach()


@pytest.mark.parametrize("update", ["scaled", "lift"])
def test_update_compresses_to_the_momentum_and_is_nearest_the_scaled_fresh_gradient(update):
    gen = torch.Generator().manual_seed(6)
    w = nn.Parameter(torch.zeros(40, 16))  # n > m: projected on the 16 side
    opt = Flora([("layer.w", w)], lr=1.0, rank=4, kappa=100, clip_threshold=None, update=update)
    st = opt.state[w]
    proj = gaussian_projection(param_seed(0, "layer.w", 0), 4, 16)
    for _ in range(4):
        d = _step_direction(w, opt, torch.randn(40, 16, generator=gen))
    # the compressed momentum is exactly the compression of the update ...
    torch.testing.assert_close(compress(d, proj), st["exp_avg_c"], rtol=1e-4, atol=1e-5)
    # ... and d - rho u lies in the projection's row space (d is the nearest such matrix to rho u, u = g / sqrt(v),
    # rho = min(1, ||C|| / ||P u||) for "scaled", 1 for "lift")
    row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
    u = w.grad * (row / row.mean()).rsqrt().unsqueeze(1) * col.rsqrt().unsqueeze(0)
    rho = min(1.0, float(st["exp_avg_c"].norm() / compress(u, proj).norm())) if update == "scaled" else 1.0
    assert rho < 1.0 or update == "lift"  # independent random gradients: the momentum is shorter than u
    off = (d - rho * u) - lift(compress(d - rho * u, proj), proj, (40, 16))
    assert off.abs().max().item() < 1e-4 * (d - rho * u).abs().max().item()


def test_after_kappa_steps_the_projection_changed_and_the_update_was_transferred():
    gen = torch.Generator().manual_seed(4)
    w = nn.Parameter(torch.zeros(40, 16))  # n > m: projected on the 16 side
    opt = Flora([("layer.w", w)], lr=1.0, rank=4, kappa=5, clip_threshold=None)
    st = opt.state[w]
    for t in range(1, 6):
        if t == 5:
            before = st["exp_avg_c"].clone()
        d = _step_direction(w, opt, torch.randn(40, 16, generator=gen))
        if t < 5:
            assert int(st["seed"]) == param_seed(0, "layer.w", 0)
    old, new = (gaussian_projection(param_seed(0, "layer.w", e), 4, 16) for e in (0, 1))
    assert int(st["seed"]) == param_seed(0, "layer.w", 1) and int(st["resamples"]) == 1 and int(st["step"]) == 5
    # step 5 folds its gradient in under the old projection; the update d decompresses that momentum ...
    torch.testing.assert_close(compress(d, old), _replay_momentum(before, w, opt), rtol=1e-4, atol=1e-5)
    # ... and the transfer compresses d with the new projection
    torch.testing.assert_close(st["exp_avg_c"], compress(d, new), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(st["exp_avg_c"], transfer(before, old, new), atol=1e-3)


def _replay_momentum(before: torch.Tensor, w: nn.Parameter, opt: Flora) -> torch.Tensor:
    """Momentum after step 5 under the old projection, recomputed from the saved second moment."""
    st = opt.state[w]
    g = w.grad.float()
    row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
    u = g * (row / row.mean()).rsqrt().unsqueeze(1) * col.rsqrt().unsqueeze(0)
    old = gaussian_projection(param_seed(0, "layer.w", 0), 4, 16)
    return 0.9 * before + 0.1 * compress(u, old)


def test_resampling_every_step_does_not_inflate_the_momentum():
    """With kappa=1 and a constant gradient the update converges to u and never outgrows it.

    An unbiased transfer (``transfer``) would multiply the momentum's norm by about
    ``sqrt(min(n, m) / r)`` each resample (here 4x), which ``beta1 = 0.9`` cannot damp.
    """
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(64, 128, generator=gen)
    w = nn.Parameter(torch.zeros(64, 128))
    opt = Flora([("w", w)], lr=1.0, rank=4, kappa=1, clip_threshold=None)
    st = opt.state[w]
    norms = []
    for _ in range(60):
        d = _step_direction(w, opt, g.clone())
        norms.append(d.norm().item())
    row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
    u = g * (row / row.mean()).rsqrt().unsqueeze(1) * col.rsqrt().unsqueeze(0)
    assert max(norms) <= u.norm().item() * (1 + 1e-4)
    assert (d - u).norm().item() < 1e-2 * u.norm().item()
    assert int(st["resamples"]) == 60
    c0 = c = torch.randn(4, 128, generator=gen)
    ps = [gaussian_projection(s, 4, 64) for s in range(4)]
    for old, new in itertools.pairwise(ps):
        c = transfer(c, old, new)
    assert c.norm().item() > 10 * c0.norm().item()  # about 4 ** 3 = 64 times


# --------------------------------------------------------------------------- names and seeds
def test_reordered_named_params_get_the_same_projection_per_name():
    m = _model()
    a = Flora(list(m.named_parameters()), lr=1e-3, rank=4)
    b = Flora(list(reversed(list(m.named_parameters()))), lr=1e-3, rank=4)
    c = Flora([{"params": [("2.weight", m[2].weight)]}, {"params": [("0.weight", m[0].weight)], "lr": 0.1}], lr=1e-3)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    for opt in (a, b, c):
        opt.step()
    for p in (m[0].weight, m[2].weight):
        assert int(a.state[p]["seed"]) == int(b.state[p]["seed"]) == int(c.state[p]["seed"])


def test_adding_a_group_later_does_not_shift_existing_seeds():
    m = _model()
    opt = Flora([m[0].weight, m[0].bias], lr=1e-3)  # unnamed: documented order-based names
    assert opt.param_groups[0]["param_names"] == ["param_groups.0.0", "param_groups.0.1"]
    opt.add_param_group({"params": [m[2].weight, m[2].bias], "lr": 1e-2})
    assert opt.param_groups[1]["param_names"] == ["param_groups.1.0", "param_groups.1.1"]
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert int(opt.state[m[0].weight]["seed"]) == param_seed(0, "param_groups.0.0", 0)
    assert int(opt.state[m[2].weight]["seed"]) == param_seed(0, "param_groups.1.0", 0)


def test_duplicate_names_and_mixed_groups_raise():
    m = _model()
    with pytest.raises(OptimizerError, match="'x'"):
        Flora([("x", m[0].weight), ("x", m[2].weight)], lr=1e-3)
    with pytest.raises(OptimizerError, match="mixes"):
        Flora([("x", m[0].weight), m[2].weight], lr=1e-3)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("kwargs", [{}, {"second_moment": "adam"}, {"beta2": 0.99}, {"weight_decay": 1e-3}])
def test_trains_a_regression(kwargs):
    m = _model()
    losses = _train(m, Flora(m.named_parameters(), lr=3e-3, rank=4, kappa=20, **kwargs), 150)
    assert losses[-1] < 0.4 * losses[0]


def test_relative_step_and_low_precision_params():
    m = _model().to(torch.bfloat16)
    opt = Flora(m.named_parameters(), relative_step=True, rank=4)
    x, y = _data()
    w0 = m[0].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (m(x.bfloat16()) - y.bfloat16()).float().square().mean().backward()
        opt.step()
    assert m[0].weight.dtype == torch.bfloat16 and not torch.equal(m[0].weight, w0)
    assert opt.state[m[0].weight]["exp_avg_c"].dtype == torch.float32


def test_beta1_zero_keeps_no_momentum():
    m = _model()
    opt = Flora(m.named_parameters(), lr=1e-3, beta1=0.0)
    _train(m, opt, 1)
    assert set(opt.state[m[0].weight]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}


# --------------------------------------------------------------------------- non-finite gradients
def _with_nan_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[2].weight.grad[0, 0] = float("nan")


def test_nan_gradient_raises_naming_the_parameter_and_changes_nothing():
    m = _model()
    opt = Flora(m.named_parameters(), lr=1e-2, rank=4)
    _train(m, opt, 2)
    params = [p.detach().clone() for p in m.parameters()]
    state = {k: v.clone() for k, v in opt.state[m[0].weight].items()}
    _with_nan_grad(m)
    with pytest.raises(NonFiniteGradientError, match=r"'2\.weight'") as err:
        opt.step()
    assert isinstance(err.value, FloraGraphError) and err.value.names == ["2.weight"]
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters(), strict=True))
    assert all(torch.equal(v, opt.state[m[0].weight][k]) for k, v in state.items())


def test_nan_gradient_skip_skips_the_whole_step_and_counts():
    m = _model()
    opt = Flora(m.named_parameters(), lr=1e-2, rank=4, nan_policy="skip")
    _train(m, opt, 2)
    params = [p.detach().clone() for p in m.parameters()]
    _with_nan_grad(m)
    opt.step()
    m[0].weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters(), strict=True))
    assert int(opt.state[m[0].weight]["step"]) == 2
    assert opt.state_dict()["flora"]["skipped_steps"] == 2


# --------------------------------------------------------------------------- validation
BAD = [
    ({"rank": 0}, "rank"),
    ({"rank": -2}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"kappa": 0}, "kappa"),
    ({"lr": -1e-3}, "lr"),
    ({"lr": None}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"beta1": 1.0}, "beta1"),
    ({"beta1": -0.1}, "beta1"),
    ({"beta1": None}, "beta1"),
    ({"beta2": 1.0}, "beta2"),
    ({"beta2": -0.5}, "beta2"),
    ({"decay_rate": 0.5}, "decay_rate"),
    ({"eps": (1e-30,)}, "eps"),
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"second_moment": "diag"}, "second_moment"),
    ({"seed": "x"}, "seed"),
    ({"nan_policy": "ignore"}, "nan_policy"),
    ({"relative_step": True}, "relative_step"),  # with an explicit lr
]


@pytest.mark.parametrize(("kwargs", "word"), BAD, ids=[f"{k}" for k, _ in BAD])
def test_bad_options_raise_a_typed_error_naming_the_option(kwargs, word):
    m = _model()
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(OptimizerError, match=word) as err:
        Flora(m.named_parameters(), **args)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FloraGraphError)


def test_bad_group_option_raises_naming_the_group():
    m = _model()
    with pytest.raises(OptimizerError, match=r"group 1.*rank"):
        Flora([{"params": m[0].parameters()}, {"params": m[2].parameters(), "rank": 0}], lr=1e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(40, 20, dtype=torch.float64),
        lambda: torch.randn(20, 40).T,  # non-contiguous
        lambda: torch.randn(40, 20).half(),
    ],
    ids=["float64", "non-contiguous", "float16"],
)
def test_parameter_layouts_follow_the_float32_contiguous_path(make):
    gen = torch.Generator().manual_seed(8)
    ref = nn.Parameter(torch.randn(40, 20, generator=gen))
    grads = [torch.randn(40, 20, generator=gen) for _ in range(3)]
    other = nn.Parameter(make())
    with torch.no_grad():
        other.copy_(ref)
    opts = [Flora([("w", q)], lr=1e-2, rank=4, kappa=2, clip_threshold=None) for q in (ref, other)]
    for g in grads:
        for q, opt in zip((ref, other), opts, strict=True):
            q.grad = g.to(q.dtype)
            opt.step()
    tol = 2e-3 if other.dtype == torch.float16 else 1e-5
    assert other.dtype == make().dtype and not torch.equal(other.float(), torch.zeros(40, 20))
    torch.testing.assert_close(other.detach().float(), ref.detach(), rtol=tol, atol=tol)


def test_changing_rank_mid_training_raises_naming_the_parameter():
    m = _model()
    opt = Flora(m.named_parameters(), lr=1e-3, rank=4)
    _train(m, opt, 1)
    opt.param_groups[0]["rank"] = 2
    with pytest.raises(OptimizerError, match=r"'0\.weight'.*rank"):
        _train(m, opt, 1)


def test_non_finite_gradient_error_can_be_rebuilt_from_its_reduce():
    """Process pools send exceptions back through ``__reduce__``; deepcopy uses the same path."""
    import copy

    from flora_graph.flora import NonFiniteGradientError

    err = copy.deepcopy(NonFiniteGradientError("w has NaN", ["w"]))
    assert isinstance(err, NonFiniteGradientError) and err.names == ["w"] and str(err) == "w has NaN"


def test_huge_finite_gradient_is_named_as_too_large_not_as_nan():
    """Entries above ~1.8e19 overflow float32 when squared: the step stops, saying the gradient is finite."""
    m = _model()
    opt = Flora(m.named_parameters(), lr=1e-2, rank=4)
    _train(m, opt, 1)
    before = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    m[0].weight.grad[3, 5] = 3e19
    with pytest.raises(NonFiniteGradientError, match=r"'0\.weight'.*finite but too large.*3e\+19") as err:
        opt.step()
    assert err.value.names == ["0.weight"] and "non-finite" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))


def test_deepcopy_keeps_the_options_and_steps_like_the_original():
    """``copy.deepcopy`` (as a trainer's rollback would take) copies params and state together and steps alike."""
    import copy

    m = _model()
    opt = Flora(m.named_parameters(), lr=1e-2, rank=4, kappa=3, nan_policy="skip")
    _train(m, opt, 2)
    opt2 = copy.deepcopy(opt)
    assert opt2.nan_policy == "skip" and opt2.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    ps, ps2 = opt.param_groups[0]["params"], opt2.param_groups[0]["params"]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(ps, ps2, strict=True))
    before = ps[0].detach().clone()
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):  # crosses a resample (kappa 3)
        for a, b in zip(ps, ps2, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2, strict=True))
    assert not torch.equal(before, ps[0])
