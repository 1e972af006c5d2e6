"""fuse-rms-norm: Replaces a hand-written RMSNorm with one ``RMSNorm`` node.

Llama-style models (the built-in decoder, Hugging Face's ``LlamaRMSNorm``) write RMSNorm as
``weight * (x * rsqrt(mean(x**2, -1, keepdim=True) + eps))``; capture keeps the pieces
(``Pow``, ``ReduceMean``, ``Add``, ``Rsqrt``, ``Mul``, ``Mul``), which no backend fuses in
that form. Two rules:

- ``fuse-rms-norm``: ``Mul(x, inv)`` or ``Div(x, Sqrt(var))`` where ``inv`` is ``Rsqrt(var)``,
  ``Reciprocal(Sqrt(var))``, ``Div(1, Sqrt(var))`` or ``Pow(var, -0.5)`` (Gemma 4's),
  ``var = Add(ReduceMean(sq), eps)``,
  ``sq = Pow(x, 2)`` or ``Mul(x, x)``; ``Mul``/``Add`` operands in either order, no-op
  ``Cast`` nodes allowed between the pieces. The ``ReduceMean`` must reduce the trailing
  axes of ``x`` with ``keepdims=1``, ``eps`` must be a finite scalar weight, the exponent a
  scalar weight equal to 2, and no intermediate may have a reader outside the pattern.
  Becomes ``RMSNorm(x, axis=first reduced axis, epsilon=eps)``.
- ``fuse-rms-norm-scale``: ``Mul(RMSNorm(x), w)`` (an ``RMSNorm`` without scale, through a
  no-op ``Cast``) where ``w`` has exactly the normalised dims and the dtype of ``x`` and the
  ``RMSNorm`` has no other reader: becomes ``RMSNorm(x, w)``.

Refusals are recorded per root node (``refused``) with the reason, as for the other passes.
"""

from __future__ import annotations

import math

import numpy as np

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.shapes import canonical_dim
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["FUSE_RMS_NORM", "FUSE_RMS_NORM_SCALE", "RMS_NORM", "fuse_rms_norm"]


def _noop_cast(n: ComputationNode) -> bool:
    return bool(n.inputs) and n.attrs.get("to") == n.inputs[0].dtype


def _cast(p: Pat, name: str) -> Pat:
    """``p``, or ``p`` under a no-op ``Cast`` (bound to ``name``)."""
    return p | Pat(Op.CAST, (p,), name=name, pred=_noop_cast)


def _build() -> Pat:
    x = Pat.any("x")
    sq = Pat(Op.POW, (x, Pat.any("p")), name="sq") | Pat(Op.MUL, (x, x), name="sq")
    mean = Pat(Op.REDUCE_MEAN, (_cast(sq, "cast_sq"),), name="mean")
    var = _cast(Pat(Op.ADD, (_cast(mean, "cast_mean"), Pat.any("eps")), name="var"), "cast_var")
    sqrt = _cast(Pat(Op.SQRT, (var,), name="sqrt"), "cast_sqrt")
    inv = (Pat(Op.RSQRT, (var,), name="inv") | Pat(Op.RECIPROCAL, (sqrt,), name="inv")
           | Pat(Op.DIV, (Pat.weight("one"), sqrt), name="inv") | Pat(Op.POW, (var, Pat.any("minus_half")), name="inv"))
    return Pat(Op.MUL, (x, _cast(inv, "cast_inv")), name="norm") | Pat(Op.DIV, (x, sqrt), name="norm")


RMS_NORM: Pat = _build()
"""The decomposed RMSNorm without scale; root is the final ``Mul``/``Div`` by ``x``."""

_LEAVES = ("x", "p", "eps", "one", "minus_half")


def _same_shape(a: ComputationNode, b: ComputationNode) -> bool:
    return tuple(map(canonical_dim, a.shape)) == tuple(map(canonical_dim, b.shape))


