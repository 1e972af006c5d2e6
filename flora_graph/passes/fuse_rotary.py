"""fuse-rotary: Replaces a hand-written rotary position embedding with one ``RotaryEmbedding`` node.

Llama-family models apply rotary embeddings as ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])`` and ``cos = cat(f, f).cos()`` (each angle
twice). Capture keeps seven nodes per query or key (``Mul``, two ``Slice``, ``Neg``, ``Concat``,
``Mul``, ``Add``); ONNX has one op for it from opset 23. Rule ``fuse-rotary``:

- the root ``Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, d/2:)), Slice(x, :d/2)), sin))`` (operands
  of ``Add``/``Mul`` in either order), slices and ``Concat`` along the last axis of ``x``, whose
  size ``d`` is static and even;
- ``cos`` and ``sin`` have equal halves along that axis, proven from how they are built: a
  ``Concat(f, f)`` of one node with itself along the last axis, under any chain of unary
  elementwise ops, ``Cast``, ``Unsqueeze`` (not at the last axis) and products or sums with a
  one-element operand (Hugging Face's ``attention_scaling``).

It becomes ``RotaryEmbedding(x, cos[..., :d/2], sin[..., :d/2])``, the halves built as ``cos`` and
``sin`` are, from ``f`` instead of ``Concat(f, f)`` (no slice; shared by every layer).

Rule ``fuse-rotary-halves`` takes the form gpt-oss writes, on the two halves of ``x`` with ``cos``/``sin``
of half its last dim already: ``Concat(Sub(Mul(x1, cos), Mul(x2, sin)), Add(Mul(x2, cos), Mul(x1, sin)))``
with ``x1``, ``x2`` the two outputs of one ``Split`` of ``x``'s last axis in halves; it becomes
``RotaryEmbedding(x, cos, sin)``. Refusals are recorded with the reason.
"""

from __future__ import annotations

import math

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ops.movement import SLICE_END
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["FUSE_HALVES_ROTARY", "FUSE_ROTARY", "HALVES_ROTARY", "ROTARY", "fuse_rotary"]

_x = Pat.any("x")
_rot = Pat(Op.CONCAT, (Pat(Op.NEG, (Pat(Op.SLICE, (_x,), name="hi"),), name="neg"), Pat(Op.SLICE, (_x,), name="lo")),
           name="rot")
ROTARY: Pat = Pat(Op.ADD, (Pat(Op.MUL, (_x, Pat.any("cos")), name="xc"), Pat(Op.MUL, (_rot, Pat.any("sin")), name="rs")),
                  name="out")
"""The decomposed rotary embedding; root is the final ``Add``."""

_UNARY = frozenset({Op.COS, Op.SIN, Op.NEG, Op.CAST, Op.EXP, Op.SQRT, Op.RECIPROCAL, Op.TANH})
_SCALAR_BINARY = frozenset({Op.MUL, Op.DIV, Op.ADD, Op.SUB})


def _last_axis(node: ComputationNode, axis: int) -> bool:
    return axis % len(node.shape) == len(node.shape) - 1


def _one_element(node: ComputationNode) -> bool:
    return all(isinstance(d, int) for d in node.shape) and math.prod(int(d) for d in node.shape) == 1


def _equal_halves(node: ComputationNode, depth: int = 0) -> bool:
    """Whether ``node``'s last axis is provably two equal halves (see the module docstring)."""
    if depth > 16 or not node.shape:
        return False
    op = node.op
    if op is Op.CONCAT:
        return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and _last_axis(node, node.attrs["axis"])
    if op in _UNARY:
        return _equal_halves(node.inputs[0], depth + 1)
    if op is Op.UNSQUEEZE:
        rank = len(node.shape)
        return all(a % rank != rank - 1 for a in node.attrs["axes"]) and _equal_halves(node.inputs[0], depth + 1)
    if op in _SCALAR_BINARY and len(node.inputs) == 2:
        a, b = node.inputs
        if _one_element(b) and len(a.shape) == len(node.shape):
            return _equal_halves(a, depth + 1)
        if _one_element(a) and len(b.shape) == len(node.shape):
            return _equal_halves(b, depth + 1)
    return False


def _slice_is(node: ComputationNode, rank: int, start: int, end: int) -> bool:
    a = node.attrs
    return (len(a["axes"]) == 1 and a["axes"][0] % rank == rank - 1 and a["starts"] == (start,)
            and (a["ends"][0] == end or (end == -1 and a["ends"][0] >= SLICE_END))
            and tuple(a["steps"] or (1,)) == (1,))


