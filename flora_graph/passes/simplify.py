"""simplify: Removes operations that return one of their inputs unchanged.

Captured models carry arithmetic that does nothing on the values it meets, written so for
generality (Hugging Face's mask and rotary code, for example). Each rule replaces a node by
the input it returns unchanged, only where that input already has the node's shape and dtype:

- ``simplify-neutral``: ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1``, ``x & True``, ``x | False``,
  the constant operand static, of a static shape, and every one of its values the neutral one;
- ``simplify-same-shape``: ``Reshape``, ``Expand`` or ``Cast`` to the shape and dtype ``x``
  already has, and ``Squeeze`` of the axes an ``Unsqueeze`` just inserted;
- ``simplify-concat-empty``: ``Concat`` of one input and empty ones (a static 0 along the axis: Phi-3's
  rotary concatenates the rotated head with the rest past its rotary width, nothing when the rotary is
  full) is that input;
- ``simplify-unsqueeze-chain``: ``Unsqueeze(Unsqueeze(x))`` (the inner one read nowhere else)
  is one ``Unsqueeze`` (mask code inserts unit axes one at a time: one node per step instead of three);
- ``simplify-arange-index``: ``x[arange(D0)[..], arange(D1)[..], ...]``, advanced indexing whose
  indices are ``arange`` over the whole of each indexed axis, each along its own axis in
  order: ``x`` with unit axes inserted (``Unsqueeze``), not a gather.
- ``simplify-arange-shift``: ``arange(s, e, k) + c`` where ``c`` is a one-element
  ``arange(c0, c0 + 1)`` (through ``Reshape``/``Squeeze``/``Unsqueeze``) is ``arange(s + c0, e + c0, k)``:
  Hugging Face's ``cache_position = arange(seq) + past_seq``, read off the inputs as one ``Range``
  instead of two ranges, a reshape and an add.

Nodes tagged as part of a LoRA adapter (``meta["role"]``) are left alone: the adapter passes
recognise their sites by them.
"""

from __future__ import annotations

import numpy as np

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.shapes import add_dims, canonical_dim, canonical_shape
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext
from flora_graph.passes.rules import Match, MatchResult, Pat, Rule, RuleSet

__all__ = ["simplify"]

_NEUTRAL: dict[Op, tuple[object, bool]] = {  # op -> (neutral value, whether it may stand on the left)
    Op.ADD: (0, True), Op.SUB: (0, False), Op.MUL: (1, True), Op.DIV: (1, False),
    Op.AND: (True, True), Op.OR: (False, True),
}



def _same(a: ComputationNode, b: ComputationNode) -> bool:
    return a.dtype == b.dtype and canonical_shape(a.shape) == canonical_shape(b.shape)


def _untagged(n: ComputationNode) -> bool:
    return "role" not in n.meta


def _start(m: Match, ctx: RewriteContext) -> MatchResult:
    """An accepting result, or a refusal for a graph output (it keeps its own node)."""
    res = MatchResult()
    return res.fail("is a graph output") if id(m.root) in ctx.outputs else res


# --------------------------------------------------------------------------- x op neutral
def _check_neutral(m: Match, ctx: RewriteContext) -> MatchResult:
    res = _start(m, ctx)
    if not res:
        return res
    node = m.root
    neutral, either = _NEUTRAL[node.op]
    for pos, (keep, const) in enumerate(((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0]))):
        if pos == 1 and not either:
            break
        if (const in ctx.static and all(isinstance(d, int) for d in const.shape)  # a value without dims to bind
                and _same(keep, node) and keep is not const):
            value = ctx.value(const)
            if value.size and np.all(value == neutral):
                m.extra["keep"] = keep
                return res
    return res.fail("no operand is a neutral constant of the result's shape and dtype")


NEUTRAL = Rule("simplify-neutral", Pat(tuple(_NEUTRAL), pred=_untagged, name="node", extra=True),
               lambda m, ctx: m.extra["keep"], _check_neutral,
               doc="x + 0, x - 0, x * 1, x / 1, x & True, x | False -> x (same shape and dtype).")


# --------------------------------------------------------------------------- same-shape movement
def _check_same_shape(m: Match, ctx: RewriteContext) -> MatchResult:
    res = _start(m, ctx)
    node = m.root
    if res and not _same(node.inputs[0], node):
        return res.fail("changes the shape or dtype")
    return res