def _other_readers(m: Match, ctx: RewriteContext, leaves: tuple[str, ...]) -> str | None:
    inside = set(m.bindings.values()) | {m.root}
    for key, n in m.bindings.items():
        if key in leaves or n is m.root:
            continue
        others = ctx.other_users(n, *inside)
        if others:
            return f"intermediate {n.name!r} ({key}) is also read by {others}"
    return None


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    x, mean, root = m["x"], m["mean"], m.root
    if x.dtype not in ("float16", "bfloat16", "float32", "float64"):
        return res.fail(f"{x.name!r} has dtype {x.dtype}, not a float")
    if not _same_shape(root, x) or root.dtype != x.dtype:
        return res.fail(f"result {root.name!r} {root.shape} {root.dtype} is not the shape/dtype of {x.name!r}")
    rank = len(x.shape)
    axes = sorted({a % rank for a in mean.attrs["axes"]}) if mean.attrs["axes"] else list(range(rank))
    if not mean.attrs["keepdims"]:
        return res.fail(f"ReduceMean {mean.name!r} has keepdims=0")
    if not axes or axes != list(range(axes[0], rank)):
        return res.fail(f"ReduceMean {mean.name!r} axes {tuple(axes)} are not the trailing axes of rank {rank}")
    p = m.get("p")
    if p is not None and (p not in ctx.static or ctx.scalar(p) != 2.0):
        return res.fail(f"exponent {p.name!r} is not the scalar 2")
    half = m.get("minus_half")
    if half is not None and (half not in ctx.static or ctx.scalar(half) != -0.5):
        return res.fail(f"exponent {half.name!r} is not the scalar -0.5")
    one = m.get("one")
    if one is not None and ctx.scalar(one) != 1.0:
        return res.fail(f"numerator {one.name!r} is not the scalar 1")
    var, eps_node = m["var"], m["eps"]
    eps = ctx.scalar(eps_node) if eps_node in ctx.static else None
    if eps is not None and math.isfinite(eps):  # the shortest decimal of the weight's own dtype: 1e-06, not 9.99999997e-07
        eps = float(str(np.asarray(ctx.value(eps_node)).reshape(())[()]))
    if eps is None or not _same_shape(var, mean):
        return res.fail(f"eps {eps_node.name!r} {eps_node.shape} is not a scalar weight")
    if not math.isfinite(eps):
        return res.fail(f"eps {eps_node.name!r} = {eps} is not finite")
    why = _other_readers(m, ctx, _LEAVES)
    if why:
        return res.fail(why)
    m.extra.update(axis=axes[0], epsilon=eps)
    return res


def _rewrite(m: Match, ctx: RewriteContext) -> ComputationNode:
    return ctx.add(Op.RMS_NORM, [m["x"]], {"axis": m.extra["axis"], "epsilon": m.extra["epsilon"]},
                   name=f"{m.root.name}.rms_norm", meta=m.root.meta)


FUSE_RMS_NORM = Rule("fuse-rms-norm", RMS_NORM, _rewrite, _check,
                     doc="Replaces x * rsqrt(mean(x**2, trailing axes) + eps) (and its Sqrt/Div/Pow forms) with RMSNorm(x).")

_UNSCALED = Pat(Op.RMS_NORM, name="rms", pred=lambda n: len(n.inputs) == 1)
SCALED: Pat = Pat(Op.MUL, (_cast(_UNSCALED, "cast_rms"), Pat.any("w")), name="scaled")
"""``Mul(RMSNorm(x), w)``, the norm without scale, through a no-op ``Cast``; root is the ``Mul``."""


def _reads(node: ComputationNode, target: ComputationNode) -> bool:
    """Whether ``node`` is ``target`` or depends on it."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.inputs)
    return False


def _check_scale(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    rms, w, root = m["rms"], m["w"], m.root
    x = rms.inputs[0]
    axis = rms.attrs["axis"] % len(x.shape)
    norm = tuple(canonical_dim(d) for d in x.shape[axis:])
    if tuple(canonical_dim(d) for d in w.shape) != norm:
        return res.fail(f"scale {w.name!r} {tuple(w.shape)} is not the normalised shape {tuple(x.shape[axis:])}")
    if w.dtype != x.dtype or not _same_shape(root, x):
        return res.fail(f"scale {w.name!r} ({w.dtype}) does not keep the shape/dtype of {x.name!r}")
    why = _other_readers(m, ctx, ("w",))
    if why:
        return res.fail(why)
    if _reads(w, rms):
        return res.fail(f"scale {w.name!r} depends on {rms.name!r}")
    return res


def _rewrite_scale(m: Match, ctx: RewriteContext) -> ComputationNode:
    rms = m["rms"]
    return ctx.add(Op.RMS_NORM, [rms.inputs[0], m["w"]], rms.attrs, name=f"{m.root.name}.rms_norm", meta=rms.meta)


FUSE_RMS_NORM_SCALE = Rule("fuse-rms-norm-scale", SCALED, _rewrite_scale, _check_scale,
                           doc="Replaces Mul(RMSNorm(x), w), w of the normalised shape, with RMSNorm(x, w).")


@register_pass("fuse-rms-norm")
def fuse_rms_norm(graph: Graph) -> PassResult:
    """Fuse each hand-written RMSNorm (and its scale) into one ``RMSNorm`` node."""
    return RuleSet([FUSE_RMS_NORM, FUSE_RMS_NORM_SCALE]).apply(graph)
