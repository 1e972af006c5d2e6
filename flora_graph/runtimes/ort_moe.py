"""A mixture of experts as ONNX Runtime's ``com.microsoft.MoE``, for a lowered model with contrib ops.

After ``group-experts`` (:mod:`flora_graph.passes.group_experts`) a transformers mixture-of-experts
block is, per token row of ``x`` (``[tokens, hidden]``) and router logits ``L`` (``[tokens, experts]``)::

    ids = Reshape(ArgTopK(P, k))                       # P: L, or Softmax(L)
    xr  = Reshape(Expand(Unsqueeze(x)))                # each row k times
    h   = ExpertLinear(xr, W1, ids) [+ Gather(b1, ids)]
    a   = act(h)                                       # a gated activation of h's two halves
    y   = ExpertLinear(a, W2, ids) [+ Gather(b2, ids)]
    out = ReduceSum(Reshape(y * Unsqueeze(w), [tokens, k, hidden]), axis 1)

with routing weights ``w`` one of: ``Softmax(GatherElements(L, top))`` (gpt-oss), ``GatherElements(S, top)``
over ``S = Softmax(L)`` (Qwen2/3-MoE without ``norm_topk_prob``), or that divided by its row sum
(Mixtral, Qwen3-MoE with it). ``ExpertLinear`` lowers to a ``Loop`` over the experts in use;
:func:`fuse_mixture_of_experts` writes the whole block as one ``MoE`` node instead (the ONNX Runtime
GenAI model builder's form), which :func:`~flora_graph.serving.int4.quantize_weights` turns into a
``QMoE`` with 4-bit experts: a decode step of a 4-bit Qwen3-MoE package is 5x faster than with its
experts float (``python benchmarks/moe.py``). In float the loops stay (``to_onnx(..., moe=False)``, the
default): on a gpt-oss-sized block (hidden 512, 32 experts, top 4, one thread) ONNX Runtime's float
``MoE`` kernel is 1.3x faster than the loops on a 512-token prompt but 1.25x slower on one token whose
experts change from step to step, as in decoding.

``MoE`` runs SwiGLU as ``G * sigmoid(alpha * G) * (U + beta)`` with ``G = min(g, limit)`` and
``U = clip(u, -limit, limit)`` on interleaved gate/up columns. The activation is not read off its
nodes: its candidates (alpha, beta and limit from the scalars it holds, gate/up interleaved or in
halves) are evaluated against the activation's own nodes on the numpy rules, over values past any
limit, and a block is fused only where one matches; others keep the ``Loop``. The expert weights are
written as ``MoE`` takes them (``[experts, out, in]``, gate/up rows interleaved).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnx import helper

from flora_graph.ir.ops import Op
from flora_graph.ir.shapes import canonical_dim, dim_names
from flora_graph.ops.evaluate import eval_dim, eval_node
from flora_graph.passes.rewrite import eval_static, static_nodes

if TYPE_CHECKING:
    from flora_graph.ir.node import ComputationNode
    from flora_graph.runtimes.onnx_lowering import LoweringContext

__all__ = ["fuse_mixture_of_experts"]

_SEED = 0


@dataclass(frozen=True)
class _Block:
    out: ComputationNode  # the ReduceSum whose value the MoE node writes
    x: ComputationNode  # [tokens, hidden]
    logits: ComputationNode  # [tokens, experts]
    normalize: bool  # softmax over the top k (else: the softmax over every expert, read at the top k)
    k: int
    w1: ComputationNode
    b1: ComputationNode | None
    t1: int  # ExpertLinear's ``transposed``
    w2: ComputationNode
    b2: ComputationNode | None
    t2: int
    act: list[ComputationNode]  # the activation's nodes, in graph order, from h to a
    h: ComputationNode
    a: ComputationNode


def _one(node: ComputationNode, op: Op, **attrs) -> bool:
    return node.op is op and all(node.attrs.get(k) == v for k, v in attrs.items())


def _expert(node: ComputationNode, ids: ComputationNode | None = None):
    """``(ExpertLinear, bias Const or None)`` when ``node`` is ``ExpertLinear(x, Const W, ids)`` plus an optional
    ``Gather(Const b, ids)``, the weights 3-D constants; else ``None``."""
    bias = None
    if node.op is Op.ADD:
        for e, g in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            if e.op is Op.EXPERT_LINEAR and g.op is Op.GATHER and g.attrs.get("axis", 0) == 0 \
                    and g.inputs[0].op is Op.CONST and g.inputs[1] is e.inputs[2] and len(g.inputs[0].shape) == 2:
                node, bias = e, g.inputs[0]
                break
        else:
            return None
    if node.op is not Op.EXPERT_LINEAR or node.inputs[1].op is not Op.CONST or len(node.inputs[1].shape) != 3:
        return None
    if ids is not None and node.inputs[2] is not ids:
        return None
    return node, bias


def _weights(w: ComputationNode, top: ComputationNode, logits_of) -> tuple[ComputationNode, bool] | None:
    """``(router logits, normalize)`` for the routing weights ``w`` (``[tokens, k]``) of the top ``top``."""
    if w.op is Op.SOFTMAX and w.attrs.get("axis") in (1, -1):  # softmax over the top k of the logits
        g = w.inputs[0]
        if g.op is Op.GATHER_ELEMENTS and g.attrs.get("axis") in (1, -1) and g.inputs[1] is top \
                and g.inputs[0] is top.inputs[0]:
            return g.inputs[0], True
        return None
    normalize = False
    if w.op is Op.DIV:  # the top k's probabilities over their sum
        g, s = w.inputs
        if not (_one(s, Op.REDUCE_SUM, keepdims=1) and tuple(s.attrs.get("axes") or ()) in ((1,), (-1,))
                and s.inputs[0] is g):
            return None
        w, normalize = g, True
    if w.op is Op.GATHER_ELEMENTS and w.attrs.get("axis") in (1, -1) and w.inputs[1] is top \
            and w.inputs[0] is top.inputs[0]:
        logits = logits_of(w.inputs[0])
        return (logits, normalize) if logits is not None else None
    return None


def _match(node: ComputationNode, static: set[ComputationNode], position: dict[ComputationNode, int]) -> _Block | None:
    """The block whose output is ``node`` (a ``ReduceSum``), or ``None``; ``position``: each node's place in the
    graph's (topological) order."""
    if not (_one(node, Op.REDUCE_SUM, keepdims=0) and tuple(node.attrs.get("axes") or ()) == (1,)):
        return None
    r = node.inputs[0]
    if r.op is not Op.RESHAPE or len(r.shape) != 3 or not isinstance(canonical_dim(r.shape[1]), int):
        return None
    k = int(canonical_dim(r.shape[1]))
    mul = r.inputs[0]
    if mul.op is not Op.MUL:
        return None
    for y, u in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if _one(u, Op.UNSQUEEZE) and tuple(u.attrs.get("axes") or ()) in ((1,), (-1,)) and u.inputs[0].op is Op.RESHAPE:
            second = _expert(y)
            if second is not None:
                break
    else:
        return None
    e2, b2 = second
    ids = e2.inputs[2]
    top = ids.inputs[0] if ids.op is Op.RESHAPE else None
    if top is None or not _one(top, Op.ARG_TOP_K, k=k, largest=1) or top.attrs.get("axis") not in (1, -1) \
            or len(top.shape) != 2:
        return None

    def logits_of(p: ComputationNode) -> ComputationNode | None:  # the logits behind probabilities p
        return p.inputs[0] if p.op is Op.SOFTMAX and p.attrs.get("axis") in (1, -1) else None

    routing = _weights(u.inputs[0].inputs[0], top, logits_of)
    if routing is None:
        return None
    logits, normalize = routing
    if top.inputs[0] is not logits and logits_of(top.inputs[0]) is not logits:
        return None
    # the activation: what a reads, back to h, reads nothing but h and constants
    a, act, todo, h = e2.inputs[0], [], [e2.inputs[0]], None
    seen: set[ComputationNode] = set()
    while todo:
        n = todo.pop()
        if n in seen or n in static:
            continue
        seen.add(n)
        if _expert(n, ids) is not None:  # the first product (and its bias): where the activation starts
            if h is not None and h is not n:
                return None
            h = n
            continue
        if n.op in (Op.INPUT, Op.EXPERT_LINEAR) or not n.inputs:
            return None
        act.append(n)
        todo.extend(n.inputs)
    if h is None or not act:
        return None
    e1, b1 = _expert(h, ids)
    xr = e1.inputs[0]  # each row k times: Reshape(Expand(Unsqueeze(x, 1)))
    ex = xr.inputs[0] if xr.op is Op.RESHAPE else None
    un = ex.inputs[0] if ex is not None and ex.op is Op.EXPAND else None
    if un is None or not (_one(un, Op.UNSQUEEZE) and tuple(un.attrs.get("axes") or ()) == (1,)):
        return None
    x = un.inputs[0]
    experts = int(e1.inputs[1].shape[0])
    if len(x.shape) != 2 or canonical_dim(logits.shape[-1]) != experts or int(e2.inputs[1].shape[0]) != experts \
            or x.dtype != "float32" or node.dtype != "float32":
        return None
    act.sort(key=position.__getitem__)  # found from a backwards: in the graph's order, each after its inputs
    return _Block(node, x, logits, normalize, k, e1.inputs[1], b1, int(e1.attrs.get("transposed", 0)),
                  e2.inputs[1], b2, int(e2.attrs.get("transposed", 0)), act, h, a)


