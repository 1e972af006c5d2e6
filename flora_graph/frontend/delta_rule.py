"""The gated delta rule (Qwen3.5, Qwen3-Next linear attention) as one traced op, for any sequence length.

transformers computes a layer's gated delta rule in chunks of 64 positions: a Python loop over the
chunks (which ``torch.export`` fixes to the example's count, so a captured graph took at most one
chunk a call) around a 63-step forward substitution inside each chunk (unrolled into hundreds of
nodes a layer, a minute of capture for a tiny model); a one-token step takes a token-by-token
function instead. While :func:`~flora_graph.frontend.capture` runs,
:func:`~flora_graph.frontend.traceable.traceable_scans` swaps both module-level functions
(``torch_chunk_gated_delta_rule`` and ``torch_recurrent_gated_delta_rule``, the ones transformers
lets a kernel replace: FLA's ``chunk_gated_delta_rule`` API; Kimi Linear's ``chunk_kimi_delta_attention``
and ``recurrent_kimi_delta_attention``, the same rule with a decay per key channel) for
:func:`gated_delta_rule` and :func:`recurrent_gated_delta_rule` (their parameters, in their order): the
same preparation (grouped heads repeated, float32, the optional l2 norm of queries and keys, queries
scaled by ``1/sqrt(dk)``) around the custom op ``flora_graph::delta_rule``, which the trace
records as one node and the ATen table turns into the IR's ``GatedDeltaRule``. It starts from the
cache's recurrent state for any number of tokens: one graph prefills a prompt of any length and
decodes.
"""

from __future__ import annotations

from typing import Any

import torch

from flora_graph.frontend.aten.registry import register
from flora_graph.ir import ComputationNode, Op

__all__ = ["CHUNKED_PARAMS", "RECURRENT_PARAMS", "delta_rule", "gated_delta_rule", "recurrent_gated_delta_rule"]

CHUNKED_PARAMS = ("query", "key", "value", "g", "beta", "chunk_size", "initial_state", "output_final_state")
"""The leading parameters of transformers' ``torch_chunk_gated_delta_rule``, which :func:`gated_delta_rule` takes."""
RECURRENT_PARAMS = ("query", "key", "value", "g", "beta", "initial_state", "output_final_state")
"""Those of ``torch_recurrent_gated_delta_rule``, which :func:`recurrent_gated_delta_rule` takes."""
_END = 2**62  # a slice to the end (the IR's Slice)


@torch.library.custom_op("flora_graph::delta_rule", mutates_args=())
def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over axis 2: ``(outputs [batch, heads, seq, dv], final state [batch, heads, dk, dv])``.

    Per position: ``S = exp(g) S``, ``S += k ⊗ beta (v - Sᵀ k)``, ``o = Sᵀ q``, from ``S = h0``;
    ``q``, ``k`` are ``[batch, heads, seq, dk]``, ``v`` ``[batch, heads, seq, dv]``, ``beta``
    ``[batch, heads, seq]``, ``g`` that or ``[batch, heads, seq, dk]`` (a decay per key channel: Kimi's).
    """
    s, outs = h0, []
    for t in range(q.shape[2]):
        decay = g[:, :, t].exp()
        s = s * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        delta = (v[:, :, t] - (s * k[:, :, t, :, None]).sum(2)) * beta[:, :, t, None]
        s = s + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append((s * q[:, :, t, :, None]).sum(2))
    return (torch.stack(outs, 2) if outs else v.new_empty(v.shape)), s.clone()


@delta_rule.register_fake
def _delta_rule_fake(q, k, v, g, beta, h0):
    torch._check(q.shape == k.shape, lambda: f"delta_rule: q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    return v.new_empty(v.shape), h0.new_empty(h0.shape)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """FLA's l2 norm over the last axis, as transformers writes it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ``torch_chunk_gated_delta_rule`` (same arguments and result: ``query``/``key``
    ``[batch, seq, k_heads, dk]``, ``value`` ``[batch, seq, v_heads, dv]``, ``beta`` ``[batch, seq, v_heads]``, ``g``
    that or ``[batch, seq, v_heads, dk]``: Kimi's ``chunk_kimi_delta_attention``) over :func:`delta_rule`;
    ``chunk_size`` is not needed.

    Raises ``ValueError`` for packed sequences (``cu_seqlens``), which it does not keep apart.
    """
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError("gated_delta_rule: packed sequences (cu_seqlens) are not kept apart while capturing")
    dtype = query.dtype
    batch, _, k_heads, dk = key.shape
    v_heads, dv = value.shape[-2:]
    if k_heads != v_heads:  # each query/key head serves v_heads // k_heads consecutive value heads
        query = query.repeat_interleave(v_heads // k_heads, dim=2)
        key = key.repeat_interleave(v_heads // k_heads, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (query, key, value, beta, g))
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * dk**-0.5
    h0 = q.new_zeros(batch, v_heads, dk, dv) if initial_state is None else initial_state.float()
    out, state = delta_rule(q, k, v, g, beta, h0)
    return out.transpose(1, 2).contiguous().to(dtype), (state if output_final_state else None)


def recurrent_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                               output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`gated_delta_rule` with the parameters of ``torch_recurrent_gated_delta_rule`` (no ``chunk_size``:
    its sixth is ``initial_state``)."""
    return gated_delta_rule(query, key, value, g, beta, initial_state=initial_state,
                            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                            **kwargs)


@register(torch.ops.flora_graph.delta_rule.default)
def _convert(ctx: Any, q: ComputationNode, k: ComputationNode, v: ComputationNode, g: ComputationNode,
             beta: ComputationNode, h0: ComputationNode) -> tuple[ComputationNode, ComputationNode]:
    """``GatedDeltaRule`` (outputs and final state along axis 2) and the two slices that read them apart."""
    both = ctx.emit(Op.GATED_DELTA_RULE, [q, k, v, g, beta, h0])
    seq = q.shape[2]
    out = ctx.emit(Op.SLICE, [both], {"axes": (2,), "starts": (0,), "ends": (seq,)})
    state = ctx.emit(Op.SLICE, [both], {"axes": (2,), "starts": (seq,), "ends": (_END,)})
    return out, state
