"""The compressed momentum of one matrix and the update direction it gives: the three rules of ``Flora``.

``u_t`` is the step's preconditioned gradient (``n x m``), ``C`` the momentum compressed to
``r x max(n, m)`` by the projection ``P`` of the parameter's current seed (``C = P M``, see
:mod:`.projection` for the orientation), ``b = beta1``:

``update="scaled"`` (the default; why, see :mod:`.optimizer`)::

    C_t = b C_{t-1} + (1 - b) P u_t
    rho_t = min(1, ||C_t|| / ||P u_t||)                  # about ||M_t|| / ||u_t||: E||P x||^2 = ||x||^2
    d_t = rho_t u_t + P^T (P P^T)^{-1} (C_t - rho_t P u_t)   # the matrix nearest rho_t u_t with P d_t = C_t
    every kappa steps, after the step:  C <- P_new d_t

``update="lift"``: the same with ``rho_t = 1`` (the fresh ``u_t`` in full outside the sketched subspace).

``update="paper"`` (Algorithm 2 of arXiv:2402.03293, unbiased decompression)::

    at a step t with t % kappa == 0, first:  C <- P_new P_old^T C     # transfer
    C_t = b C_{t-1} + (1 - b) P u_t
    d_t = P^T C_t

For an FSDP2 parameter (a :class:`~.sharding.ShardSpec`) ``u`` holds this rank's rows
``[start, stop)`` and ``C`` this rank's ``chunk`` of its columns (see :mod:`.sharding`). Every
rank draws the whole ``P``; :class:`Sketch` then reproduces the one-process products: when
``n <= m`` ``P u`` sums over the sharded rows (an all-reduce of ``r x m``, then each rank keeps
its columns) and decompressing needs every column of what is decompressed (``C``, or the
residual ``C - P u`` for ``lift``: an all-gather of ``r x m``); when ``n > m`` the projected side
is the unsharded one and everything is local.
The transfer ``(P_new P_old^T) C`` acts column by column: local too. ``lift`` decompresses with
the dual basis ``(P P^T)^{-1} P`` (:class:`~.projection.Basis`), solved once per seed.
"""

from __future__ import annotations

from typing import Any

import torch

from flora_graph.flora.projection import Basis, Layout, ProjectionCache, param_seed, transfer
from flora_graph.flora.sharding import ShardSpec, local

__all__ = ["Sketch", "lift_direction", "paper_direction", "residual_scale"]