def _swiglu(h: np.ndarray, interleaved: bool, alpha: float, beta: float, limit: float) -> np.ndarray:
    half = h.shape[-1] // 2
    g, u = (h[:, 0::2], h[:, 1::2]) if interleaved else (h[:, :half], h[:, half:])
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return g / (1 + np.exp(-alpha * g)) * (u + beta)


def _activation(ctx: LoweringContext, block: _Block) -> tuple[bool, float, float, float] | None:
    """``(interleaved, alpha, beta, limit)`` of the SwiGLU the activation's nodes compute, or ``None``."""
    names = {name for n in (block.h, *block.act) for d in n.shape for name in dim_names(d)}
    dims = dict.fromkeys(names, 1)  # every named dim 1: rows = the repeat count alone
    rows, width = (eval_dim(d, dims) for d in block.h.shape)
    if rows is None or width is None or width % 2 or block.a.shape[-1] != width // 2:
        return None
    memo: dict[ComputationNode, np.ndarray] = {}
    scalars = set()
    for n in block.act:
        for i in n.inputs:
            if i is not block.h and i not in block.act:
                arr = eval_static(ctx.graph, i, memo)
                if arr.size == 1:
                    scalars.add(float(arr.reshape(-1)[0]))
    rng = np.random.default_rng(_SEED)
    h = np.concatenate([rng.uniform(-12, 12, (rows, width)), rng.normal(0, 1, (rows, width))]).astype(np.float32)
    want = []
    for part in np.split(h, 2):  # two draws of the declared row count
        env = {block.h: part}
        try:
            for n in block.act:
                env[n] = eval_node(n, [env[i] if i in env else memo[i] for i in n.inputs], dims)
        except Exception:  # an op the numpy rules cannot run here: not fused
            return None
        want.append(env[block.a])
    want = np.concatenate(want).astype(np.float64)
    finite = [s for s in scalars if math.isfinite(s)]
    for interleaved, alpha, beta, limit in itertools.product(
            (True, False), [1.0, *finite], [0.0, 1.0, *finite], [math.inf, *(abs(s) for s in finite if s)]):
        got = _swiglu(h.astype(np.float64), interleaved, alpha, beta, limit)
        if np.allclose(got, want, rtol=1e-5, atol=1e-6):
            return interleaved, alpha, beta, limit
    return None


