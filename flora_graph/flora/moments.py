"""Per-parameter state of ``Flora``: its layout, initial values, and the second-moment preconditioner.

State of one parameter (``n x m`` is its 2-D view, ``r`` the group's rank):

============================  ==========================  =================================
key                           shape                       when
============================  ==========================  =================================
``step``                      int64 scalar (CPU)          always
``seed``, ``resamples``       int64 scalars (CPU)         compressed momentum
``exp_avg_c``                 ``r x max(n, m)``           compressed momentum
``exp_avg``                   parameter's shape           momentum, not compressible
``exp_avg_sq_row``/``_col``   ``n`` / ``m``               >= 2-D, ``second_moment="factored"``
``exp_avg_sq``                parameter's shape           1-D, or ``second_moment="adam"``
============================  ==========================  =================================

Floating state is float32 on the parameter's device; counters stay on the CPU so reading them
never synchronises a GPU. For an FSDP2 (``Shard(0)``) parameter the floating state is a
``DTensor`` sharded as :mod:`.sharding` lays out (``exp_avg_c`` along dim 1, the rest along dim 0),
and the column statistics of ``g^2`` and the mean of the row statistics are all-reduced. Second moments are never projected (a projected second moment can
turn negative); they are Adafactor's factored row/column means of ``g^2 + eps1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from flora_graph.flora.projection import Layout, layout_for, param_seed
from flora_graph.flora.sharding import ShardSpec, local

__all__ = [
    "COUNTERS",
    "Preconditioner",
    "beta2_at",
    "init_state",
    "second_moment",
    "shard_dim",
    "square_means",
    "square_sums",
    "state_shapes",
]

COUNTERS = ("step", "seed", "resamples")


def shard_dim(key: str) -> int:
    """The dimension along which state ``key`` of a sharded parameter is split (see :mod:`.sharding`)."""
    return 1 if key == "exp_avg_c" else 0


def state_shapes(layout: Layout, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Floating state keys and shapes for a parameter of ``layout`` under ``group``'s options."""
    out: dict[str, tuple[int, ...]] = {}
    if group["beta1"] > 0:
        if layout.compressed:
            out["exp_avg_c"] = (group["rank"], layout.large)
        else:
            out["exp_avg"] = layout.shape
    if layout.matrix is not None and group["second_moment"] == "factored":
        out["exp_avg_sq_row"] = (layout.matrix[0],)
        out["exp_avg_sq_col"] = (layout.matrix[1],)
    else:
        out["exp_avg_sq"] = layout.shape
    return out


def init_state(p: torch.Tensor, name: str, group: dict[str, Any], spec: ShardSpec | None = None) -> dict[str, Any]:
    """Fresh state for parameter ``name``: zeros (this rank's shards when ``spec``), step 0, its epoch-0 seed."""
    layout = layout_for(p.shape, group["rank"])
    state: dict[str, torch.Tensor] = {"step": torch.tensor(0, dtype=torch.int64)}
    if group["beta1"] > 0 and layout.compressed:
        state["seed"] = torch.tensor(param_seed(group["seed"], name, 0), dtype=torch.int64)
        state["resamples"] = torch.tensor(0, dtype=torch.int64)
    for key, shape in state_shapes(layout, group).items():
        if spec is None:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        else:
            part = torch.zeros(spec.local_shape(shape, shard_dim(key)), dtype=torch.float32, device=p.device)
            state[key] = spec.dtensor(part, shape, shard_dim(key))
    return state


def beta2_at(group: dict[str, Any], step: int) -> tuple[float, float]:
    """``(beta2_t, bias_correction)``: Adafactor's ``1 - t^decay_rate`` (no correction needed) or a constant."""
    if group["beta2"] is None:
        return 1.0 - math.pow(step, group["decay_rate"]), 1.0
    b2 = float(group["beta2"])
    return b2, 1.0 - b2**step


