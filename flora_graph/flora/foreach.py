"""Multi-tensor (``torch._foreach_*``) forms of the small, elementwise parts of a ``Flora`` step.

A step of a small model is mostly per-tensor overhead: dozens of tiny ops per parameter (row and
column statistics, biases, norms, 0-dim scale arithmetic). For unsharded parameters that share a
group and a step count (so one ``beta2_t`` and one ``lr``) these run here as one multi-tensor op
per operation, in the order and with the arithmetic of the per-tensor code
(:func:`.moments.second_moment`, ``Flora._update``), so the numbers are the same:

- :func:`factored_preconditioners`: the row/column second-moment EMAs of factored matrices and
  their factors (the ``n x m`` work of a matrix stays per tensor, in one reused buffer);
- :func:`vector_step`: the whole step of 1-D (and 0-dim) parameters: full second moment, full
  momentum, RMS clipping, weight decay and the update.

:func:`step_size`, :func:`clip_scale` and :func:`subtract_clipped_` (``p -= scale * d`` of one
unsharded matrix) are the per-tensor path's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flora_graph.flora.moments import Preconditioner, beta2_at
from flora_graph.flora.sharding import ShardSpec, local

__all__ = ["LOW_PRECISION", "clip_scale", "factored_preconditioners", "step_size", "subtract_clipped_", "vector_step"]

LOW_PRECISION = (torch.float16, torch.bfloat16)  # parameters updated through a float32 copy


def step_size(group: dict[str, Any], p: torch.Tensor, step: int, spec: ShardSpec | None = None) -> float | torch.Tensor:
    """``lr``, or with ``relative_step`` Adafactor's ``min(1e-2, 1/sqrt(t)) * max(eps2, RMS(p))`` (0-dim tensor)."""
    if not group["relative_step"]:
        return float(group["lr"])
    sq = torch.linalg.vector_norm(local(p), dtype=torch.float32).square()
    if spec is not None:
        sq = spec.sum_(sq.reshape(1)).reshape(())
    p_rms = sq.sqrt() / math.sqrt(max(p.numel(), 1))
    return p_rms.clamp(min=group["eps"][1]) * min(1e-2, 1.0 / math.sqrt(step))


def clip_scale(sq_norm: torch.Tensor, numel: int | torch.Tensor, group: dict[str, Any],
               lr: float | torch.Tensor) -> torch.Tensor:
    """``lr / max(1, RMS(direction) / clip_threshold)`` from the squared norm (no host sync).

    A 0-dim tensor for one direction; given 1-D ``sq_norm`` and ``numel`` (one entry per
    direction), the scales of all of them.
    """
    if group["clip_threshold"] is None:
        return torch.ones_like(sq_norm) * lr
    rms = (sq_norm / numel).sqrt_()
    return (rms / group["clip_threshold"]).clamp_(min=1.0).reciprocal_().mul_(lr)


def subtract_clipped_(out: torch.Tensor, direction: torch.Tensor, norm: torch.Tensor, numel: int,
                      group: dict[str, Any], lr: float | torch.Tensor, host: bool | None = None) -> torch.Tensor:
    """``out -= lr / max(1, RMS(direction) / clip_threshold) * direction`` in place, from ``norm = ||direction||``.

    The scale is :func:`clip_scale`'s, written ``lr t / max(norm, t)`` with ``t = sqrt(numel) *
    clip_threshold`` (equal up to float32 rounding). With ``host`` (default: ``out`` is on the CPU,
    where reading a scalar synchronises nothing) it is computed in Python floats and applied as
    ``add_``'s ``alpha``; otherwise with two 0-dim ops on the device, without a host sync.
    ``norm`` must be a fresh 0-dim tensor (it is overwritten).
    """
    ct = group["clip_threshold"]
    thr = math.sqrt(numel) * ct if ct is not None else None
    if out.device.type == "cpu" if host is None else host:
        scale = float(lr) if thr is None else float(lr) * thr / max(float(norm), thr)
        return out.add_(direction, alpha=-scale)
    lr_t = isinstance(lr, torch.Tensor)
    if thr is None:
        return out.addcmul_(direction, lr.to(out.dtype), value=-1.0) if lr_t else out.add_(direction, alpha=-lr)
    inv = norm.clamp_(min=thr).reciprocal_()
    if lr_t:
        inv = inv.mul_(lr)
    if inv.dtype != out.dtype:
        inv = inv.to(out.dtype)
    return out.addcmul_(direction, inv, value=-thr if lr_t else -lr * thr)


