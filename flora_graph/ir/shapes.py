"""Shapes with named dynamic dims.

A dim is an ``int`` (static) or a ``str`` naming a dynamic dim (``"batch"``). A product of
dims, as produced by ``Flatten`` or ``Reshape``, is written ``"batch*seq"`` or
``"4*batch"``: the factors sorted, a static coefficient first. A sum, as produced by
``Concat`` along a named dim (a key/value cache: ``past_seq + seq`` positions), is written
``"past_seq+seq"``; in general a dim is a polynomial with integer coefficients in the dim
names, its terms sorted and the constant last (``"past_seq+seq-1"``). Two dims are equal
when their canonical forms are equal, so ``"seq*batch"`` and ``"batch*seq"`` are the same
dim, and so are ``"seq+past_seq"`` and ``"past_seq+seq"``.

A strided window over a dynamic dim (a Conv1d of stride 5 over ``samples`` audio samples) has
``floor((samples - 10) / 5) + 1`` positions: a floor division is an atom of the polynomial,
written ``((samples-10)//5)`` (its numerator canonical, its constant in ``[0, divisor)``,
every multiple of the divisor pulled out), so that ``"((samples-10)//5)+1"`` reads the same in
Python. :func:`floor_divide_dim` builds one, :func:`floor_div_parts` takes one apart; every
consumer that evaluates a dim (the interpreters, ONNX, torch) treats an atom as its numerator's
value divided by the divisor, rounded down.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from flora_graph.errors import ShapeError

Dim = int | str
Shape = tuple[Dim, ...]

__all__ = [
    "Dim",
    "Shape",
    "add_dims",
    "broadcast_shapes",
    "canonical_dim",
    "canonical_shape",
    "difference_range",
    "dim_names",
    "dim_product",
    "dim_terms",
    "divide_dims",
    "eval_dim",
    "floor_div_parts",
    "floor_divide_dim",
    "format_shape",
    "is_dim_name",
    "is_rounded_down",
    "is_static",
    "linear_rest",
    "normalize_axis",
    "one_atom_linear",
    "subtract_dims",
    "window_count",
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


Poly = dict[tuple[str, ...], int]  # sorted monomial (names, with repeats) -> integer coefficient
_TERM = re.compile(r"[+-]?[^+-]+")


def _poly(dim: Dim) -> Poly:
    """``dim`` as a polynomial: ``{(): 3}`` for 3, ``{("past_seq",): 1, ("seq",): 1}`` for ``"past_seq+seq"``."""
    if type(dim) is int:
        if dim < 0:
            raise ShapeError(f"dim {dim} is negative")
        return {(): dim} if dim else {}
    if isinstance(dim, str) and "(" in dim:
        return _Parser(dim).parse()
    if not isinstance(dim, str) or ("+" not in dim and "-" not in dim):
        coef, names = _factors(dim)
        return {tuple(sorted(names.elements())): coef} if coef else {}
    text = dim.replace(" ", "")
    terms = _TERM.findall(text)
    if not terms or "".join(terms) != text:
        raise ShapeError(f"dim {dim!r} is not a sum of dim terms")
    poly: Poly = {}
    for term in terms:
        sign = -1 if term[0] == "-" else 1
        coef, names = _factors(term.lstrip("+-"))
        key = tuple(sorted(names.elements()))
        poly[key] = poly.get(key, 0) + sign * coef
    return {k: v for k, v in poly.items() if v}


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, va in a.items():
        for kb, vb in b.items():
            key = tuple(sorted(ka + kb))
            out[key] = out.get(key, 0) + va * vb
    return {k: v for k, v in out.items() if v}


class _Parser:
    """A dim with parentheses: ``poly := term (("+" | "-") term)*``, ``term := factor ("*" factor)*``,
    ``factor := int | name | "(" poly ")" ["//" int]`` (the last a floor-division atom)."""

    _TOKEN = re.compile(r"\s*(//|[()+*-]|[0-9]+(?![A-Za-z_.])|[A-Za-z_0-9][A-Za-z0-9_.]*)")

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            m = self._TOKEN.match(text, pos)
            if not m or not m.group(1):
                if text[pos:].strip() == "":
                    break
                raise ShapeError(f"dim {text!r}: cannot read {text[pos:pos + 20]!r}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.i = 0

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, want: str | None = None) -> str:
        tok = self._peek()
        if tok is None or (want is not None and tok != want):
            raise ShapeError(f"dim {self.text!r}: expected {want or 'more'}, found {tok or 'the end'}")
        self.i += 1
        return tok

    def parse(self) -> Poly:
        poly = self._sum()
        if self._peek() is not None:
            raise ShapeError(f"dim {self.text!r}: unexpected {self._peek()!r}")
        return poly

    def _sum(self) -> Poly:
        acc: Poly = {}
        sign = 1
        if self._peek() in ("+", "-"):
            sign = -1 if self._take() == "-" else 1
        while True:
            for k, v in self._term().items():
                acc[k] = acc.get(k, 0) + sign * v
            if self._peek() not in ("+", "-"):
                return {k: v for k, v in acc.items() if v}
            sign = -1 if self._take() == "-" else 1

    def _term(self) -> Poly:
        acc = self._factor()
        while self._peek() == "*":
            self._take()
            acc = _mul(acc, self._factor())
        return acc

    def _factor(self) -> Poly:
        tok = self._take()
        if tok == "(":
            inner = self._sum()
            self._take(")")
            if self._peek() != "//":
                return inner
            self._take()
            den = self._take()
            if not (den.isascii() and den.isdigit()) or int(den) < 1:
                raise ShapeError(f"dim {self.text!r}: floor division by {den!r}, not a positive int")
            return _floor_div_poly(inner, int(den), self.text)
        if tok.isascii() and tok.isdigit():
            return {(): int(tok)} if int(tok) else {}
        if _NAME.match(tok):
            return {(tok,): 1}
        raise ShapeError(f"dim {self.text!r}: {tok!r} is not a dim name")


def _floor_div_poly(poly: Poly, den: int, what: object) -> Poly:
    """``floor(poly / den)``: terms divisible by ``den`` divided, the rest one atom key;
    ``floor((floor(x / a) + c) / b)`` is ``floor((x + a c) / (a b))`` (a second strided conv)."""
    named = [k for k in poly if k]
    if len(named) == 1 and len(named[0]) == 1 and poly[named[0]] == 1 and (inner := floor_div_parts(named[0][0])):
        num, a = inner
        return _floor_div_poly(_poly(add_dims(num, a * poly.get((), 0)) if poly.get((), 0) >= 0 else
                                     canonical_dim(f"{num}-{-a * poly[()]}")), a * den, what)
    out: Poly = {}
    rest: Poly = {}
    for key, coef in poly.items():
        if key:
            (out if coef % den == 0 else rest)[key] = coef // den if coef % den == 0 else coef
    const = poly.get((), 0)
    if rest:
        if const % den:
            rest[()] = const % den
        atom = f"(({_build_poly(rest, what)})//{den})"
        out[(atom,)] = out.get((atom,), 0) + 1
    if const // den:
        out[()] = out.get((), 0) + const // den
    return out


def floor_divide_dim(num: Dim, den: int) -> Dim:
    """``floor(num / den)`` as a dim: the terms ``den`` divides come out divided (``(5*a+3)//5`` is
    ``a``), the rest is an atom whose constant lies in ``[0, den)``: ``floor_divide_dim("samples-10", 5)``
    is ``"((samples)//5)-2"``."""
    if isinstance(den, bool) or not isinstance(den, int) or den < 1:
        raise ShapeError(f"floor division of dim {num!r} by {den!r}: the divisor must be an int >= 1")
    if den == 1:
        return canonical_dim(num)
    return _build_poly(_floor_div_poly(_poly(num), den, num), num)


def window_count(size: Dim, kernel: int, stride: int, padding: int, dilation: int = 1) -> Dim:
    """Positions of a ``kernel``-tap window (``stride``, ``padding`` on each side, ``dilation``) over
    ``size``: ``floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1``, a floor-division
    atom where ``size`` is dynamic and ``stride`` > 1. Raises :class:`ShapeError` when a static
    ``size`` is too small for the window."""
    span = dilation * (kernel - 1) + 1 - 2 * padding
    if isinstance(size, int):
        if size - span < 0:
            raise ShapeError(f"input size {size} too small for kernel {kernel} (dilation {dilation}, padding {padding})")
        return (size - span) // stride + 1
    num = add_dims(size, -span) if span <= 0 else canonical_dim(f"{canonical_dim(size)}-{span}")
    return add_dims(floor_divide_dim(num, stride), 1)


def floor_div_parts(atom: str) -> tuple[Dim, int] | None:
    """``(numerator, divisor)`` of a floor-division atom ``"((samples-10)//5)"``, else ``None``."""
    if not (isinstance(atom, str) and atom.startswith("((") and atom.endswith(")")):
        return None
    head, sep, den = atom[1:-1].rpartition("//")
    if not sep or not head.startswith("(") or not head.endswith(")") or not den.isdigit():
        return None
    return canonical_dim(head[1:-1]), int(den)


def is_rounded_down(dim: Dim, of: Dim) -> bool:
    """Whether ``dim`` is ``of`` rounded down to a multiple, ``k * (of // k)`` (``"8*((samples)//8)"`` of
    ``"samples"``): never more than ``of``, so ``x[..., :of]`` along such an axis keeps all of it (a codec's decoded
    audio cut back to its input's length: DAC's)."""
    if not isinstance(dim, str) or not isinstance(of, str):
        return False
    head, sep, atom = dim.partition("*")
    parts = floor_div_parts(atom) if sep and head.isdigit() else None
    return parts is not None and parts[1] == int(head) and canonical_dim(parts[0]) == canonical_dim(of)


def dim_names(dim: Dim) -> set[str]:
    """The dim names ``dim`` mentions: ``{"past_seq", "seq"}`` for ``"past_seq+seq"``, none for an int;
    the names inside a floor-division atom, not the atom."""
    out: set[str] = set()
    for key in _poly(dim):
        for n in key:
            parts = floor_div_parts(n)
            out |= dim_names(parts[0]) if parts else {n}
    return out


def eval_dim(dim: int | str, dims: Mapping[str, int]) -> int | None:
    """The size of ``dim`` (an int, a name, or a polynomial such as ``"a*b"`` or ``"past_seq+seq"``)
    under ``dims``; ``None`` if unbound."""
    if isinstance(dim, int):
        return dim
    if dim in dims:
        return dims[dim]
    total = 0
    for coef, names in dim_terms(dim):
        term = coef
        for n in names:
            value = dims.get(n)
            if value is None and (parts := floor_div_parts(n)) is not None:  # "((samples-10)//5)"
                num = eval_dim(parts[0], dims)
                value = None if num is None else num // parts[1]
            if value is None:
                return None
            term *= int(value)
        total += term
    return total


_PERIOD = 4096
"""The longest period :func:`difference_range` evaluates a difference over."""


def difference_range(a: Dim, b: Dim) -> tuple[int, int] | None:
    """``(least, greatest)`` of ``a - b`` over every size of the one dim name both are written in, where that
    difference repeats: each term at most one name or floor division, and the terms that grow with the size
    cancel (equal slopes), so that ``a - b`` repeats with the product ``P`` of the divisors (nested divisions
    multiply: ``((s//5)-1)//2`` repeats every 10). Checked on ``0..2P``; ``None`` for any other pair.
    SEW's frames ``n`` against their pooling and upsampling back, ``2*(n//2)``: ``(0, 1)``."""
    names = dim_names(a) | dim_names(b)
    if len(names) > 1:
        return None
    if not names:
        return (int(a) - int(b),) * 2 if isinstance(a, int) and isinstance(b, int) else None
    atoms: set[str] = set()

    def collect(dim: Dim) -> bool:
        for _, key in dim_terms(dim):
            if len(key) > 1:
                return False
            for n in key:
                parts = floor_div_parts(n)
                if parts is not None:
                    atoms.add(n)
                    if not collect(parts[0]):
                        return False
        return True

    if not (collect(a) and collect(b)):
        return None
    period = math.prod(floor_div_parts(n)[1] for n in atoms)  # type: ignore[index]
    if period > _PERIOD:
        return None
    (name,) = names
    diffs = [eval_dim(a, {name: v}) - eval_dim(b, {name: v}) for v in range(2 * period)]  # type: ignore[operator]
    if diffs[:period] != diffs[period:]:
        return None
    return min(diffs), max(diffs)



def one_atom_linear(dim: Dim) -> tuple[int, str | None, int] | None:
    """``(g, a, d)`` where ``dim`` is ``g*a + d`` of one atom ``a`` (a name or a floor division; ``None`` and
    ``g = 0`` for a number), else ``None``: ``"2*((n)//10)-3"`` -> ``(2, "((n)//10)", -3)``."""
    if isinstance(dim, int):
        return 0, None, dim
    terms = dim_terms(dim)
    named = [(c, k) for c, k in terms if k]
    if len(named) != 1 or len(named[0][1]) != 1:
        return None
    return named[0][0], named[0][1][0], sum(c for c, k in terms if not k)


def is_dim_name(dim: Dim) -> bool:
    """Whether ``dim`` is one plain name (``"seq"``), not an int, a product or a sum."""
    return isinstance(dim, str) and _NAME.match(dim.strip()) is not None and "*" not in dim


def dim_terms(dim: Dim) -> list[tuple[int, tuple[str, ...]]]:
    """The terms of ``dim`` as ``(coefficient, names)``, constant (empty names) included:
    ``"past_seq+2*seq-1"`` -> ``[(1, ("past_seq",)), (2, ("seq",)), (-1, ())]``."""
    return [(v, k) for k, v in _poly(dim).items()]


def _format(poly: Poly) -> str:
    return " + ".join(f"{v}*{'*'.join(k) or 1}" for k, v in sorted(poly.items()))


def _covered(key: tuple[str, ...], poly: Poly) -> bool:
    """Whether a positive term of ``poly`` is a proper multiple of the monomial ``key``, as ``batch*seq`` is of
    ``batch``: ``batch*seq-batch`` is ``batch*(seq-1)``, a dim where ``seq-1`` is one; ``a-b`` is not."""
    need = Counter(key)
    return any(v > 0 and k != key and all(Counter(k)[n] >= c for n, c in need.items()) for k, v in poly.items())


def _build_poly(poly: Poly, what: object = None) -> Dim:
    poly = {k: v for k, v in poly.items() if v}
    const = poly.pop((), 0)
    if not poly:
        if const < 0:
            raise ShapeError(f"dim {what if what is not None else const!r} is negative ({const})")
        return const
    if any(v < 0 and not _covered(k, poly) for k, v in poly.items()):  # "seq-1" is a dim; "a-b" may be negative
        raise ShapeError(f"dim {what if what is not None else _format(poly)!r} has a negative named term")
    text = ""
    for key in sorted(poly):
        coef = poly[key]
        term = "*".join(([str(abs(coef))] if abs(coef) != 1 else []) + list(key))
        text += ("-" if coef < 0 else "+" if text else "") + term
    if const:
        text += f"{const:+d}"
    return text


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
            hit = _build_poly(_poly(dim), dim)
            if len(_CANONICAL) < _CANONICAL_MAX:
                _CANONICAL[dim] = hit
        return hit
    return _build(*_factors(dim))


def canonical_shape(shape: Sequence[Dim]) -> Shape:
    """``shape`` with each dim in its canonical spelling (:func:`canonical_dim`), comparable with ``==``."""
    return tuple(canonical_dim(d) for d in shape)


def dim_product(dims: Sequence[Dim]) -> Dim:
    """Product of dims, symbolic where any factor is named (sums are expanded)."""
    acc: Poly = {(): 1}
    for d in dims:
        nxt: Poly = {}
        for ka, va in acc.items():
            for kb, vb in _poly(d).items():
                key = tuple(sorted(ka + kb))
                nxt[key] = nxt.get(key, 0) + va * vb
        acc = nxt
    return _build_poly(acc)


def add_dims(*dims: Dim) -> Dim:
    """Sum of dims: ``add_dims("past_seq", "seq") == "past_seq+seq"``."""
    acc: Poly = {}
    for d in dims:
        for k, v in _poly(d).items():
            acc[k] = acc.get(k, 0) + v
    return _build_poly(acc)


def subtract_dims(a: Dim, b: Dim) -> Dim | None:
    """``a - b`` as a dim, or ``None`` when it is not one: a negative constant, or a
    negative named term (``"seq" - "past_seq+seq"``)."""
    acc = dict(_poly(a))
    for k, v in _poly(b).items():
        acc[k] = acc.get(k, 0) - v
    if any(v < 0 for k, v in acc.items() if k) or (acc.get((), 0) < 0 and not any(v for k, v in acc.items() if k)):
        return None
    return _build_poly(acc)


def linear_rest(dim: Dim, name: str) -> Dim | None:
    """``dim - name`` where ``dim`` holds dim ``name`` as a term of its own (coefficient 1, in no other term) and
    the rest has no negative named term: ``linear_rest("past_seq+seq", "past_seq") == "seq"``, so a size of
    ``dim`` less one of the rest gives ``name`` (a mask over ``past_seq+seq`` positions carries ``past_seq``
    beside ``seq``); ``None`` otherwise."""
    poly = _poly(dim)
    if poly.get((name,)) != 1 or any(name in k for k in poly if k != (name,)):
        return None
    rest = {k: v for k, v in poly.items() if k != (name,)}
    if any(v < 0 for k, v in rest.items() if k):
        return None
    return _build_poly(rest)


def divide_dims(num: Dim, den: Dim) -> Dim | None:
    """``num / den`` as a dim, or ``None`` when it does not divide exactly (integer coefficients, no
    remainder): ``divide_dims("32*t*batch-32*batch", "batch*t-batch") == 32`` (a length less one, times
    the batch, as a reshape of conv-reduced frames leaves it)."""
    pn, pd = _poly(num), _poly(den)
    return _long_division(pn, pd) if pd else None  # a zero divisor divides nothing


def _long_division(pn: Poly, pd: Poly) -> Dim | None:
    """Exact division of polynomial dims by a non-zero divisor of one term or several (multivariate long division in
    graded lexicographic order of the names' exponents); ``None`` where a step leaves a remainder or a fraction."""
    names = sorted({n for key in (*pn, *pd) for n in key})

    def order(key: tuple[str, ...]) -> tuple[int, tuple[int, ...]]:
        counts = Counter(key)
        return len(key), tuple(counts[n] for n in names)

    lead = max(pd, key=order)
    need = Counter(lead)
    rest = {k: v for k, v in pn.items() if v}
    out: Poly = {}
    for _ in range(64 + len(pn) * len(pd)):  # each step takes the leading term out; bounded for safety
        if not rest:
            return _build_poly(out) if out else 0
        top = max(rest, key=order)
        have = Counter(top)
        if rest[top] % pd[lead] or any(have[n] < c for n, c in need.items()):
            return None
        q_key, q_coef = tuple(sorted((have - need).elements())), rest[top] // pd[lead]
        out[q_key] = out.get(q_key, 0) + q_coef
        for key, coef in pd.items():
            k = tuple(sorted(q_key + key))
            rest[k] = rest.get(k, 0) - q_coef * coef
            if not rest[k]:
                del rest[k]
    return None


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
