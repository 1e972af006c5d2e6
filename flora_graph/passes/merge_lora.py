"""merge-lora: Replaces ``Add(base(x, W, b), s·up(down(x, A), B))`` with ``base(x, W + s·B@A, b)``.

The merged weight is accumulated in float32 (float64 for a float64 ``W``) and cast to
``W``'s dtype once, into a new param ``f"{module}.merged_weight"``; ``W`` is never edited.
A non-finite merged weight raises ``GraphError`` naming the node. For ``Conv2d`` the down
projection must use the base's stride, padding and dilation and the up projection must be
a 1x1, stride-1, unpadded convolution; otherwise the merge is refused with the reason. An embedding's
adapter (:data:`~flora_graph.passes.lora_pattern.EMBEDDING_LORA`) becomes one ``Gather`` of the table
``W + s·(B@A).T``.
An adapter slot (``LoRASlot``/``LoRAMixedSlot``, :mod:`~flora_graph.passes.adapter_slots`) is
never merged: it is not this pattern, and its weights are graph inputs, not weights.
"""

from __future__ import annotations

import numpy as np

from flora_graph.errors import GraphError
from flora_graph.ir import Graph, Op
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.lora_pattern import EMBEDDING_LORA, LORA, LoRAMatch
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Rule, RuleSet

__all__ = ["MERGE_LORA", "merge_lora", "merged_weight"]


def _conv_reason(lm: LoRAMatch) -> str | None:
    base, down, up = lm.base, lm.down, lm.up
    assert base is not None and lm.W is not None
    if base.attrs["groups"] != 1 or down.attrs["groups"] != 1 or up.attrs["groups"] != 1:
        return "grouped convolutions are not merged (groups must be 1)"
    for attr in ("stride", "padding", "dilation"):
        if down.attrs[attr] != base.attrs[attr]:
            return f"lora_down {down.name!r} {attr} {down.attrs[attr]} differs from the base's {base.attrs[attr]}"
    if tuple(lm.A.shape[2:]) != tuple(lm.W.shape[2:]):
        return f"lora_down kernel {tuple(lm.A.shape[2:])} differs from the base kernel {tuple(lm.W.shape[2:])}"
    if tuple(lm.B.shape[2:]) != (1, 1) or up.attrs["stride"] != (1, 1) or up.attrs["padding"] != (0, 0):
        return f"lora_up {up.name!r} is not a 1x1, stride-1, unpadded convolution"
    return None


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    lm = LoRAMatch.from_match(m)
    assert lm.add is not None and lm.base is not None
    if tuple(lm.base.shape) != tuple(lm.add.shape):
        return res.fail(f"Add {lm.add.name!r} broadcasts base {lm.base.name!r}")
    if lm.op is Op.CONV2D and (why := _conv_reason(lm)) is not None:
        return res.fail(why)
    if lm.op is Op.GATHER and lm.base.op is not Op.GATHER:
        return res.fail(f"embedding {lm.module!r} scales its rows ({lm.base.name!r}) and not the adapter's: left as captured")
    inner = [n for n in lm.nodes if n is not lm.add]
    shared = {n.name: ctx.other_users(n, *lm.nodes) for n in inner}
    shared = {k: v for k, v in shared.items() if v}
    if shared:
        return res.fail(f"intermediate values are read outside the adapter: {shared}")
    return res


def merged_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, s: float, where: str) -> np.ndarray:
    """``W + s·B@A`` in ``W``'s shape and dtype, accumulated in float32 (float64 for float64 ``W``).

    Raises ``GraphError`` naming ``where`` when the result is not finite.
    """
    acc = np.float64 if w.dtype == np.float64 else np.float32
    r = a.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        # einsum's own loop rather than BLAS: the rank is small, and multi-threaded OpenBLAS measured
        # 20-60x slower on this product (17-25 ms for 512x8 @ 8x512) in a busy process after torch.export
        new = np.einsum("or,ri->oi", b.astype(acc, copy=False).reshape(-1, r), a.astype(acc, copy=False).reshape(r, -1))
        new = new.reshape(w.shape)
        new *= acc(s)
        new += w  # in place in the fresh product: one full-size array, W read once
        out = new if new.dtype == w.dtype else new.astype(w.dtype)
    if not np.isfinite(new).all():
        raise GraphError(f"merge-lora: merged weight of node {where} is not finite")
    if out is not new and not _all_finite(out, acc):
        raise GraphError(f"merge-lora: merged weight of node {where} overflows {w.dtype}")
    return out


def _all_finite(arr: np.ndarray, acc: type) -> bool:
    try:
        return bool(np.isfinite(arr).all())
    except TypeError:  # a dtype without its own isfinite (bfloat16 on an old ml_dtypes)
        return bool(np.isfinite(arr.astype(acc)).all())


def _rewrite(m: Match, ctx: RewriteContext):
    lm = LoRAMatch.from_match(m)
    assert lm.add is not None and lm.base is not None and lm.W is not None
    where = f"{lm.add.name!r} (module {lm.module!r})"
    w, a, b = (np.asarray(ctx.value(n)) for n in (lm.W, lm.A, lm.B))
    gather = lm.op is Op.GATHER
    if gather:  # the table [vocab, dim] + s * (A.T [vocab, r] @ B.T): W.T + s·B@A, transposed back
        w = np.ascontiguousarray(merged_weight(np.ascontiguousarray(w.T), a.T, b, lm.scale_value(ctx), where).T)
    else:
        w = merged_weight(w, a, b, lm.scale_value(ctx), where)
    const = ctx.new_const(f"{lm.module}.merged_weight", w)
    ins = [const, lm.x] if gather else [lm.x, const] + ([lm.bias] if lm.bias is not None else [])
    meta = dict(lm.base.meta)
    if meta.get("role"):
        meta["role"] = "merged"
    return ctx.add(lm.op, ins, lm.base.attrs, name=f"{lm.module}.merged", meta=meta)


MERGE_LORA = Rule("merge-lora", LORA | EMBEDDING_LORA, _rewrite, _check,
                  doc="Replaces Add(base(x, W, b), s·B(A(x))) with base(x, W + s·B@A, b).")


@register_pass("merge-lora")
def merge_lora(graph: Graph) -> PassResult:
    """Bake every recognised LoRA branch into its base layer's weight."""
    return RuleSet([MERGE_LORA]).apply(graph)