def _per_element(values: list[float], lengths: list[int], device: torch.device) -> torch.Tensor:
    """``values[i]`` repeated ``lengths[i]`` times (float32), to act on a concatenation of tensors of those lengths."""
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32, device=device),
                                   torch.tensor(lengths, device=device), output_size=sum(lengths))


def factored_preconditioners(
    rows: list[torch.Tensor], cols: list[torch.Tensor], sums: list[tuple[torch.Tensor, torch.Tensor]],
    group: dict[str, Any], step: int,
) -> list[Preconditioner]:
    """:func:`.moments.second_moment` of unsharded factored matrices from their state and :func:`.moments.square_sums`.

    The row and column states of all the matrices are concatenated, updated by one op each and
    copied back; the factors are views of one concatenated tensor. Elementwise this is the
    per-tensor arithmetic (and each row mean is its own tensor's sum, divided), so the numbers
    are the same.
    """
    beta2t, correction = beta2_at(group, step)
    state = rows + cols
    lengths = [t.numel() for t in state]
    n_rows = sum(lengths[: len(rows)])
    device = rows[0].device
    flat = torch.cat(state)
    means = torch.cat([s[0] for s in sums] + [s[1] for s in sums])  # sums of g^2 over columns, then over rows
    means.div_(_per_element([float(c.numel()) for c in cols] + [float(r.numel()) for r in rows], lengths, device))
    flat.mul_(beta2t).add_(means, alpha=1.0 - beta2t).add_((1.0 - beta2t) * group["eps"][0])
    torch._foreach_copy_(state, flat.split(lengths))
    row_flat, col_flat = flat[:n_rows], flat[n_rows:]
    row_sums = [r.sum() for r in row_flat.split(lengths[: len(rows)])]
    row_means = torch.stack(row_sums).div_(torch.tensor(lengths[: len(rows)], dtype=torch.float32, device=device))
    row_factors = (row_flat / torch.repeat_interleave(row_means, torch.tensor(lengths[: len(rows)], device=device),
                                                      output_size=n_rows)).rsqrt_()
    if correction != 1.0:
        row_factors.mul_(math.sqrt(correction))
    col_factors = col_flat.rsqrt()
    return [Preconditioner(row=r, col=c) for r, c in zip(row_factors.split(lengths[: len(rows)]),
                                                         col_factors.split(lengths[len(rows) :]), strict=True)]


def vector_step(params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any], step: int) -> None:
    """One step of unsharded parameters below 2-D (full second moment and momentum) of ``group`` at ``step``."""
    grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.to(torch.float32) for p in params]
    beta2t, correction = beta2_at(group, step)
    v = [s["exp_avg_sq"] for s in states]
    torch._foreach_mul_(v, beta2t)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2t)
    torch._foreach_add_(v, (1.0 - beta2t) * group["eps"][0])
    directions = torch._foreach_rsqrt(v)
    if correction != 1.0:
        torch._foreach_mul_(directions, math.sqrt(correction))
    torch._foreach_mul_(directions, grads)  # u = g / sqrt(v_hat)
    b1 = group["beta1"]
    if "exp_avg" in states[0]:
        momenta = [s["exp_avg"] for s in states]
        torch._foreach_mul_(momenta, b1)
        torch._foreach_add_(momenta, directions, alpha=1.0 - b1)
        directions = momenta
    lrs = [step_size(group, p, step) for p in params]
    lr = lrs[0] if not group["relative_step"] else torch.stack(lrs)
    if group["clip_threshold"] is None:
        scales = (torch.ones(len(params), dtype=torch.float32, device=params[0].device) * lr).unbind()
    else:
        sq_norms = torch.stack(torch._foreach_norm(directions)).square_()
        numels = torch.tensor([float(p.numel()) for p in params], dtype=torch.float32, device=sq_norms.device)
        scales = clip_scale(sq_norms, numels, group, lr).unbind()
    works = [p if p.dtype in (torch.float32, torch.float64) and p.is_contiguous()
             else p.detach().to(torch.float32 if p.dtype in LOW_PRECISION else p.dtype).contiguous() for p in params]
    if group["weight_decay"]:
        torch._foreach_mul_(works, [1.0 - x * group["weight_decay"] for x in lrs])
    odd = [i for i, w in enumerate(works) if w.dtype != torch.float32]
    if odd:
        directions, scales = list(directions), list(scales)
        for i in odd:
            directions[i], scales[i] = directions[i].to(works[i].dtype), scales[i].to(works[i].dtype)
    torch._foreach_addcmul_(works, directions, scales, value=-1.0)
    for p, w in zip(params, works, strict=True):
        if w is not p:
            p.copy_(w)
