"""``Flora``: Adafactor whose momentum is kept compressed by seeded random projections (arXiv:2402.03293).

One step for a parameter with gradient ``g`` (float32 arithmetic, ``n x m`` its 2-D view):

1. ``u = g / sqrt(v_hat)``: Adafactor's factored row/column second moment (or a full one for
   1-D tensors and ``second_moment="adam"``); never projected.
2. Momentum ``M = beta1 * M + (1 - beta1) * u``, and the direction ``d = M``. For a compressible
   matrix only ``C = P M`` (``r x max(n, m)``, ``P`` the ``r x min(n, m)`` projection of the
   parameter's current seed, entries ``N(0, 1/r)``) is kept, so::

       C_t = beta1 * C_{t-1} + (1 - beta1) * P u_t
       rho_t = min(1, ||C_t|| / ||P u_t||)
       d_t = rho_t u_t + P^T (P P^T)^{-1} (C_t - rho_t P u_t)

   ``d_t`` is the matrix nearest ``rho_t u_t`` whose compression is the momentum
   (``P d_t = C_t``): inside the ``r``-dimensional subspace ``P`` sketches it is the exact
   momentum; outside it, where ``C`` holds nothing, the fresh update stands in, scaled by
   ``rho_t`` (:func:`.momentum.residual_scale`). Since ``E ||P x||^2 = ||x||^2``, ``rho_t``
   estimates ``||M_t|| / ||u_t||`` from the sketches: near 1 while successive updates agree,
   down to about ``sqrt((1 - beta1) / (1 + beta1))`` (0.23 at ``beta1 = 0.9``) when they are
   mostly noise, which is how much an exponential average shrinks noise. So every direction of
   ``d_t`` has about the magnitude the uncompressed momentum would give it, and the update's
   norm (hence RMS clipping and the learning rate) behaves like Adafactor-with-momentum's. One
   ``n x m`` float32 work tensor (``u``, then ``d`` in place), as in Adafactor;
   ``P^T (P P^T)^{-1}`` is the transposed dual basis of ``P`` (:class:`.projection.Basis`, an
   ``r x r`` solve in float64 once per seed). After every ``kappa`` steps the seed moves on and
   the momentum is transferred: decompressed with the old projection (``d_t`` is that
   decompression) and compressed with the new one, ``C <- P_new d_t``.
3. The direction is scaled down to RMS ``<= clip_threshold``; decoupled weight decay
   ``p *= 1 - lr * weight_decay``; then ``p -= lr * direction``.

This is ``update="scaled"``, the default. ``update="lift"`` keeps ``rho_t = 1``: the fresh update
in full outside the subspace, ``d_t = u_t + beta1 lift(C_{t-1} - P u_t)``, the posterior mean of
``M_t`` under an isotropic Gaussian prior centred on ``u_t`` given ``P M_t = C_t``. Its update is
a mix of two scales (the momentum's inside ``r`` of ``min(n, m)`` directions, the fresh
gradient's in the rest), so at small ``r`` it behaves like Adafactor without momentum: on the
fine-tuning benchmark (``benchmarks/flora_finetune.py``) Flora r=8 was 3.6% worse than Adafactor
with momentum with ``lift`` and within 0.1% with ``scaled``. ``update="paper"`` runs the paper's
Algorithm 2 instead (:func:`.momentum.paper_direction`): at a step ``t`` with ``t % kappa == 0``
the momentum is first transferred, ``C <- P_new P_old^T C``, then
``C_t = beta1 C_{t-1} + (1 - beta1) P u_t`` and ``d_t = P^T C_t``. Why the default is not the
paper's unbiased decompression (:func:`.projection.decompress`):
``P^T P`` is about ``k/r`` times the orthogonal projection onto a random ``r``-dimensional
subspace (``k = min(n, m)``), so ``P^T C`` is the momentum's component there amplified ``k/r``
times: its norm is about ``sqrt(k/r)`` times the momentum's, almost all of it confined to one
subspace. RMS clipping then shrinks the useful signal by that factor, and with a fixed seed
every update of a run lies in the same ``r``-dimensional subspace. An unbiased transfer
``P_new P_old^T C`` multiplies the momentum's norm by about ``sqrt(k/r)`` per resample, so
frequent resampling diverges unless ``beta1 ** kappa * sqrt(k/r) << 1``. ``scaled`` and ``lift``
decompress by least squares (an orthogonal projection, a contraction) and the transfer
compresses ``d_t``, whose norm is at most that of an Adafactor update: resampling never inflates
the momentum (``kappa=1`` is stable), and decompressed momentum and ``u`` share one scale, the
second moment's.

Seeds are hashed from ``(seed, parameter name, resample count)`` (see :mod:`.projection`), and
the state holds only seeds: a projection is regenerated from a CPU generator when its seed is
first used (after a resample or a load), then kept with its dual basis in a
:class:`.projection.ProjectionCache` outside the state (never saved; at most twice the compressed
momentum's size). Pass ``model.named_parameters()`` so that names, not positions, identify
parameters.

How a step runs (the numbers are those of the per-parameter description above, up to float32
rounding): every gradient is probed first (row sums of ``g^2`` formed in one reused buffer,
:class:`.plans.Scratch`), and a non-finite one stops the step before any state changes. Then
the small, elementwise work of unsharded parameters runs as multi-tensor ops per group and step
count (:mod:`.foreach`: the row/column statistics of every factored matrix; the whole step of
1-D parameters), and each matrix does its ``n x m`` work in the reused buffer, one after another.
Per-parameter facts (layout, 2-D view, state shapes) are kept in :class:`.plans.Plan` objects and
the state's shapes are checked when they change, not every step. FSDP2 shards take the
per-parameter path throughout (:mod:`.sharding`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from flora_graph.flora.checkpoint import load_flora_state, load_sharded_state, sharded_state
from flora_graph.flora.errors import NonFiniteGradientError, OptimizerError
from flora_graph.flora.foreach import (
    LOW_PRECISION,
    clip_scale,
    factored_preconditioners,
    step_size,
    subtract_clipped_,
    vector_step,
)
from flora_graph.flora.moments import init_state, second_moment, square_means, square_sums
from flora_graph.flora.momentum import lift_direction, paper_direction
from flora_graph.flora.options import NAN_POLICIES, check_group, non_finite, split_named
from flora_graph.flora.plans import Plan, Scratch, Work, plan_key
from flora_graph.flora.projection import ProjectionCache
from flora_graph.flora.sharding import ShardSpec, check_uniform, is_dtensor, local, reduce_probes, shard_spec

__all__ = ["Flora"]

class Flora(torch.optim.Optimizer):
    """Flora optimizer: compressed momentum, factored second moment, RMS clipping, decoupled weight decay.

    Args:
        params: ``model.named_parameters()``, ``(name, tensor)`` pairs, bare tensors (named
            ``"param_groups.<g>.<i>"``), or param groups (dicts) whose ``"params"`` are any of these.
        lr: step size; required unless ``relative_step=True``.
        rank: rows ``r`` of the projection; the momentum of an ``n x m`` matrix is ``r x max(n, m)``.
        kappa: steps between projection resamples (with momentum transfer ``C <- P_new d``, which
            never inflates the momentum; any ``kappa >= 1`` is stable). Each resample keeps the
            momentum only inside the new subspace, so a small ``kappa`` shortens its memory.
        beta1: momentum decay in ``[0, 1)``; ``0`` keeps no momentum (plain Adafactor, nothing to compress).
        beta2: ``None`` for Adafactor's schedule ``1 - t^decay_rate``, or a constant in ``[0, 1)``
            (with Adam's bias correction).
        decay_rate: exponent of that schedule, in ``[-1, 0)``.
        eps: ``(eps1, eps2)``: added to ``g^2``; floor of the parameter RMS in relative steps.
        clip_threshold: the update is scaled down to this RMS (``None``: no clipping).
        relative_step: Adafactor's ``min(1e-2, 1/sqrt(t)) * max(eps2, RMS(p))`` instead of ``lr``.
        weight_decay: decoupled decay, ``p *= 1 - lr * weight_decay``.
        second_moment: ``"factored"`` (``n + m`` floats per matrix) or ``"adam"`` (full ``n x m``).
        seed: base seed hashed with each parameter's name.
        nan_policy: ``"raise"`` a :class:`NonFiniteGradientError` naming the parameters, or
            ``"skip"`` the whole step (counted in :attr:`skipped_steps`); state is untouched either way.
        update: the compressed-momentum rule (:mod:`.momentum`): ``"scaled"`` (default: the
            least-squares decompression around the fresh update scaled to the momentum's norm),
            ``"lift"`` (around the fresh update in full) or ``"paper"`` (the paper's unbiased
            ``P^T C`` with transfer ``P_new P_old^T C``), per group.

    Raises:
        OptimizerError: an option out of range, duplicate names, or a bad state dict.

    Matrices keep uncompressed momentum when ``min(n, m) < rank`` or ``max/min > 4``
    (embeddings); convolution weights are treated as ``out x (in * kh * kw)``.

    FSDP2 (``fully_shard``): parameters that are ``Shard(0)`` DTensors on a 1-D mesh are
    optimized shard by shard, equal to one process up to float rounding, with every state
    tensor sharded (see :mod:`.sharding`); save and resume with ``torch.distributed.checkpoint``
    through :meth:`sharded_state_dict` / :meth:`load_sharded_state_dict`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        rank: int = 8,
        kappa: int = 1000,
        beta1: float = 0.9,
        beta2: float | None = None,
        decay_rate: float = -0.8,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float | None = 1.0,
        relative_step: bool = False,
        weight_decay: float = 0.0,
        second_moment: str = "factored",
        seed: int = 0,
        nan_policy: str = "raise",
        update: str = "scaled",
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise OptimizerError(f"Flora: nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        defaults = {
            "lr": lr,
            "rank": rank,
            "kappa": kappa,
            "beta1": beta1,
            "beta2": beta2,
            "decay_rate": decay_rate,
            "eps": tuple(eps) if isinstance(eps, list) else eps,
            "clip_threshold": clip_threshold,
            "relative_step": relative_step,
            "weight_decay": weight_decay,
            "second_moment": second_moment,
            "seed": seed,
            "update": update,
        }
        check_group(defaults, "Flora")
        self.nan_policy = nan_policy
        self.skipped_steps = 0
        self._specs: dict[str, ShardSpec | None] = {}
        self._plans: dict[str, Plan] = {}  # by name; rebuilt when a shape or option changes (see .plans)
        self._bases = ProjectionCache()  # each parameter's projection, by seed; never saved
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """Torch's optimizer state plus the options outside ``defaults``; caches and shard specs are rebuilt."""
        return {**super().__getstate__(), "nan_policy": self.nan_policy, "skipped_steps": self.skipped_steps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy (``copy.deepcopy``): options, empty caches, shard specs from the named parameters."""
        super().__setstate__(state)
        self.nan_policy = state.get("nan_policy", "raise")
        self.skipped_steps = state.get("skipped_steps", 0)
        self._plans, self._bases = {}, ProjectionCache()
        self._specs = {n: shard_spec(n, p, "Flora") for g in self.param_groups
                       for n, p in zip(g["param_names"], g["params"], strict=True)}

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters are named (see :mod:`.options`) and its options validated."""
        if not isinstance(param_group, dict):
            raise OptimizerError(f"Flora: a param group must be a dict, got {type(param_group).__name__}")
        gi = len(self.param_groups)
        where = f"Flora param group {gi}"
        group = dict(param_group)
        names, tensors = split_named(group.get("params", []), gi, where)
        if "param_names" in group and not any(isinstance(x, tuple) for x in group["params"]):
            names = list(group.pop("param_names"))
        if not tensors:
            raise OptimizerError(f"{where}: empty parameter list")
        taken = {n for g in self.param_groups for n in g["param_names"]}
        seen: set[str] = set()
        for name in names:
            if name in taken or name in seen:
                raise OptimizerError(f"{where}: parameter name {name!r} appears twice; names must be unique")
            seen.add(name)
        check_group({**self.defaults, **group}, where)
        named = [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)]
        check_uniform([*named, *zip(names, tensors, strict=True)], where)  # plain and FSDP2 shards do not mix
        for name, p in zip(names, tensors, strict=True):
            self._specs[name] = shard_spec(name, p, where)
        group.pop("param_names", None)
        group["params"] = list(zip(names, tensors, strict=True))
        super().add_param_group(group)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter with a gradient; returns ``closure()``'s loss.

        First every gradient is probed (its row sums of ``g^2``, or its sum): one host sync
        per device. A NaN/inf anywhere stops the step before any state or parameter changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        sizes: dict[torch.device, int] = {}
        for w in work:
            if not w.vector:
                sizes[w.p.device] = max(sizes.get(w.p.device, 0), local(w.p).numel())
        scratch = Scratch(sizes)
        bad = self._probe(work, scratch)
        if bad:
            if self.nan_policy == "skip":
                self.skipped_steps += 1
                return loss
            raise NonFiniteGradientError(self._non_finite_message(bad, work), bad)
        batches: dict[tuple[Any, ...], list[Work]] = {}
        for w in work:
            state = w.state = self.state[w.p]
            if not state:
                state.update(init_state(w.p, w.name, w.group, w.spec))
                w.plan.checked = state
            w.t = int(state["step"]) + 1
            state["step"].fill_(w.t)
            if w.spec is None and (w.vector or w.plan.factored):
                batches.setdefault((w.vector, id(w.group), w.t, w.p.device), []).append(w)
        for (vector, *_), ws in batches.items():
            group, t = ws[0].group, ws[0].t
            if vector:
                vector_step([w.p for w in ws], [w.state for w in ws], group, t)
                continue
            rows = [w.state["exp_avg_sq_row"] for w in ws]
            cols = [w.state["exp_avg_sq_col"] for w in ws]
            for w, pre in zip(ws, factored_preconditioners(rows, cols, [w.means for w in ws], group, t), strict=True):
                w.pre = pre
        for w in work:
            if not w.vector:
                self._update(w, scratch)
        return loss

    def _gather(self) -> list[Work]:
        """The :class:`Work` of every parameter with a gradient; checks gradients and state shapes."""
        work = []
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"], strict=True):
                if p.grad is None:
                    continue
                spec = self._check_grad(name, p)
                plan = self._plans.get(name)
                key = plan_key(p.shape, group)
                if plan is None or plan.key != key:
                    plan = self._plans[name] = Plan.build(key, group, spec)
                plan.check(name, self.state.get(p))
                work.append(Work(group, name, p, plan, spec))
        return work

    @staticmethod
    def _non_finite_message(bad: list[str], work: list[Work]) -> str:
        """Why the step stopped: a NaN/inf in the first parameter named, or a finite gradient too large to square.

        The probe sums ``g^2`` (or ``g``), so entries above about ``1.8e19`` (or sums past the
        float32 range) read as non-finite; the gradient itself is checked here, only on this path.
        """
        more = f" (and {len(bad) - 1} more: {bad[1:4]})" if len(bad) > 1 else ""
        tail = "; no state was changed (nan_policy='skip' skips such steps)"
        grad = next(local(w.p.grad) for w in work if w.name == bad[0])
        if bool(torch.isfinite(grad).all()):
            big = float(grad.detach().abs().max())
            return (f"Flora: parameter {bad[0]!r}{more}: the gradient is finite but too large for its statistics "
                    f"(largest |g| = {big:.3g}; its squares or sums overflow float32): scale the loss down or clip "
                    f"the gradients" + tail)
        return f"Flora: non-finite gradient in parameter {bad[0]!r}{more}" + tail

    @staticmethod
    def _probe(work: list[Work], scratch: Scratch) -> list[str]:
        """Fill each factored parameter's ``means``; the names whose gradient is not finite (changes no state)."""
        probes: list[tuple[str, torch.Tensor]] = []
        sharded: list[tuple[str, torch.Tensor]] = []
        col_sums: list[tuple[torch.Tensor, int]] = []  # sharded: column sums of g^2 over this rank's rows, and n
        mesh_group = None
        for w in work:
            g = w.p.grad if w.spec is None else local(w.p.grad)
            if w.plan.factored:  # plain: sums of g^2, divided with the other vectors of the step
                sq = scratch.view(w.plan.matrix, g.device)
                g = g if g.dim() == 2 else g.reshape(w.plan.matrix)
                w.means = square_sums(g, sq) if w.spec is None else square_means(g, w.spec, sq)
                probe = w.means[0]  # row sums of g^2: non-finite iff an entry of g is (barring an overflow)
                if w.spec is not None:
                    col_sums.append((w.means[1], w.plan.layout.shape[0]))
            else:
                probe = g.sum(dtype=torch.float32)
            if w.spec is None:
                probes.append((w.name, probe))
            else:
                sharded.append((w.name, probe))
                mesh_group = w.spec.group
        bad = non_finite(probes)
        if sharded:  # one all-reduce: every column sum and a finite flag per parameter
            bad += reduce_probes([c for c, _ in col_sums], sharded, mesh_group)
            for c, n in col_sums:
                c.div_(n)
        return bad

    def _check_grad(self, name: str, p: torch.Tensor) -> ShardSpec | None:
        """The parameter's :class:`ShardSpec` (``None``: plain) once its gradient is known to fit; else raise."""
        if p.grad.is_sparse or p.is_complex():
            raise OptimizerError(f"Flora: parameter {name!r}: sparse gradients and complex tensors are unsupported")
        spec = self._specs.get(name)
        if spec is None:
            if is_dtensor(p) or is_dtensor(p.grad):
                raise OptimizerError(f"Flora: parameter {name!r}: a DTensor where the optimizer was built with a "
                                     "plain tensor (wrap the model with fully_shard before building Flora)")
            return None
        if not is_dtensor(p.grad) or tuple(p.grad.placements) != tuple(p.placements):
            what = tuple(p.grad.placements) if is_dtensor(p.grad) else "a plain tensor"
            raise OptimizerError(f"Flora: parameter {name!r} is sharded {tuple(p.placements)} but its gradient is "
                                 f"{what}; no state was changed")
        return spec

    def _update(self, w: Work, scratch: Scratch) -> None:
        """The step of one matrix (or sharded parameter): its ``n x m`` work in ``scratch``, then ``p -= scale * d``."""
        p, group, plan, spec, state, t = w.p, w.group, w.plan, w.spec, w.state, w.t
        assert state is not None
        g = p.grad if spec is None else local(p.grad)
        if g.dtype != torch.float32:
            g = g.to(torch.float32)
        if plan.matrix is not None and g.dim() != 2:
            g = g.reshape(plan.matrix)
        pre = w.pre if w.pre is not None else second_moment(g, w.means, state, group, t, spec)
        b1, lr = group["beta1"], step_size(group, p, t, spec)
        u = pre.apply(g, scratch.view(g.shape, g.device))
        if "exp_avg_c" in state:
            rule = paper_direction if group["update"] == "paper" else lift_direction
            direction = rule(u, state, w.name, group, plan.layout, t, spec, self._bases)
        elif "exp_avg" in state:
            direction = local(state["exp_avg"]).view(u.shape).mul_(b1).add_(u, alpha=1.0 - b1)
        else:
            direction = u
        target = p if spec is None else local(p)
        work = target
        if not (work.dtype in (torch.float32, torch.float64) and work.is_contiguous()):
            work = work.detach().to(torch.float32 if work.dtype in LOW_PRECISION else work.dtype).contiguous()
        if group["weight_decay"]:
            work.mul_(1.0 - lr * group["weight_decay"])
        view = work.view(plan.matrix) if plan.matrix is not None and work.dim() != 2 else work
        norm = torch.linalg.vector_norm(direction)
        if view.dtype != torch.float32:
            direction = direction.to(view.dtype)
        if spec is None:
            subtract_clipped_(view, direction, norm, p.numel(), group, lr)
        else:  # the squared norm is a sum over the shards
            sq_norm = spec.sum_(norm.square().reshape(1)).reshape(())
            view.addcmul_(direction, clip_scale(sq_norm, p.numel(), group, lr).to(view.dtype), value=-1.0)
        if work is not target:
            target.copy_(work)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """torch's layout (ids, ``param_names`` per group) plus ``"flora"``: format and skipped steps.

        Everything is a tensor, int, float, str, bool, None, tuple, list or dict, so
        ``torch.load(..., weights_only=True)`` reads a saved copy.
        """
        sd = super().state_dict()
        sd["flora"] = {"format": 1, "skipped_steps": int(self.skipped_steps)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load by parameter NAME (order-independent); a state dict of another model raises naming the parameter."""
        load_flora_state(self, state_dict)
        self._plans.clear()

    def sharded_state_dict(self, template: bool = False) -> dict[str, Any]:
        """Name-keyed state for ``torch.distributed.checkpoint`` (see :mod:`.checkpoint`); ``template``: fresh tensors."""
        return sharded_state(self, template)

    def load_sharded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Install a :meth:`sharded_state_dict` that ``dcp.load`` filled (same world size; checked by name)."""
        load_sharded_state(self, state_dict)
        self._plans.clear()
