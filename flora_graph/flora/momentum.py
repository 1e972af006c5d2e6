"""The compressed momentum of one matrix and the update direction it gives: the two rules of ``Flora``.

``u_t`` is the step's preconditioned gradient (``n x m``), ``C`` the momentum compressed to
``r x max(n, m)`` by the projection ``P`` of the parameter's current seed (``C = P M``, see
:mod:`.projection` for the orientation), ``b = beta1``:

``update="lift"`` (the default; why, see :mod:`.optimizer`)::

    C_t = b C_{t-1} + (1 - b) P u_t
    d_t = u_t + P^T (P P^T)^{-1} (C_t - P u_t)          # the matrix nearest u_t with P d_t = C_t
    every kappa steps, after the step:  C <- P_new d_t

``update="paper"`` (Algorithm 2 of arXiv:2402.03293, unbiased decompression)::

    at a step t with t % kappa == 0, first:  C <- P_new P_old^T C     # transfer
    C_t = b C_{t-1} + (1 - b) P u_t
    d_t = P^T C_t

For an FSDP2 parameter (a :class:`~.sharding.ShardSpec`) ``u`` holds this rank's rows
``[start, stop)`` and ``C`` this rank's ``chunk`` of its columns (see :mod:`.sharding`). Every
rank draws the whole ``P``; :class:`Sketch` then reproduces the one-process products: when
``n <= m`` ``P u`` sums over the sharded rows (an all-reduce of ``r x m``, then each rank keeps
its columns) and decompressing needs every column of the coefficients (an all-gather of
``r x m``); when ``n > m`` the projected side is the unsharded one and everything is local.
The transfer ``(P_new P_old^T) C`` and the ``r x r`` solve act column by column: local too.
"""

from __future__ import annotations

from typing import Any

import torch

from flora_graph.flora.projection import (
    Layout,
    add_decompressed_,
    compress,
    gaussian_projection,
    lift_coefficients,
    param_seed,
    transfer,
)
from flora_graph.flora.sharding import ShardSpec, local

__all__ = ["Sketch", "lift_direction", "paper_direction"]


class Sketch:
    """Compression/decompression by the projection of ``seed`` of a (sharded) 2-D ``u``.

    Without ``spec`` these are :func:`.projection.compress` / :func:`.projection.add_decompressed_`.
    """

    def __init__(self, seed: int, rank: int, layout: Layout, spec: ShardSpec | None, device: torch.device) -> None:
        assert layout.matrix is not None
        self.proj = gaussian_projection(seed, rank, layout.small, device=device)
        self.spec = spec
        self.n, self.m = layout.matrix
        self.wide = self.n <= self.m  # projects the rows: the sharded dimension under FSDP2
        if spec is not None and self.wide:
            self.rows = self.proj[:, spec.start : spec.stop]
            self.cols = spec.chunk(self.m)

    def compress(self, u: torch.Tensor) -> torch.Tensor:
        """This rank's columns of ``P u`` (``P u^T`` when ``n > m``): ``r x chunk`` (the whole when unsharded)."""
        if self.spec is None:
            return compress(u, self.proj)
        if not self.wide:
            return self.proj @ u.T
        full = self.spec.sum_(self.rows @ u)
        return full[:, self.cols[0] : self.cols[1]]

    def add_decompressed_(self, out: torch.Tensor, c: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha * P^T c`` on this rank's rows, ``c`` being this rank's columns (see :meth:`compress`)."""
        if self.spec is None:
            return add_decompressed_(out, c, self.proj, alpha=alpha)
        if not self.wide:
            return out.addmm_(c.T, self.proj, alpha=alpha)
        return out.addmm_(self.rows.T, self.spec.gather_last(c, self.m), alpha=alpha)


def _resample(state: dict[str, Any], name: str, group: dict[str, Any]) -> int:
    """Advance ``name``'s seed to the next epoch (state updated); returns the new seed."""
    epoch = int(state["resamples"]) + 1
    seed = param_seed(group["seed"], name, epoch)
    state["seed"].fill_(seed)
    state["resamples"].fill_(epoch)
    return seed


def lift_direction(
    u: torch.Tensor, state: dict[str, Any], name: str, group: dict[str, Any], layout: Layout, t: int,
    spec: ShardSpec | None = None,
) -> torch.Tensor:
    """``d = u + beta1 * lift(C - P u)`` (in place on ``u``); folds ``P u`` into ``C``; resamples every ``kappa``."""
    b1, rank = group["beta1"], group["rank"]
    sketch = Sketch(int(state["seed"]), rank, layout, spec, u.device)
    mc = local(state["exp_avg_c"])
    resid = mc - sketch.compress(u)  # C_{t-1} - P u_t
    mc.sub_(resid, alpha=1.0 - b1)  # C_t = beta1 C_{t-1} + (1 - beta1) P u_t
    sketch.add_decompressed_(u, lift_coefficients(resid, sketch.proj), alpha=b1)  # now P u = C_t
    if t % group["kappa"] == 0:
        seed = _resample(state, name, group)
        mc.copy_(Sketch(seed, rank, layout, spec, u.device).compress(u))
    return u


def paper_direction(
    u: torch.Tensor, state: dict[str, Any], name: str, group: dict[str, Any], layout: Layout, t: int,
    spec: ShardSpec | None = None,
) -> torch.Tensor:
    """The paper's rule: transfer at ``t % kappa == 0``, ``C = b C + (1 - b) P u``, ``d = P^T C`` (a new tensor)."""
    b1, rank = group["beta1"], group["rank"]
    mc = local(state["exp_avg_c"])
    seed = int(state["seed"])
    if t % group["kappa"] == 0:
        old = gaussian_projection(seed, rank, layout.small, device=u.device)
        seed = _resample(state, name, group)
        new = gaussian_projection(seed, rank, layout.small, device=u.device)
        mc.copy_(transfer(mc, old, new))  # C <- P_new P_old^T C
    sketch = Sketch(seed, rank, layout, spec, u.device)
    mc.mul_(b1).add_(sketch.compress(u), alpha=1.0 - b1)
    return sketch.add_decompressed_(torch.zeros_like(u), mc)
