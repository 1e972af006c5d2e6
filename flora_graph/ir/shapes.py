"""Shapes with named dynamic dims.

A dim is an ``int`` (static) or a ``str`` naming a dynamic dim (``"batch"``). A product of
dims, as produced by ``Flatten`` or ``Reshape``, is written ``"batch*seq"`` or
``"4*batch"``: the factors sorted, a static coefficient first. Two dims are equal when
their canonical forms are equal, so ``"seq*batch"`` and ``"batch*seq"`` are the same dim.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from flora_graph.errors import ShapeError

Dim = int | str
Shape = tuple[Dim, ...]

__all__ = [
    "Dim",
    "Shape",
    "broadcast_shapes",
    "canonical_dim",
    "dim_product",
    "divide_dims",
    "format_shape",
    "is_static",
    "normalize_axis",
]

# an identifier with dots, or a module path whose first component is a number ("0.rank": the rank
# dim of an adapter slot on the first layer of an nn.Sequential); "9batch" and "1.5" are not names
_NAME = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.]*|[0-9][A-Za-z0-9_.]*\.[A-Za-z_][A-Za-z0-9_.]*)$")


def _factors(dim: Dim) -> tuple[int, Counter[str]]:
    """Split a dim into its static coefficient and the multiset of named factors."""
    if isinstance(dim, bool):
        raise ShapeError(f"dim {dim!r} is a bool, not an int or a name")
    if isinstance(dim, int):
        if dim < 0:
            raise ShapeError(f"dim {dim} is negative")
        return dim, Counter()
    if not isinstance(dim, str) or not dim:
        raise ShapeError(f"dim {dim!r} is neither an int nor a dim name")
    coef, names = 1, Counter()
    for part in dim.split("*"):
        part = part.strip()
        if part.isascii() and part.isdigit():  # not str.isdigit alone: "²" is a digit int() rejects
            try:
                coef *= int(part)
            except ValueError:  # longer than Python's int-from-str digit limit
                raise ShapeError(f"dim {dim!r}: factor {part[:20]!r}... is too large") from None
        elif _NAME.match(part):
            names[part] += 1
        else:
            raise ShapeError(f"dim {dim!r}: factor {part!r} is not a dim name")
    return coef, names


def _build(coef: int, names: Counter[str]) -> Dim:
    if coef == 0 or not names:
        return coef
    parts = [n for n in sorted(names.elements())]
    return "*".join(([str(coef)] if coef != 1 else []) + parts)


_CANONICAL: dict[str, Dim] = {}  # dim name -> canonical spelling: verify/infer ask for the same few names again and again
_CANONICAL_MAX = 4096


def canonical_dim(dim: Dim) -> Dim:
    """Return the canonical spelling of ``dim`` (validating it)."""
    if type(dim) is int and dim >= 0:  # not bool, not an int subclass
        return dim
    if type(dim) is str:
        hit = _CANONICAL.get(dim)
        if hit is None:
            hit = _build(*_factors(dim))
            if len(_CANONICAL) < _CANONICAL_MAX:
                _CANONICAL[dim] = hit
        return hit
    return _build(*_factors(dim))


def dim_product(dims: Sequence[Dim]) -> Dim:
    """Product of dims, symbolic where any factor is named."""
    coef, names = 1, Counter()
    for d in dims:
        c, n = _factors(d)
        coef *= c
        names.update(n)
    return _build(coef, names)


def divide_dims(num: Dim, den: Dim) -> Dim | None:
    """``num / den`` as a dim, or ``None`` when it does not divide exactly."""
    cn, nn = _factors(num)
    cd, nd = _factors(den)
    if cd == 0 or cn % cd or any(nn[k] < v for k, v in nd.items()):
        return None
    return _build(cn // cd, nn - nd)


def is_static(shape: Sequence[Dim]) -> bool:
    """Whether every dim of ``shape`` is a plain int."""
    return all(isinstance(d, int) for d in shape)


def dims_equal(a: Dim, b: Dim) -> bool:
    """Equality of two dims in canonical form."""
    return canonical_dim(a) == canonical_dim(b)


def broadcast_shapes(*shapes: Sequence[Dim]) -> Shape:
    """Numpy/ONNX multidirectional broadcasting, with named dims.

    A named dim broadcasts against ``1`` and against itself; against another name or a
    static size other than 1 it is an error (the sizes cannot be proven equal).
    """
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dim: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = canonical_dim(s[j])
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif dim != d:
                raise ShapeError(
                    f"shapes {', '.join(format_shape(x) for x in shapes)} do not broadcast "
                    f"(dim {i}: {dim} vs {d})"
                )
        out.append(dim)
    return tuple(out)


def normalize_axis(axis: int, rank: int, *, what: str = "axis") -> int:
    """Map a possibly negative axis into ``[0, rank)``, or raise ``ShapeError``."""
    if not -rank <= axis < rank:
        raise ShapeError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank


def format_shape(shape: Sequence[Dim] | None) -> str:
    """``[batch, 16]`` style text for a shape."""
    if shape is None:
        return "[?]"
    return "[" + ", ".join(str(d) for d in shape) + "]"


def static_numel(shape: Sequence[Dim]) -> int | None:
    """Number of elements, or ``None`` when a dim is named."""
    if not is_static(shape):
        return None
    return math.prod(int(d) for d in shape)