def _fc1(w: np.ndarray, transposed: int, interleaved: bool) -> np.ndarray:
    """``W1`` as ``MoE`` takes it: ``[experts, out, in]``, gate/up rows interleaved."""
    w = w.transpose(0, 2, 1) if transposed else w
    if not interleaved:
        half = w.shape[1] // 2
        w = np.stack([w[:, :half], w[:, half:]], axis=2).reshape(w.shape)
    return np.ascontiguousarray(w)


def _bias1(b: np.ndarray, interleaved: bool) -> np.ndarray:
    if interleaved:
        return np.ascontiguousarray(b)
    half = b.shape[1] // 2
    return np.ascontiguousarray(np.stack([b[:, :half], b[:, half:]], axis=2).reshape(b.shape))


def fuse_mixture_of_experts(ctx: LoweringContext) -> int:
    """Rewrite ``ctx.nodes`` in place (see the module docstring); return the number of blocks fused.

    The ``MoE`` node takes the place of the node that wrote the block's output; what only the old
    block read is left for the caller's clean-up of unread nodes.
    """
    static = static_nodes(ctx.graph)
    position = {n: i for i, n in enumerate(ctx.graph.nodes)}
    blocks = [b for n in ctx.graph.live_nodes() if n in ctx.names and (b := _match(n, static, position)) is not None]
    replace = {}
    for b in blocks:
        act = _activation(ctx, b)
        if act is None:
            continue
        interleaved, alpha, beta, limit = act
        params = ctx.graph.params
        w1 = params[b.w1.attrs["param"]]
        w2 = params[b.w2.attrs["param"]]
        label = str(b.w1.attrs["param"])
        inputs = [ctx.value(b.x), ctx.value(b.logits),
                  ctx.constant(_fc1(w1, b.t1, interleaved), f"{label}.moe"),
                  ctx.constant(_bias1(params[b.b1.attrs["param"]], interleaved), f"{label}.moe_bias") if b.b1 else "",
                  ctx.constant(np.ascontiguousarray(w2 if not b.t2 else w2.transpose(0, 2, 1)),
                               f"{b.w2.attrs['param']}.moe"),
                  ctx.value(b.b2) if b.b2 else ""]
        while inputs[-1] == "":
            inputs.pop()
        attrs = {"k": b.k, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": alpha,
                 "activation_beta": beta, "normalize_routing_weights": int(b.normalize)}
        if math.isfinite(limit):
            attrs["swiglu_limit"] = limit
        out = ctx.names[b.out]
        replace[out] = helper.make_node("MoE", inputs, [out], name=f"{b.out.name}/moe", domain="com.microsoft", **attrs)
    if replace:
        ctx.nodes[:] = [replace.get(n.output[0], n) if n.output else n for n in ctx.nodes]
    return len(replace)
