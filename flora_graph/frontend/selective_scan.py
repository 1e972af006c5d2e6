"""Mamba-1's selective scan as one traced op, so a Mamba layer captures for any sequence length.

transformers' CPU path of a Mamba-1 layer (Mamba, Falcon-Mamba, Jamba) runs its recurrence
``h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * u[t]`` as a Python loop over positions, which
``torch.export`` unrolls for the example's length and then fixes the sequence to it. And its
scan ignores the recurrent state in the cache when more than one token comes in (a prefill in
pieces would restart from zero), taking another branch for one token.

While :func:`~flora_graph.frontend.capture` runs, :func:`~flora_graph.frontend.traceable.traceable_scans`
swaps the module-level ``mamba_scan_forward`` of those models' modeling modules (the function
transformers marks as replaceable by a kernel, ``use_kernel_forward_from_hub("mamba_scan_forward")``)
for :func:`scan_forward`: the same discretization, written with torch ops, around the custom op
``flora_graph::linear_scan`` (:func:`linear_scan`), which the trace records as one node and the
ATen table turns into the IR's ``LinearScan``. It starts from the cache's recurrent state for
any number of tokens, so one graph prefills (from zeros or a previous piece's state) and
decodes. Every other op of the layer (projections and their adapters, the convolution with
its state, the gate) is the model's own, traced as it runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.frontend.aten.registry import register
from flora_graph.ir import ComputationNode, Op

__all__ = ["SCAN_FORWARD", "SCAN_FORWARD_PARAMS", "linear_scan", "scan_forward"]

SCAN_FORWARD = "mamba_scan_forward"
"""The module-level function of a Mamba-1 modeling module that :func:`scan_forward` stands in for."""
SCAN_FORWARD_PARAMS = ("module", "hidden_states", "time_step", "B", "C", "gate", "cache")
"""Its leading parameters."""


@torch.library.custom_op("flora_graph::linear_scan", mutates_args=())
def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, dim: int) -> torch.Tensor:
    """Every state of ``h[t] = a[t] * h[t-1] + b[t]`` along ``dim``, from ``h[-1] = h0``.

    Args:
        a, b: tensors of one shape; ``h0``: that shape without ``dim``.
        dim: the axis scanned.

    Returns:
        The states, ``b``'s shape.
    """
    states, h = [], h0
    for t in range(a.shape[dim]):
        h = a.select(dim, t) * h + b.select(dim, t)
        states.append(h)
    return torch.stack(states, dim) if states else torch.empty_like(b)


@linear_scan.register_fake
def _linear_scan_fake(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, dim: int) -> torch.Tensor:
    torch._check(a.shape == b.shape, lambda: f"linear_scan: a {tuple(a.shape)} and b {tuple(b.shape)} differ")
    torch._check(h0.dim() == a.dim() - 1, lambda: f"linear_scan: h0 {tuple(h0.shape)} for a {tuple(a.shape)}")
    return torch.empty_like(b)


def scan_forward(module: nn.Module, hidden_states: torch.Tensor, time_step: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, gate: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
    """transformers' ``mamba_scan_forward`` (same arguments and result) over :func:`linear_scan`.

    ``hidden_states``, ``time_step`` (before ``dt_proj``'s bias and softplus) and ``gate`` are
    ``[batch, channels, seq]``, ``B`` and ``C`` ``[batch, seq, state]``. The scan starts from
    the cache's recurrent state (zeros without a cache) and leaves its last state there.
    """
    A = -torch.exp(module.A_log.float())
    dt = time_step.float()
    bias = getattr(module.dt_proj, "base_layer", module.dt_proj).bias  # an adapted dt_proj: its base layer's
    if bias is not None:
        dt = dt + bias.float()[..., None]
    dt = F.softplus(dt)
    u = hidden_states.float()
    decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # [batch, channels, seq, state]
    drive = dt[:, :, :, None] * B[:, None, :, :].float() * u[:, :, :, None]
    state = cache.get_recurrent_state(module.layer_idx, state_idx=0) if cache is not None else None
    if state is None:
        state = decay.new_zeros(decay.shape[0], decay.shape[1], decay.shape[3])
    states = linear_scan(decay, drive, state.to(decay.dtype), 2)
    out = torch.matmul(states.transpose(1, 2), C.float()[:, :, :, None])[..., 0].transpose(1, 2)  # [batch, channels, seq]
    out = (out + u * module.D.float()[None, :, None]) * F.silu(gate.float())
    if cache is not None:
        cache.update_recurrent_state(states[:, :, -1], module.layer_idx)
    return out.to(hidden_states.dtype)


@register(torch.ops.flora_graph.linear_scan.default)
def _convert(ctx: Any, a: ComputationNode, b: ComputationNode, h0: ComputationNode, dim: int) -> ComputationNode:
    return ctx.emit(Op.LINEAR_SCAN, [a, b, h0], {"axis": int(dim)})