def _check_squeeze_unsqueeze(m: Match, ctx: RewriteContext) -> MatchResult:
    res = _start(m, ctx)
    if not res:
        return res
    sq, unsq = m.root, m["unsqueeze"]
    rank = len(unsq.shape)
    if sorted(a % rank for a in sq.attrs["axes"]) != sorted(a % rank for a in unsq.attrs["axes"]):
        return res.fail("squeezes other axes than the Unsqueeze inserted")
    return res


SQUEEZE_UNSQUEEZE = Rule("simplify-squeeze-unsqueeze",
                         Pat(Op.SQUEEZE, (Pat(Op.UNSQUEEZE, (Pat.any("x"),), name="unsqueeze"),), pred=_untagged),
                         lambda m, ctx: m["x"], _check_squeeze_unsqueeze,
                         doc="Squeeze of exactly the axes an Unsqueeze inserted -> the Unsqueeze's input.")


def _check_concat_empty(m: Match, ctx: RewriteContext) -> MatchResult:
    res = _start(m, ctx)
    if not res:
        return res
    node = m.root
    axis = node.attrs["axis"] % len(node.shape)
    full = [i for i in node.inputs if canonical_dim(i.shape[axis]) != 0]
    if len(full) != 1 or not _same(full[0], node):
        return res.fail("more than one input holds values along the axis")
    m.extra["keep"] = full[0]
    return res


CONCAT_EMPTY = Rule("simplify-concat-empty", Pat(Op.CONCAT, pred=_untagged, name="node", extra=True),
                    lambda m, ctx: m.extra["keep"], _check_concat_empty,
                    doc="Concat of one input and empty ones (0 along the axis) -> that input.")


SAME_SHAPE = Rule("simplify-same-shape", Pat((Op.RESHAPE, Op.EXPAND, Op.CAST), pred=_untagged, name="node"),
                  lambda m, ctx: m.root.inputs[0], _check_same_shape,
                  doc="Reshape, Expand or Cast to the input's own shape and dtype -> the input.")


# --------------------------------------------------------------------------- Unsqueeze(Unsqueeze(x))
def _chained_axes(inner: ComputationNode, outer: ComputationNode) -> tuple[int, ...]:
    """The axes one ``Unsqueeze`` of ``inner``'s input inserts to give ``outer``'s result."""
    marks = ["x"] * len(inner.inputs[0].shape)
    for unsq in (inner, outer):
        rank = len(marks) + len(unsq.attrs["axes"])
        for a in sorted(a % rank for a in unsq.attrs["axes"]):
            marks.insert(a, "u")
    return tuple(i for i, mark in enumerate(marks) if mark == "u")


def _check_unsqueeze_chain(m: Match, ctx: RewriteContext) -> MatchResult:
    res = _start(m, ctx)
    if res and ctx.other_users(m["inner"], m.root):
        return res.fail("the inner Unsqueeze is read elsewhere too")
    return res


UNSQUEEZE_CHAIN = Rule("simplify-unsqueeze-chain",
                       Pat(Op.UNSQUEEZE, (Pat(Op.UNSQUEEZE, (Pat.any("x"),), name="inner", pred=_untagged),),
                           pred=_untagged),
                       lambda m, ctx: ctx.add(Op.UNSQUEEZE, [m["x"]], {"axes": _chained_axes(m["inner"], m.root)},
                                              name=f"{m.root.name}.merged", meta=m.root.meta),
                       _check_unsqueeze_chain,
                       doc="Unsqueeze(Unsqueeze(x, a), b) -> one Unsqueeze inserting both sets of axes.")


# --------------------------------------------------------------------------- x[arange, arange]
def _arange_axis(idx: ComputationNode, size) -> int | str:
    """The axis along which ``idx`` is ``arange(size)`` (every other axis 1), or why it is not."""
    node = idx
    while node.op in (Op.UNSQUEEZE, Op.RESHAPE) and node.inputs:
        node = node.inputs[0]
    a = node.attrs
    if node.op is not Op.ARANGE or a.get("start") != 0 or a.get("step") != 1:
        return f"index {idx.name!r} is not an arange from 0 by 1"
    if canonical_dim(a["end"]) != canonical_dim(size) or size == 1:
        return f"index {idx.name!r} does not cover the whole axis of size {size!r}"
    axes = [i for i, d in enumerate(idx.shape) if d != 1]
    if len(axes) != 1 or canonical_dim(idx.shape[axes[0]]) != canonical_dim(size):
        return f"index {idx.name!r} {idx.shape} is not the arange along one axis"
    return axes[0]