def _check(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    x, rot, cos, sin = m["x"], m["rot"], m["cos"], m["sin"]
    rank = len(x.shape)
    d = x.shape[-1] if rank else None
    if not isinstance(d, int) or d % 2 or d == 0:
        return res.fail(f"{x.name!r} {x.shape} has no static, even last dim")
    h = d // 2
    if not (_slice_is(m["hi"], rank, h, -1) or _slice_is(m["hi"], rank, h, d)) or not _slice_is(m["lo"], rank, 0, h):
        return res.fail(f"{m['hi'].name!r} / {m['lo'].name!r} are not the halves of {x.name!r}'s last axis")
    if not _last_axis(rot, rot.attrs["axis"]):
        return res.fail(f"{rot.name!r} does not concatenate along the last axis")
    for what, c in (("cos", cos), ("sin", sin)):
        if not c.shape or c.shape[-1] != d or len(c.shape) > rank:
            return res.fail(f"{what} {c.name!r} {c.shape} does not span {x.name!r}'s last axis")
        if not _equal_halves(c):
            return res.fail(f"{what} {c.name!r} is not provably two equal halves (cat(f, f))")
    if m.root.dtype != x.dtype or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return res.fail(f"dtypes differ: x {x.dtype}, cos {cos.dtype}, sin {sin.dtype}")
    return res


def _half(ctx: RewriteContext, c: ComputationNode, memo: dict[ComputationNode, ComputationNode]) -> ComputationNode:
    """The first half of ``c``'s last axis, built the way ``c`` is (its proof by :func:`_equal_halves`)
    from ``f`` of the ``Concat(f, f)`` it starts at: no slice, and the chain computes half as much."""
    if c in memo:
        return memo[c]
    if c.op is Op.CONCAT:
        out = c.inputs[0]
    elif c.op in _UNARY or c.op is Op.UNSQUEEZE:
        out = ctx.add(c.op, [_half(ctx, c.inputs[0], memo)], c.attrs, name=f"{c.name}.half", meta=c.meta)
    else:  # a product or sum with a one-element operand
        a, b = c.inputs
        ins = [_half(ctx, a, memo), b] if _one_element(b) and len(a.shape) == len(c.shape) else [a, _half(ctx, b, memo)]
        out = ctx.add(c.op, ins, c.attrs, name=f"{c.name}.half", meta=c.meta)
    memo[c] = out
    return out


def _rewrite(m: Match, ctx: RewriteContext) -> ComputationNode:
    root, memo = m.root, {}
    cos, sin = _half(ctx, m["cos"], memo), _half(ctx, m["sin"], memo)
    return ctx.add(Op.ROTARY_EMBEDDING, [m["x"], cos, sin], name=f"{root.name}.rotary", meta=root.meta)


FUSE_ROTARY = Rule("fuse-rotary", ROTARY, _rewrite, _check,
                   doc="Replaces x * cos + rotate_half(x) * sin (cos, sin = cat(f, f)) with RotaryEmbedding.")


_x1, _x2 = Pat(Op.SPLIT, (_x,), name="x1"), Pat(Op.SPLIT, (_x,), name="x2")
HALVES_ROTARY: Pat = Pat(Op.CONCAT, (
    Pat(Op.SUB, (Pat(Op.MUL, (_x1, Pat.any("cos")), name="x1c"), Pat(Op.MUL, (_x2, Pat.any("sin")), name="x2s")),
        name="first"),
    Pat(Op.ADD, (Pat(Op.MUL, (Pat.any("x2"), Pat.any("cos")), name="x2c"), Pat(Op.MUL, (Pat.any("x1"), Pat.any("sin")),
                                                                                  name="x1s")), name="second"),
), name="out")
"""The rotary embedding on the halves (gpt-oss): ``x1, x2 = chunk(x, 2, -1)``; ``cat(x1 cos - x2 sin, x2 cos + x1 sin)``
with ``cos``/``sin`` of half the last dim; root is the ``Concat``."""


def _check_halves(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    x, x1, x2, cos, sin = m["x"], m["x1"], m["x2"], m["cos"], m["sin"]
    rank = len(x.shape)
    d = x.shape[-1] if rank else None
    if not isinstance(d, int) or d % 2 or d == 0:
        return res.fail(f"{x.name!r} {x.shape} has no static, even last dim")
    h = d // 2
    for part, index in ((x1, 0), (x2, 1)):
        a = part.attrs
        if a["axis"] % rank != rank - 1 or tuple(a["sizes"]) != (h, h) or a["index"] != index:
            return res.fail(f"{part.name!r} is not half {index} of {x.name!r}'s last axis")
    if not _last_axis(m.root, m.root.attrs["axis"]):
        return res.fail(f"{m.root.name!r} does not concatenate along the last axis")
    for what, c in (("cos", cos), ("sin", sin)):
        if not c.shape or c.shape[-1] != h or len(c.shape) > rank:
            return res.fail(f"{what} {c.name!r} {c.shape} does not span half of {x.name!r}'s last axis")
    if m.root.dtype != x.dtype or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return res.fail(f"dtypes differ: x {x.dtype}, cos {cos.dtype}, sin {sin.dtype}")
    chain = (("x1c", "first"), ("x2s", "first"), ("x2c", "second"), ("x1s", "second"), ("first", "out"), ("second", "out"))
    for a, b in chain:
        if others := ctx.other_users(m[a], m[b]):
            return res.fail(f"{m[a].name!r} is also read by {others}")
    return res


def _rewrite_halves(m: Match, ctx: RewriteContext) -> ComputationNode:
    return ctx.add(Op.ROTARY_EMBEDDING, [m["x"], m["cos"], m["sin"]], name=f"{m.root.name}.rotary", meta=m.root.meta)


FUSE_HALVES_ROTARY = Rule("fuse-rotary-halves", HALVES_ROTARY, _rewrite_halves, _check_halves,
                          doc="Replaces cat(x1 cos - x2 sin, x2 cos + x1 sin) on x's halves with RotaryEmbedding.")


@register_pass("fuse-rotary")
def fuse_rotary(graph: Graph) -> PassResult:
    """Fuse each hand-written rotary embedding into one ``RotaryEmbedding`` node."""
    return RuleSet([FUSE_ROTARY, FUSE_HALVES_ROTARY]).apply(graph)
