"""``GatedDeltaRule``: linear attention with the gated delta rule (Qwen3.5, Qwen3-Next; Kimi's delta attention
with a decay per key channel), in the attention family.

Per head, a state ``S`` (``[dk, dv]``) runs over the positions::

    S = exp(g[t]) * S            (g[t] one value per head, or one per key channel: S's rows)
    S = S + k[t] ⊗ beta[t] * (v[t] - Sᵀ k[t])
    o[t] = Sᵀ q[t]

from ``S = h0``. The node's one output holds the outputs and then the final state along axis 2:
``[batch, heads, seq + dk, dv]`` (``o`` in rows ``:seq``, ``S`` in rows ``seq:``), which two slices
read apart; the IR's nodes have one output each. The numpy rule loops in float64; the ONNX rule
is a ``Scan`` over the positions with ``S`` as its state, or ONNX Runtime's ``com.microsoft``
``LinearAttention`` where the lowering takes contrib ops (``to_onnx(..., contrib=True)``, as GenAI
packages are written; checked against numpy, per head and per key channel); the torch rule loops in
TorchScript and runs torch's ``scan`` elsewhere (``torch.export``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.shapes import canonical_dim, dims_equal
from flora_graph.ops._onnx import ONNX_DTYPES
from flora_graph.ops.registry import define

__all__: list[str] = []

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _infer(shapes, dtypes, attrs):
    q, k, v, g, beta, h0 = shapes
    if len(set(dtypes)) != 1 or dtypes[0] not in _FLOATS:
        raise ShapeError(f"GatedDeltaRule takes floats of one dtype, got {', '.join(dtypes)}")
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        raise ShapeError(f"GatedDeltaRule: q {tuple(q)}, k {tuple(k)}, v {tuple(v)} must be [batch, heads, seq, dim]")
    lead = q[:3]
    for name, s in (("k", k[:3]), ("v", v[:3]), ("g", g[:3]), ("beta", beta)):
        if len(s) != 3 or not all(dims_equal(a, b) for a, b in zip(s, lead, strict=True)):
            raise ShapeError(f"GatedDeltaRule: {name} {tuple(s)} does not share q's [batch, heads, seq] {tuple(lead)}")
    if len(g) not in (3, 4) or (len(g) == 4 and not dims_equal(g[3], k[3])):
        raise ShapeError(f"GatedDeltaRule: g {tuple(g)} is not [batch, heads, seq] nor [batch, heads, seq, dk]")
    if not dims_equal(q[3], k[3]):
        raise ShapeError(f"GatedDeltaRule: q and k widths differ ({q[3]!r}, {k[3]!r})")
    want = (q[0], q[1], k[3], v[3])
    if len(h0) != 4 or not all(dims_equal(a, b) for a, b in zip(h0, want, strict=True)):
        raise ShapeError(f"GatedDeltaRule: h0 {tuple(h0)} is not [batch, heads, dk, dv] {want}")
    if not isinstance(k[3], int):
        raise ShapeError(f"GatedDeltaRule: the key width must be static, got {k[3]!r}")
    rows = q[2] + k[3] if isinstance(q[2], int) else canonical_dim(f"{q[2]}+{k[3]}")
    return (q[0], q[1], rows, v[3]), dtypes[0]


def _numpy(q, k, v, g, beta, h0):
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    s = np.array(h0, np.float64)
    out = np.empty(v.shape, np.float64)
    for t in range(q.shape[2]):
        decay = np.exp(g[:, :, t])
        s = s * (decay[..., None] if g.ndim == 4 else decay[..., None, None])
        delta = (v[:, :, t] - np.einsum("bhkv,bhk->bhv", s, k[:, :, t])) * beta[:, :, t, None]
        s = s + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = np.einsum("bhkv,bhk->bhv", s, q[:, :, t])
    return np.concatenate([out, s], axis=2)


def _onnx(ctx: Any, node: ComputationNode, out: str) -> None:
    """A ``Scan`` over axis 2 of ``q, k, v, exp(g), beta`` with the state ``S`` (ONNX Runtime's ``LinearAttention``
    where the context takes contrib ops); its outputs and final state concatenated."""
    from onnx import TensorProto, helper

    q, k, v, g, beta, h0 = ctx.args(node)
    heads, dv = node.inputs[0].shape[1], node.inputs[2].shape[3]
    if getattr(ctx, "contrib", False) and isinstance(heads, int) and isinstance(dv, int):
        _contrib(ctx, node, out, heads, dv)
        return
    elem = ONNX_DTYPES[ctx.dtype]
    n = helper.make_node
    per_channel = len(node.inputs[3].shape) == 4  # decay_t [b, h, dk]: S's rows; else [b, h]
    body = helper.make_graph(
        [n("Unsqueeze", ["decay_t", "axis3" if per_channel else "axes23"], ["decay_4d"]),
         n("Mul", ["s", "decay_4d"], ["s_decayed"]),
         n("Unsqueeze", ["k_t", "axis2"], ["k_row"]),  # [b, h, 1, dk]
         n("MatMul", ["k_row", "s_decayed"], ["kv_row"]),  # [b, h, 1, dv]
         n("Unsqueeze", ["v_t", "axis2"], ["v_row"]),
         n("Sub", ["v_row", "kv_row"], ["err"]),
         n("Unsqueeze", ["beta_t", "axes23"], ["beta_4d"]),
         n("Mul", ["err", "beta_4d"], ["delta"]),  # [b, h, 1, dv]
         n("Unsqueeze", ["k_t", "axis3"], ["k_col"]),  # [b, h, dk, 1]
         n("MatMul", ["k_col", "delta"], ["update"]),
         n("Add", ["s_decayed", "update"], ["s_next"]),
         n("Unsqueeze", ["q_t", "axis2"], ["q_row"]),
         n("MatMul", ["q_row", "s_next"], ["o_row"]),
         n("Squeeze", ["o_row", "axis2"], ["o_t"])],
        f"{node.name}_step",
        [helper.make_tensor_value_info(x, elem, None) for x in ("s", "q_t", "k_t", "v_t", "decay_t", "beta_t")],
        [helper.make_tensor_value_info(x, elem, None) for x in ("s_next", "o_t")],
        [helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals) for name, vals in
         (("axis2", [2]), ("axis3", [3]), ("axes23", [2, 3]))],
    )
    decay = ctx.emit("Exp", [g])
    last, outs = ctx.fresh(f"{out}/state"), ctx.fresh(f"{out}/outputs")
    ctx.emit("Scan", [h0, q, k, v, decay, beta], [last, outs], body=body, num_scan_inputs=5,
             scan_input_axes=[2] * 5, scan_output_axes=[2])
    ctx.emit("Concat", [outs, last], [out], axis=2)


def _contrib(ctx: Any, node: ComputationNode, out: str, heads: int, dv: int) -> None:
    """ONNX Runtime's ``com.microsoft.LinearAttention`` (``update_rule="gated_delta"``, ``scale`` 1: ``q`` comes
    scaled), which takes ``q, k, v`` as ``[batch, seq, heads*dim]`` and ``g, beta`` as ``[batch, seq, heads]``."""
    q, k, v, g, beta, h0 = ctx.args(node)
    packed = ctx.constant(np.array([0, 0, -1], np.int64), f"{node.name}/packed")
    split = ctx.constant(np.array([0, 0, heads, dv], np.int64), f"{node.name}/heads")

    def flat(x: str) -> str:
        return ctx.emit("Reshape", [ctx.emit("Transpose", [x], perm=[0, 2, 1, 3]), packed])

    g3 = flat(g) if len(node.inputs[3].shape) == 4 else ctx.emit("Transpose", [g], perm=[0, 2, 1])  # [b, t, h(*dk)]
    beta3 = ctx.emit("Transpose", [beta], perm=[0, 2, 1])
    state = ctx.fresh(f"{out}/state")
    o = ctx.emit("LinearAttention", [flat(q), flat(k), flat(v), h0, g3, beta3], [ctx.fresh(f"{out}/outputs"), state],
                 domain="com.microsoft", q_num_heads=heads, kv_num_heads=heads, update_rule="gated_delta", scale=1.0)
    o = ctx.emit("Transpose", [ctx.emit("Reshape", [o, split])], perm=[0, 2, 1, 3])
    ctx.emit("Concat", [o, state], [out], axis=2)


_HELPER = "_flora_gated_delta_rule"
_SOURCE = f'''
def {_HELPER}(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              s: torch.Tensor) -> torch.Tensor:
    """The gated delta rule over axis 2, its outputs and final state along axis 2: a loop in TorchScript,
    torch's scan elsewhere (torch.export)."""
    if torch.jit.is_scripting():
        outs = []
        for t in range(q.size(2)):
            decay = torch.exp(g[:, :, t])
            s = s * (decay[:, :, :, None] if decay.dim() == 3 else decay[:, :, None, None])
            delta = (v[:, :, t] - (s * k[:, :, t, :, None]).sum(2)) * beta[:, :, t, None]
            s = s + k[:, :, t, :, None] * delta[:, :, None, :]
            outs.append((s * q[:, :, t, :, None]).sum(2))
        return torch.cat([torch.stack(outs, 2), s], 2)
    return {_HELPER}_traced(q, k, v, g, beta, s)


