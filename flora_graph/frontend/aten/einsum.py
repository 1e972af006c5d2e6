"""ATen converters for ``einsum`` over one or two operands (and ``bilinear``, ``_trilinear``), into the ops
torch's own decomposition gives.

Converted directly rather than decomposed: a decomposition retraces the whole program
(seconds on a model of a few layers). One operand: sums over the letters the output drops, then a
``Transpose``. Two operands (SAM's ``bhwc,hkc->bhwk``, LongT5's ``...qhd,...khd->...hqk``, Mamba-2's
``bclhn,bcshn->bclsh``): each letter is a batch letter (both operands and the output), a contracted one
(both operands only), a left or a right one (one operand and the output) or a summed one (one operand
only, summed first). The left operand is transposed to ``[batch, left, contracted]``, the right one to
``[batch, contracted, right]``, each group folded into one axis (``Reshape``, where it has several
letters or none), multiplied (``MatMul``, whose batch axes broadcast), unfolded and transposed to the
output's order. Repeated letters in one operand (a diagonal) and three or more operands are refused
by name. ``bilinear`` (``nn.Bilinear``, kept whole by torch.export) and ``_trilinear`` are two such einsums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flora_graph.errors import ShapeError
from flora_graph.frontend.aten.registry import as_dtype, out_dtype, refuse, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim, broadcast_shapes, dim_product

__all__: list[str] = []

aten = torch.ops.aten

_SPARE = "0123456789"  # letters for the axes an ellipsis stands for (an equation's own are a-z, A-Z)


def parse_equation(equation: str, ranks: Sequence[int]) -> tuple[list[str], str]:
    """The letters of each operand and of the output of an einsum ``equation`` over operands of ``ranks``, an
    ellipsis spelled out (the spare letters ``0``-``9``, aligned from the right as broadcasting aligns them), the
    output implicit where there is no ``->`` (the letters seen once, sorted, after the ellipsis'). ``ValueError``
    where the equation does not fit the ranks."""
    text = equation.replace(" ", "")
    lhs, arrow, out = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"{len(terms)} operand(s) in {equation!r}, {len(ranks)} given")
    widest = 0
    for term, rank in zip(terms, ranks, strict=True):
        if "..." in term:
            widest = max(widest, rank - len(term.replace("...", "")))
    if widest > len(_SPARE):
        raise ValueError(f"an ellipsis of {widest} axes in {equation!r}")
    spare = _SPARE[:widest]
    spelled = []
    for term, rank in zip(terms, ranks, strict=True):
        if "..." in term:
            k = rank - len(term.replace("...", ""))
            term = term.replace("...", spare[widest - k:] if k else "")
        if len(term) != rank or not all(c.isalpha() or c in spare for c in term):
            raise ValueError(f"operand {term!r} of {equation!r} does not name the {rank} axes of its tensor")
        spelled.append(term)
    if arrow:
        out = out.replace("...", spare)
    else:
        seen = "".join(spelled)
        out = spare + "".join(sorted(c for c in set(seen) if seen.count(c) == 1 and c not in spare))
    if len(set(out)) != len(out) or any(c not in "".join(spelled) for c in out):
        raise ValueError(f"output {out!r} of {equation!r} repeats a letter or names one no operand has")
    return spelled, out


def _permute(ctx: Any, x: ComputationNode, have: str, want: str) -> ComputationNode:
    if have == want:
        return x
    return ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(have.index(c) for c in want)})


def _sum_out(ctx: Any, x: ComputationNode, letters: str, keep: str) -> tuple[ComputationNode, str]:
    """``x`` (axes ``letters``) summed over the letters ``keep`` lacks."""
    axes = tuple(i for i, c in enumerate(letters) if c not in keep)
    if not axes:
        return x, letters
    return (ctx.emit(Op.REDUCE_SUM, [x], {"axes": axes, "keepdims": 0}),
            "".join(c for c in letters if c in keep))


def _fold(ctx: Any, x: ComputationNode, groups: Sequence[int]) -> ComputationNode:
    """``x`` reshaped so that each run of ``groups[i]`` axes is one axis (an empty group: an axis of 1)."""
    shape: list[Dim] = []
    i = 0
    for n in groups:
        shape.append(dim_product(list(x.shape[i:i + n])) if n else 1)
        i += n
    if tuple(shape) == tuple(x.shape):
        return x
    return ctx.emit(Op.RESHAPE, [x], {"shape": tuple(shape)})


@register(aten.einsum.default)
def _einsum(ctx, equation, operands, *, path=None):
    xs = list(operands)
    if not 1 <= len(xs) <= 2:
        raise refuse(ctx, f"einsum {equation!r} of {len(xs)} operands (one or two are taken)")
    try:
        terms, out = parse_equation(equation, [len(x.shape) for x in xs])
    except ValueError as exc:
        raise refuse(ctx, f"einsum: {exc}") from None
    for term in terms:
        if len(set(term)) != len(term):
            raise refuse(ctx, f"einsum {equation!r}: a letter repeated in one operand (a diagonal)")
    dtype = out_dtype(ctx)
    xs = [as_dtype(ctx, x, dtype) for x in xs]
    if len(xs) == 1:
        x, letters = _sum_out(ctx, xs[0], terms[0], out)
        return _permute(ctx, x, letters, out)
    (a, b), (la, lb) = xs, terms
    a, la = _sum_out(ctx, a, la, lb + out)  # a letter of one operand alone is summed first
    b, lb = _sum_out(ctx, b, lb, la + out)
    batch = "".join(c for c in out if c in la and c in lb)
    left = "".join(c for c in out if c in la and c not in lb)
    right = "".join(c for c in out if c in lb and c not in la)
    contracted = "".join(c for c in la if c in lb and c not in out)
    for c in contracted:
        if a.shape[la.index(c)] != b.shape[lb.index(c)]:
            raise refuse(ctx, f"einsum {equation!r}: letter {c!r} contracts {a.shape[la.index(c)]!r} with "
                              f"{b.shape[lb.index(c)]!r} (a contracted axis of size 1 broadcast)")
    a = _permute(ctx, a, la, batch + left + contracted)
    b = _permute(ctx, b, lb, batch + contracted + right)
    sizes = {c: a.shape[(batch + left + contracted).index(c)] for c in left}
    sizes |= {c: b.shape[(batch + contracted + right).index(c)] for c in right}
    try:
        nb = len(batch)
        batch_shape = broadcast_shapes(a.shape[:nb], b.shape[:nb])
    except ShapeError as exc:
        raise refuse(ctx, f"einsum {equation!r}: batch axes {batch!r}: {exc}") from None
    a = _fold(ctx, a, [1] * nb + [len(left), len(contracted)])
    b = _fold(ctx, b, [1] * nb + [len(contracted), len(right)])
    y = ctx.emit(Op.MATMUL, [a, b])
    shape = (*batch_shape, *(sizes[c] for c in left), *(sizes[c] for c in right))
    if tuple(y.shape) != shape:
        y = ctx.emit(Op.RESHAPE, [y], {"shape": shape})
    return _permute(ctx, y, batch + left + right, out)


@register(aten._trilinear.default)
def _trilinear(ctx, i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1):
    """``nn.Bilinear``'s product: each operand unsqueezed at its ``expand`` axes, the three multiplied and summed
    over ``sumdim``, as two two-operand einsums (one letter per axis; the first pair contracts the axes the third
    operand and the output do not keep), so the product never holds the whole broadcast box."""
    rank = len(i1.shape) + len(expand1)
    letters = "abcdefghijklmnopqrstuvwxyz"[:rank]
    terms = ["".join(letters[a] for a in range(rank) if a not in set(e)) for e in (expand1, expand2, expand3)]
    out = "".join(letters[a] for a in range(rank) if a not in set(sumdim))
    if any(len(t) != len(x.shape) for t, x in zip(terms, (i1, i2, i3), strict=True)):
        raise refuse(ctx, f"_trilinear of ranks {[len(x.shape) for x in (i1, i2, i3)]} with expands "
                          f"{[list(expand1), list(expand2), list(expand3)]}")
    keep = "".join(c for c in letters if (c in terms[0] or c in terms[1]) and (c in out or c in terms[2]))
    first = _einsum(ctx, f"{terms[0]},{terms[1]}->{keep}", [i1, i2])
    return _einsum(ctx, f"{keep},{terms[2]}->{out}", [first, i3])


@register(aten.bilinear.default)
def _bilinear(ctx, x1, x2, w, b=None):
    """``nn.Bilinear``, which torch.export keeps whole: ``x1 W x2 + b`` over any leading axes as the einsums
    ``...i,oij->...oj`` and ``...oj,...j->...o`` (no retrace to decompose it)."""
    y = _einsum(ctx, "...oj,...j->...o", [_einsum(ctx, "...i,oij->...oj", [x1, w]), x2])
    return y if b is None else ctx.emit(Op.ADD, [y, b])