class Sketch:
    """Compression/decompression by the projection of a :class:`~.projection.Basis` of a (sharded) 2-D ``u``.

    Without ``spec`` these are :func:`.projection.compress` / :func:`.projection.add_decompressed_`
    (for the float32 ``u`` and ``c`` they are called with); ``lift=True`` decompresses with the
    basis's dual instead, i.e. :func:`.projection.lift`.
    """

    def __init__(self, basis: Basis, layout: Layout, spec: ShardSpec | None) -> None:
        assert layout.matrix is not None
        self.basis = basis
        self.proj = basis.proj
        self.spec = spec
        self.n, self.m = layout.matrix
        self.wide = self.n <= self.m  # projects the rows: the sharded dimension under FSDP2

    def compress(self, u: torch.Tensor) -> torch.Tensor:
        """This rank's columns of ``P u`` (``P u^T`` when ``n > m``): ``r x chunk`` (the whole when unsharded)."""
        if self.spec is None or not self.wide:
            return torch.mm(self.proj, u) if self.wide else torch.mm(self.proj, u.t())
        full = self.spec.sum_(self.proj[:, self.spec.start : self.spec.stop] @ u)
        c0, c1 = self.spec.chunk(self.m)
        return full[:, c0:c1]

    def add_decompressed_(self, out: torch.Tensor, c: torch.Tensor, alpha: float = 1.0,
                          lift: bool = False) -> torch.Tensor:
        """``out += alpha * P^T c`` (``lift``: ``alpha * P^T (P P^T)^{-1} c``) on this rank's rows.

        ``c`` is this rank's columns (see :meth:`compress`).
        """
        proj, proj_t = (self.basis.dual, self.basis.dual_t) if lift else (self.proj, self.basis.proj_t)
        if not self.wide:
            return out.addmm_(c.t(), proj, alpha=alpha)
        if self.spec is None:
            return out.addmm_(proj_t, c, alpha=alpha)
        rows = proj[:, self.spec.start : self.spec.stop]
        return out.addmm_(rows.T, self.spec.gather_last(c, self.m), alpha=alpha)

    def decompress_into(self, out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``out = P^T c`` (this rank's rows; ``out``'s old values are overwritten)."""
        if self.spec is None:
            return torch.mm(self.proj.T, c, out=out) if self.wide else torch.mm(c.T, self.proj, out=out)
        return self.add_decompressed_(out.zero_(), c)


def _basis(bases: ProjectionCache, name: str, seed: int, group: dict[str, Any], layout: Layout,
           device: torch.device) -> Basis:
    """``name``'s basis for ``seed`` (its ``rank x min(n, m)`` projection and, on demand, dual)."""
    return bases.get(name, seed, group["rank"], layout.small, device)


def _resample(state: dict[str, Any], name: str, group: dict[str, Any]) -> int:
    """Advance ``name``'s seed to the next epoch (state updated); returns the new seed."""
    epoch = int(state["resamples"]) + 1
    seed = param_seed(group["seed"], name, epoch)
    state["seed"].fill_(seed)
    state["resamples"].fill_(epoch)
    return seed


def residual_scale(c: torch.Tensor, pu: torch.Tensor, spec: ShardSpec | None = None) -> float | torch.Tensor:
    """``min(1, ||C_t|| / ||P u_t||)``: how much of the fresh update stands in for the momentum outside the
    sketched subspace (``update="scaled"``); a float on the CPU, else a 0-dim tensor (no host sync).

    ``P`` has i.i.d. ``N(0, 1/r)`` entries, so ``E ||P x||^2 = ||x||^2`` for any fixed ``x``: the
    ratio estimates ``||M_t|| / ||u_t||``, the momentum's norm against the fresh update's, from the
    ``r x max(n, m)`` sketches alone. When successive updates agree it is near 1; when they are
    mostly noise it falls towards ``sqrt((1 - beta1) / (1 + beta1))``, the factor by which an
    exponential average shrinks noise. With ``spec`` both squared norms are summed over the shards.
    ``0`` when both are zero, ``1`` when only ``P u`` is.
    """
    if spec is None and c.device.type == "cpu":  # reading a CPU scalar synchronises nothing: fewer tiny ops
        nc, npu = float(torch.linalg.vector_norm(c)), float(torch.linalg.vector_norm(pu))
        return min(1.0, nc / npu) if npu > 0 else float(nc > 0)
    sq = torch.stack([torch.linalg.vector_norm(c), torch.linalg.vector_norm(pu)]).square_()
    if spec is not None:
        sq = spec.sum_(sq)
    return (sq[0] / sq[1].clamp(min=torch.finfo(sq.dtype).tiny)).sqrt_().clamp_(max=1.0)


def lift_direction(
    u: torch.Tensor, state: dict[str, Any], name: str, group: dict[str, Any], layout: Layout, t: int,
    spec: ShardSpec | None = None, bases: ProjectionCache | None = None,
) -> torch.Tensor:
    """``d = rho u + lift(C_t - rho P u)`` (in place on ``u``); folds ``P u`` into ``C``; resamples every ``kappa``.

    ``rho`` is :func:`residual_scale` for ``update="scaled"`` and 1 for ``"lift"``
    (``d = u + beta1 * lift(C_{t-1} - P u)``). ``bases`` keeps the projection (and its dual, for
    the lift) of each seed between steps; without it they are regenerated.
    """
    bases = ProjectionCache() if bases is None else bases
    b1 = group["beta1"]
    basis = _basis(bases, name, int(state["seed"]), group, layout, u.device)
    sketch = Sketch(basis, layout, spec)
    mc = local(state["exp_avg_c"])
    pu = sketch.compress(u)
    if group["update"] == "lift":
        resid = mc - pu  # C_{t-1} - P u_t
        mc.sub_(resid, alpha=1.0 - b1)  # C_t = beta1 C_{t-1} + (1 - beta1) P u_t
        sketch.add_decompressed_(u, resid, alpha=b1, lift=True)  # now P u = C_t
    else:
        mc.mul_(b1).add_(pu, alpha=1.0 - b1)  # C_t
        rho = residual_scale(mc, pu, spec)
        u.mul_(rho)
        sketch.add_decompressed_(u, pu.mul_(rho).neg_().add_(mc), lift=True)  # now P u = C_t
    if t % group["kappa"] == 0:
        seed = _resample(state, name, group)
        mc.copy_(Sketch(_basis(bases, name, seed, group, layout, u.device), layout, spec).compress(u))
    return u


def paper_direction(
    u: torch.Tensor, state: dict[str, Any], name: str, group: dict[str, Any], layout: Layout, t: int,
    spec: ShardSpec | None = None, bases: ProjectionCache | None = None,
) -> torch.Tensor:
    """The paper's rule: transfer at ``t % kappa == 0``, ``C = b C + (1 - b) P u``, ``d = P^T C`` (written into ``u``)."""
    bases = ProjectionCache() if bases is None else bases
    b1 = group["beta1"]
    mc = local(state["exp_avg_c"])
    basis = _basis(bases, name, int(state["seed"]), group, layout, u.device)
    if t % group["kappa"] == 0:
        old = basis.proj
        basis = _basis(bases, name, _resample(state, name, group), group, layout, u.device)
        mc.copy_(transfer(mc, old, basis.proj))  # C <- P_new P_old^T C
    sketch = Sketch(basis, layout, spec)
    mc.mul_(b1).add_(sketch.compress(u), alpha=1.0 - b1)
    return sketch.decompress_into(u, mc)