def {_HELPER}_step(s, x):  # no global names: torch's scan traces it by its module, which cannot be imported
    q, k, v, decay, beta = x
    s = s * (decay[:, :, :, None] if decay.dim() == 3 else decay[:, :, None, None])
    delta = (v - (s * k[:, :, :, None]).sum(2)) * beta[:, :, None]
    s = s + k[:, :, :, None] * delta[:, :, None, :]
    return s, (s * q[:, :, :, None]).sum(2)


@torch.jit.unused
def {_HELPER}_traced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     s: torch.Tensor) -> torch.Tensor:
    from torch._higher_order_ops.scan import scan

    s, outs = scan({_HELPER}_step, s, tuple(x.movedim(2, 0) for x in (q, k, v, g.exp(), beta)))
    return torch.cat([outs.movedim(0, 2), s], 2)
'''


def _torch(node: ComputationNode, args: list[str]) -> str:
    return f"{_HELPER}({', '.join(args)})"


define(
    "GATED_DELTA_RULE", "GatedDeltaRule", (6, 6), {},
    infer=_infer,
    doc="Linear attention by the gated delta rule over axis 2 (inputs q, k [batch, heads, seq, dk], v [.., dv], "
        "g [batch, heads, seq] or [.., dk] (a decay per key channel), beta [batch, heads, seq], h0 [batch, heads, dk, "
        "dv]): per position S = exp(g) S; "
        "S += k ⊗ beta (v - Sᵀk); o = Sᵀq. Output [batch, heads, seq + dk, dv]: the outputs, then the final state.",
    numpy=_numpy, onnx=_onnx, torch=_torch, torch_source=_SOURCE, family="attention",
)
