"""Helpers of the torch rules: source snippets, and named dims as sizes read off tensors.

A torch rule returns the Python source of one expression. A dim named in an attribute
(``Slice(ends=("seq",))``, ``Arange(end="seq")``) becomes a size read off a tensor: the
node's own inputs where one carries the dim, else the graph input that carries it
(``input_ids.size(1)``), products multiplied. The torch code generator sets, with
:func:`dim_sources`, which graph inputs carry which dims for the duration of one generation.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from flora_graph.errors import GraphError
from flora_graph.ir.shapes import Dim, Shape, canonical_dim, dim_terms, floor_div_parts, linear_rest

if TYPE_CHECKING:
    from flora_graph.ir.node import ComputationNode

__all__ = [
    "bound_expr", "call", "dim_expr", "dim_source", "dim_sources", "float_literal", "float_math", "ints",
    "reshaped", "size_product", "torch_dtype",
]

Lower = Callable[["ComputationNode", list[str]], str]

_SOURCES: contextvars.ContextVar[dict[Dim, str] | None] = contextvars.ContextVar("flora_dim_sources", default=None)


@contextlib.contextmanager
def dim_sources(inputs: Iterable[tuple[str, Shape]]) -> Iterator[dict[Dim, str]]:
    """Make the named dims of ``(arg name, shape)`` graph inputs resolvable by :func:`dim_expr`."""
    sources: dict[Dim, str] = {}
    for arg, shape in inputs:
        for i, d in enumerate(shape):
            if isinstance(d, str):
                sources.setdefault(canonical_dim(d), f"{arg}.size({i})")
    for d, src in list(sources.items()):  # a name only a sum carries: past_seq of past_seq+seq, less seq
        for _, names in dim_terms(d):
            rest = linear_rest(d, names[0]) if len(names) == 1 and names[0] not in sources else None
            parts = None if rest is None else [(c, [sources.get(n) for n in ns]) for c, ns in dim_terms(rest)]
            if parts is not None and all(all(ps) for _, ps in parts):
                sources[names[0]] = f"({src} - ({_terms_expr(parts)}))" if parts else src
    token = _SOURCES.set(sources)
    try:
        yield sources
    finally:
        _SOURCES.reset(token)


def _terms_expr(terms: Sequence[tuple[int, Sequence[str]]]) -> str:
    """Source of a sum of terms, each a coefficient and its factors' sources: ``a * b - 2 * c + 3``."""
    out = ""
    for coef, factors in terms:
        parts = ([str(abs(coef))] if abs(coef) != 1 or not factors else []) + list(factors)
        out += (" - " if coef < 0 else " + " if out else "") + " * ".join(parts)
    return out


def dim_expr(dim: Dim, node: ComputationNode, local: Sequence[tuple[str, Shape]] = ()) -> str:
    """Source of the size ``dim``: a literal, a size of a ``local`` tensor or of a graph input, or their product."""
    if isinstance(dim, int):
        return str(dim)
    dim = canonical_dim(dim)
    for expr, shape in local:
        for j, d in enumerate(shape):
            if isinstance(d, str) and canonical_dim(d) == dim:
                return f"{expr}.size({j})"
    sources = _SOURCES.get() or {}
    if dim in sources:
        return sources[dim]
    parts = floor_div_parts(dim)
    if parts is not None:  # ((samples-10)//5)
        return f"(({dim_expr(parts[0], node, local)}) // {parts[1]})"
    terms = dim_terms(dim)
    if len(terms) > 1 or terms[0][0] != 1 or len(terms[0][1]) > 1:  # a product or a sum of named dims
        out = _terms_expr([(coef, [dim_expr(n, node, local) for n in names]) for coef, names in terms])
        return f"({out})" if len(terms) > 1 else out
    raise GraphError(f"node {node.name!r} ({node.op.value}): dim {dim!r} is not carried by any graph input")


def torch_dtype(name: str) -> str:
    """Source of a torch dtype: ``torch.float32``."""
    return f"torch.{name}"


def ints(values: Iterable[int]) -> str:
    """Source of a list of ints."""
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def call(fn: str) -> Lower:
    """The rule ``fn(a, b, ...)`` over the node's inputs."""
    return lambda node, args: f"{fn}({', '.join(args)})"


def float_math(fn: str) -> Lower:
    """``fn(x)``; torch turns integers into floats here, so an integer node is cast back to its dtype."""

    def lower(node: ComputationNode, args: list[str]) -> str:
        expr = f"{fn}({args[0]})"
        return expr if node.dtype.startswith(("float", "bfloat")) else f"{expr}.to({torch_dtype(node.dtype)})"

    return lower


def float_literal(value: float) -> str:
    """Source of a float attribute: ``float("inf")`` (negated) and ``float("nan")`` for the non-finite ones, which
    TorchScript reads as Python does."""
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else '-float("inf")'
    return repr(float(value))


def size_product(x: str, shape: Shape, axes: Iterable[int], divisor: int = 1) -> str:
    """Source for ``prod(x.shape[i] for i in axes) // divisor``, static dims folded in."""
    static, dynamic = 1, []
    for i in axes:
        if isinstance(shape[i], int):
            static *= shape[i]
        else:
            dynamic.append(f"{x}.size({i})")
    if static % divisor == 0:
        terms = [*dynamic, str(static // divisor)] if static // divisor != 1 or not dynamic else dynamic
        return " * ".join(terms)
    return f"({' * '.join([*dynamic, str(static)])}) // {divisor}"


def reshaped(x: str, shape: Shape, dims: list[str]) -> str:
    """``x.reshape(dims)``; through 1-D when ``x`` has a named dim, which spares torch.export the
    stride guards (such as ``3*b % 2*b != 0``) that a direct view of symbolic dims can need."""
    flat = f"{x}.reshape([-1])" if any(isinstance(d, str) for d in shape) else x
    return f"{flat}.reshape([{', '.join(dims)}])"


def dim_source(x: str, shape: Shape, i: int) -> str:
    """Source of dim ``i`` of ``x``: the literal when static, else ``x.size(i)``."""
    return str(shape[i]) if isinstance(shape[i], int) else f"{x}.size({i})"


def bound_expr(value: Dim, node: ComputationNode, local: Sequence[tuple[str, Shape]] = ()) -> str:
    """Source of a ``"dim"`` attribute value (a ``Slice`` bound, an ``Arange`` bound): the int
    literal, or :func:`dim_expr` of a dim name."""
    return dim_expr(value, node, local) if isinstance(value, str) else str(int(value))