def _check_arange_index(m: Match, ctx: RewriteContext) -> MatchResult:
    res = _start(m, ctx)
    if not res:
        return res
    node = m.root
    x, indices = node.inputs[0], node.inputs[1:]
    axis = node.attrs["axis"] % len(x.shape)
    rank = max(len(i.shape) for i in indices)
    where = []
    for k, idx in enumerate(indices):
        pos = _arange_axis(idx, x.shape[axis + k])
        if isinstance(pos, str):
            return res.fail(pos)
        where.append(rank - len(idx.shape) + pos)  # indices broadcast from the right
    if where != sorted(set(where)):
        return res.fail("the aranges do not lie along distinct axes in order")
    m.extra["axes"] = tuple(axis + q for q in range(rank) if q not in where)
    return res


def _rewrite_arange_index(m: Match, ctx: RewriteContext) -> ComputationNode:
    node, axes = m.root, m.extra["axes"]
    x = node.inputs[0]
    if not axes:
        return x
    return ctx.add(Op.UNSQUEEZE, [x], {"axes": axes}, name=f"{node.name}.unsqueeze", meta=node.meta)


ARANGE_INDEX = Rule("simplify-arange-index", Pat(Op.INDEX, pred=_untagged, name="node", extra=True),
                    _rewrite_arange_index, _check_arange_index,
                    doc="x indexed by aranges over its whole axes -> x with unit axes inserted.")

# --------------------------------------------------------------------------- arange + c
def _one_element_start(c: ComputationNode):
    """``c0`` when ``c`` is ``arange(c0, c0 + 1)`` (step 1), possibly reshaped; else ``None``."""
    while c.op in (Op.RESHAPE, Op.SQUEEZE, Op.UNSQUEEZE) and c.inputs and _untagged(c):
        c = c.inputs[0]
    a = c.attrs
    if c.op is not Op.ARANGE or not _untagged(c) or a.get("step") != 1:
        return None
    start, end = a.get("start"), a.get("end")
    return start if canonical_dim(add_dims(start, 1)) == canonical_dim(end) else None


def _check_arange_shift(m: Match, ctx: RewriteContext) -> MatchResult:
    res = _start(m, ctx)
    if not res:
        return res
    ar, c, node = m["ar"], m["c"], m.root
    if ar.dtype != c.dtype or ar.dtype != node.dtype or ar.dtype not in ("int32", "int64"):
        return res.fail("the aranges differ in dtype or are not integers")
    if canonical_shape(node.shape) != canonical_shape(ar.shape):
        return res.fail("the add broadcasts the arange to another shape")
    shift = _one_element_start(c)
    if shift is None:
        return res.fail(f"{c.name!r} is not a one-element arange")
    m.extra["shift"] = shift
    return res


def _rewrite_arange_shift(m: Match, ctx: RewriteContext) -> ComputationNode:
    a, shift = m["ar"].attrs, m.extra["shift"]
    attrs = {**a, "start": canonical_dim(add_dims(a["start"], shift)), "end": canonical_dim(add_dims(a["end"], shift))}
    return ctx.add(Op.ARANGE, [], attrs, name=f"{m.root.name}.arange", meta=m.root.meta)


ARANGE_SHIFT = Rule("simplify-arange-shift",
                    Pat(Op.ADD, (Pat(Op.ARANGE, name="ar", pred=_untagged), Pat.any("c")), pred=_untagged),
                    _rewrite_arange_shift, _check_arange_shift,
                    doc="arange(s, e, k) + one-element arange(c0, c0+1) -> arange(s + c0, e + c0, k).")

RULES = RuleSet([NEUTRAL, SAME_SHAPE, SQUEEZE_UNSQUEEZE, UNSQUEEZE_CHAIN, ARANGE_INDEX, ARANGE_SHIFT, CONCAT_EMPTY])


@register_pass("simplify")
def simplify(graph: Graph) -> PassResult:
    """Replace each node that returns one of its inputs unchanged by that input (see the module doc)."""
    return RULES.apply(graph)