def square_sums(g: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``g^2`` (float32) for a 2-D ``g`` of any float dtype.

    ``g^2`` is formed in ``out`` (a float32 tensor of ``g``'s shape: ``Flora`` passes one buffer
    that every parameter of a step reuses, so no ``n x m`` temporary is allocated per parameter)
    or else in a temporary.
    """
    g32 = g if g.dtype == torch.float32 else g.to(torch.float32)
    sq = g32.square() if out is None else torch.mul(g32, g32, out=out)
    return sq.sum(dim=1), sq.sum(dim=0)


def square_means(
    g: torch.Tensor, spec: ShardSpec | None = None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column means of ``g^2`` (float32) for a 2-D ``g`` of any float dtype (:func:`square_sums` divided).

    With ``spec``, ``g`` is this rank's rows: the row means are its own, and the second tensor
    holds the column SUMS over its rows, which the caller all-reduces (one collective for every
    parameter of a step) and divides by ``n``.
    """
    row, col = square_sums(g, out)
    return row.div_(g.shape[1]), col if spec is not None else col.div_(g.shape[0])


@dataclass
class Preconditioner:
    """``1 / sqrt(v_hat)`` as row/column factors (factored), or the full ``v`` and its bias correction."""

    row: torch.Tensor | None = None
    col: torch.Tensor | None = None
    full: torch.Tensor | None = None
    correction: float = 1.0

    def apply(self, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``g / sqrt(v_hat)``, written into ``out`` (a float32 tensor of ``g``'s shape) or a new tensor."""
        if self.full is not None:
            u = torch.rsqrt(self.full, out=out)
            if self.correction != 1.0:
                u.mul_(math.sqrt(self.correction))
            return u.mul_(g)
        assert self.row is not None and self.col is not None
        return torch.mul(g, self.col, out=out).mul_(self.row.unsqueeze(1))


def _row_factor(row: torch.Tensor, mean: torch.Tensor, correction: float) -> torch.Tensor:
    """``rsqrt(row / mean * correction)`` as ``rsqrt(row / mean) * sqrt(correction)`` (no-op multiply skipped)."""
    factor = (row / mean).rsqrt_()
    return factor if correction == 1.0 else factor.mul_(math.sqrt(correction))


def second_moment(
    g: torch.Tensor,
    means: tuple[torch.Tensor, torch.Tensor] | None,
    state: dict[str, Any],
    group: dict[str, Any],
    step: int,
    spec: ShardSpec | None = None,
) -> Preconditioner:
    """Fold ``g^2 + eps1`` into the second moment and return its preconditioner.

    ``means`` are :func:`square_means` of ``g`` when the state is factored. Factored:
    ``v_hat[i, j] = row[i] * col[j] / mean(row) / correction`` (Adafactor). With ``spec``
    (``g`` is this rank's rows) the row state is this rank's rows and the column state its
    ``chunk(m)``; the column state is all-gathered, and the mean of the row state is taken as the
    mean of the column state: both are EMAs of ``mean(g^2) + eps1`` from zero with one ``beta2``
    schedule, so they are equal (up to rounding) and no all-reduce over the rows is needed.
    """
    beta2t, correction = beta2_at(group, step)
    eps = group["eps"][0]
    if "exp_avg_sq_row" in state:
        assert means is not None
        row, col = local(state["exp_avg_sq_row"]), local(state["exp_avg_sq_col"])
        col_means = means[1]
        if spec is not None:
            c0, c1 = spec.chunk(col_means.numel())
            col_means = col_means[c0:c1]
        row.mul_(beta2t).add_(means[0], alpha=1.0 - beta2t).add_((1.0 - beta2t) * eps)
        col.mul_(beta2t).add_(col_means, alpha=1.0 - beta2t).add_((1.0 - beta2t) * eps)
        if spec is None:
            return Preconditioner(row=_row_factor(row, row.mean(), correction), col=col.rsqrt())
        col_full = spec.gather_last(col, means[1].numel())
        return Preconditioner(row=_row_factor(row, col_full.mean(), correction), col=col_full.rsqrt_())
    v = local(state["exp_avg_sq"]).view_as(g)
    v.mul_(beta2t).addcmul_(g, g, value=1.0 - beta2t).add_((1.0 - beta2t) * eps)
    return Preconditioner(full=v, correction=correction)
