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

Zamba (1)'s Mamba layers split the channels into heads, each with its own ``x_proj`` and ``dt_proj`` weights, and
branch on the number of tokens in the layer's ``forward`` itself: one token steps from the cached state, more scan
from zeros (``mamba_selective_scan`` takes no initial state). :func:`multi_head_mixer_forward` is that ``forward``
with one scan per head over :func:`linear_scan` from the cached state for any number of tokens;
:func:`~flora_graph.frontend.traceable.traceable_modules` swaps it in while capturing.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.frontend.aten.registry import register
from flora_graph.frontend.cache_states import keep_recurrent_state
from flora_graph.ir import ComputationNode, Op

__all__ = ["SCAN_FORWARD", "SCAN_FORWARD_PARAMS", "is_multi_head_mixer", "linear_scan", "multi_head_mixer_forward",
           "scan_forward"]

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
        keep_recurrent_state(cache, module.layer_idx, states[:, :, -1])
    return out.to(hidden_states.dtype)


def is_multi_head_mixer(module: nn.Module) -> bool:
    """Zamba's Mamba mixer: ``n_mamba_heads`` heads, each with its ``x_proj_weight`` / ``dt_proj_weight`` rows, an
    ``in_proj``, a depthwise ``conv1d``, ``A_log`` and ``D`` per head, an ``out_proj``; its modeling module's
    ``apply_mask_to_padding_states`` and ``causal_conv1d_forward``."""
    return "forward" not in vars(module) and all(hasattr(module, a) for a in (
        "n_mamba_heads", "mamba_head_dim", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D", "in_proj",
        "conv1d", "out_proj", "time_step_rank", "ssm_state_size", "layer_idx", "activation")) and \
        isinstance(module.A_log, torch.Tensor) and module.A_log.dim() == 3 and \
        all(callable(getattr(sys.modules.get(type(module).__module__), f, None))
            for f in ("apply_mask_to_padding_states", "causal_conv1d_forward"))


def multi_head_mixer_forward(module: nn.Module, path: str = "") -> Any:
    """``module``'s forward (see :func:`is_multi_head_mixer`) with every head's scan over :func:`linear_scan`, from
    the cache's recurrent state ``[batch, heads, head_dim, state]`` (zeros without one) for any number of tokens; the
    projections, the padding mask and the convolution with its cached state are the model's own. (``path``, the
    module's name in the model, is not needed: the module knows its layer.)"""
    own = sys.modules[type(module).__module__]
    masked, conv = own.apply_mask_to_padding_states, own.causal_conv1d_forward
    heads, dim = module.n_mamba_heads, module.mamba_head_dim

    def forward(hidden_states: torch.Tensor, cache: Any = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        dtype = hidden_states.dtype
        projected = module.in_proj(masked(hidden_states, attention_mask)).transpose(1, 2)
        x, gate = projected.view(batch, -1, 2, seq).chunk(2, dim=2)
        x = conv(module.conv1d, x.squeeze(2).contiguous(), cache, module.layer_idx, activation=module.activation,
                 **kwargs)
        x = masked(x.transpose(1, 2), attention_mask).transpose(1, 2)
        u = x.reshape(batch, heads, dim, seq).transpose(0, 1).float()  # [heads, batch, head_dim, seq]
        gate = gate.reshape(batch, heads, dim, seq).transpose(0, 1).float()
        params = (module.x_proj_weight[:, None] @ u.to(module.x_proj_weight.dtype)).transpose(-1, -2)
        time_step, B, C = torch.split(params, [module.time_step_rank, module.ssm_state_size, module.ssm_state_size],
                                      dim=-1)  # [heads, batch, seq, *]
        dt = (module.dt_proj_weight[:, None] @ time_step.transpose(-1, -2)).float()  # [heads, batch, head_dim, seq]
        dt = F.softplus(dt + module.dt_proj_bias.float()[:, None, :, None])
        A = -torch.exp(module.A_log.float())  # [heads, head_dim, state]
        decay = torch.exp(A[:, None, :, None, :] * dt[..., None])  # [heads, batch, head_dim, seq, state]
        drive = dt[..., None] * B.float()[:, :, None, :, :] * u[..., None]
        state = cache.get_recurrent_state(module.layer_idx, state_idx=0) if cache is not None else None
        if state is None:
            state = decay.new_zeros(batch, heads, dim, decay.shape[-1])
        states = linear_scan(decay, drive, state.transpose(0, 1).to(decay.dtype), 3)
        out = (states * C.float()[:, :, None, :, :]).sum(-1)  # [heads, batch, head_dim, seq]
        out = (out + u * module.D.float()[:, None, :, None]) * F.silu(gate)
        if cache is not None:
            keep_recurrent_state(cache, module.layer_idx, states[:, :, :, -1].transpose(0, 1).contiguous())
        out = out.transpose(0, 1).reshape(batch, heads * dim, seq)
        return module.out_proj(out.transpose(1, 2).to(dtype))

    return forward


@register(torch.ops.flora_graph.linear_scan.default)
def _convert(ctx: Any, a: ComputationNode, b: ComputationNode, h0: ComputationNode, dim: int) -> ComputationNode:
    return ctx.emit(Op.LINEAR_SCAN, [a, b, h0], {"axis": int(dim)})
