"""Torch lowerings of the transformer op family, merged into :data:`~flora_graph.runtimes.torch_lowering.TORCH_LOWERING`.

Each entry is ``lower(node, args) -> str``, the Python expression for ``node``. A named
dim in an attribute (``Slice(ends=("seq",))``, ``Arange(end="seq")``) becomes a size
read off a tensor: the node's own inputs where one carries the dim, else the graph input
that carries it (``input_ids.size(1)``), products multiplied. :func:`dim_sources` sets, for
the duration of one ``generate_forward``, which graph inputs carry which dims. The
expressions use torch ops only, so the module scripts and exports with one
``torch.export.Dim`` per name.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

from flora_graph.errors import GraphError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op
from flora_graph.ir.ops_transformer import SLICE_END
from flora_graph.ir.shapes import Dim, Shape, canonical_dim

__all__ = ["TRANSFORMER_LOWERING", "dim_expr", "dim_sources"]

Lower = Callable[[ComputationNode, list[str]], str]

_SOURCES: contextvars.ContextVar[dict[Dim, str] | None] = contextvars.ContextVar("flora_dim_sources", default=None)


@contextlib.contextmanager
def dim_sources(inputs: Iterable[tuple[str, Shape]]) -> Iterator[dict[Dim, str]]:
    """Make the named dims of ``(arg name, shape)`` graph inputs resolvable by :func:`dim_expr`."""
    sources: dict[Dim, str] = {}
    for arg, shape in inputs:
        for i, d in enumerate(shape):
            if isinstance(d, str):
                sources.setdefault(canonical_dim(d), f"{arg}.size({i})")
    token = _SOURCES.set(sources)
    try:
        yield sources
    finally:
        _SOURCES.reset(token)


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
    parts = dim.split("*") if isinstance(dim, str) else []
    if len(parts) > 1:
        return " * ".join(p if p.isdigit() else dim_expr(p, node, local) for p in parts)
    raise GraphError(f"node {node.name!r} ({node.op.value}): dim {dim!r} is not carried by any graph input")


def _dtype(name: str) -> str:
    return f"torch.{name}"


def _ints(values: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def _call(fn: str) -> Lower:
    return lambda node, args: f"{fn}({', '.join(args)})"


def _float_math(fn: str) -> Lower:
    """``fn(x)``; torch turns integers into floats here, so an integer node is cast back to its dtype."""

    def lower(node: ComputationNode, args: list[str]) -> str:
        expr = f"{fn}({args[0]})"
        return expr if node.dtype.startswith(("float", "bfloat")) else f"{expr}.to({_dtype(node.dtype)})"

    return lower


# --------------------------------------------------------------------------- movement
def _gather(node: ComputationNode, args: list[str]) -> str:
    x, idx = args
    data, ind = node.inputs[0].shape, node.inputs[1].shape
    axis = node.attrs["axis"] % len(data)
    size = str(data[axis]) if isinstance(data[axis], int) else f"{x}.size({axis})"
    if node.inputs[1].dtype != "int64":
        idx = f"{idx}.to(torch.int64)"
    wrapped = f"torch.where({idx} < 0, {idx} + {size}, {idx})"  # ONNX: a negative index counts from the end
    if axis == 0 and len(data) == 2:
        return f"F.embedding({wrapped}, {x})"
    if len(ind) == 1:
        return f"torch.index_select({x}, {axis}, {wrapped})"
    picked = f"torch.index_select({x}, {axis}, {wrapped}.reshape([-1]))"
    if not ind:
        return f"{picked}.squeeze({axis})"
    local = [(x, data), (args[1], ind)]
    return f"{picked}.reshape([{', '.join(dim_expr(d, node, local) for d in node.shape)}])"


def _gather_elements(node: ComputationNode, args: list[str]) -> str:
    x, idx = args
    shape = node.inputs[0].shape
    axis = node.attrs["axis"] % len(shape)
    if node.inputs[1].dtype != "int64":
        idx = f"{idx}.to(torch.int64)"
    size = str(shape[axis]) if isinstance(shape[axis], int) else f"{x}.size({axis})"
    return f"torch.gather({x}, {axis}, torch.where({idx} < 0, {idx} + {size}, {idx}))"


def _index(node: ComputationNode, args: list[str]) -> str:
    axis = node.attrs["axis"] % len(node.inputs[0].shape)
    return f"{args[0]}[{', '.join([':'] * axis + args[1:])}]"


def _bound(value: Dim, node: ComputationNode, local: Sequence[tuple[str, Shape]]) -> str:
    return dim_expr(value, node, local) if isinstance(value, str) else str(int(value))


def _slice(node: ComputationNode, args: list[str]) -> str:
    """Python slicing; along a named dim with a nonzero start, ``torch.slice_copy`` (a view there makes
    torch.export guard on the view's contiguity, such as ``6*seq != 12``)."""
    x, shape, a = args[0], node.inputs[0].shape, node.attrs
    local = [(x, shape)]
    where = [":"] * len(shape)
    copies = []
    for axis, s, e, st in zip(a["axes"], a["starts"], a["ends"], a["steps"] or (1,) * len(a["axes"]), strict=True):
        axis %= len(shape)
        start = "" if s == 0 else _bound(s, node, local)
        end = "" if isinstance(e, int) and e >= SLICE_END else _bound(e, node, local)
        if isinstance(shape[axis], str) and s != 0:
            copies.append(f"{axis}, {start}, {end or 'None'}, {st}")
        else:
            where[axis] = f"{start}:{end}" + (f":{st}" if st != 1 else "")
    while where and where[-1] == ":":
        where.pop()
    out = f"{x}[{', '.join(where)}]" if where else x
    for c in copies:
        out = f"torch.slice_copy({out}, {c})"
    return out


def _unsqueeze(node: ComputationNode, args: list[str]) -> str:
    rank = len(node.shape)
    return args[0] + "".join(f".unsqueeze({a})" for a in sorted(a % rank for a in node.attrs["axes"]))


def _squeeze(node: ComputationNode, args: list[str]) -> str:
    rank = len(node.inputs[0].shape)
    return args[0] + "".join(f".squeeze({a})" for a in sorted((a % rank for a in node.attrs["axes"]), reverse=True))


def _expand(node: ComputationNode, args: list[str]) -> str:
    x, shape = args[0], node.inputs[0].shape
    lead = len(node.shape) - len(shape)
    dims = [
        "-1" if i >= lead and canonical_dim(shape[i - lead]) == d else dim_expr(d, node, [(x, shape)])
        for i, d in enumerate(node.shape)
    ]
    return f"{x}.expand([{', '.join(dims)}])"


def _arange(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    start, end, step = (_bound(a[k], node, ()) for k in ("start", "end", "step"))
    return f"torch.arange({start}, {end}, {step}, dtype={_dtype(a['dtype'])})"


# --------------------------------------------------------------------------- reductions, normalisation, attention
def _reduce(fn: str) -> Lower:
    def lower(node: ComputationNode, args: list[str]) -> str:
        rank = len(node.inputs[0].shape)
        axes = [a % rank for a in node.attrs["axes"]] or list(range(rank))
        keep = bool(node.attrs["keepdims"])
        dtype = f", dtype={_dtype(node.dtype)}" if fn == "torch.sum" else ""  # torch sums integers as int64
        return f"{fn}({args[0]}, {_ints(axes)}, {keep}{dtype})"

    return lower


def _cumsum(node: ComputationNode, args: list[str]) -> str:
    return f"torch.cumsum({args[0]}, {int(node.attrs['axis'])}, dtype={_dtype(node.dtype)})"


def _float(value: float, node: ComputationNode) -> str:
    if not math.isfinite(value):
        raise GraphError(f"node {node.name!r} ({node.op.value}): non-finite attribute {value}")
    return repr(float(value))


def _rms_norm(node: ComputationNode, args: list[str]) -> str:
    x, shape = args[0], node.inputs[0].shape
    axis = node.attrs["axis"] % len(shape)
    eps = _float(node.attrs["epsilon"], node)
    scale = args[1] if len(args) > 1 else "None"
    if all(isinstance(d, int) for d in shape[axis:]):
        return f"torch.rms_norm({x}, {_ints(shape[axis:])}, {scale}, {eps})"
    y = f"{x} * torch.rsqrt(torch.mean({x} * {x}, {_ints(range(axis, len(shape)))}, True) + {eps})"
    return y if len(args) == 1 else f"{y} * {args[1]}"


def _sdpa(node: ComputationNode, args: list[str]) -> str:
    mask = args[3] if len(args) == 4 else "None"
    scale = _float(node.attrs["scale"], node) if node.attrs["scale"] else "None"
    causal = bool(node.attrs["is_causal"])
    return (f"F.scaled_dot_product_attention({args[0]}, {args[1]}, {args[2]}, attn_mask={mask}, dropout_p=0.0, "
            f"is_causal={causal}, scale={scale})")


TRANSFORMER_LOWERING: dict[Op, Lower] = {
    Op.GATHER: _gather,
    Op.GATHER_ELEMENTS: _gather_elements,
    Op.INDEX: _index,
    Op.SLICE: _slice,
    Op.UNSQUEEZE: _unsqueeze,
    Op.SQUEEZE: _squeeze,
    Op.EXPAND: _expand,
    Op.EXP: _float_math("torch.exp"),
    Op.LOG: _float_math("torch.log"),
    Op.SQRT: _float_math("torch.sqrt"),
    Op.RSQRT: _float_math("torch.rsqrt"),
    Op.RECIPROCAL: _float_math("torch.reciprocal"),
    Op.COS: _float_math("torch.cos"),
    Op.SIN: _float_math("torch.sin"),
    Op.ABS: _call("torch.abs"),
    Op.POW: _call("torch.pow"),
    Op.EQUAL: _call("torch.eq"),
    Op.LESS: _call("torch.lt"),
    Op.LESS_OR_EQUAL: _call("torch.le"),
    Op.GREATER: _call("torch.gt"),
    Op.GREATER_OR_EQUAL: _call("torch.ge"),
    Op.NOT: _call("torch.logical_not"),
    Op.AND: _call("torch.logical_and"),
    Op.OR: _call("torch.logical_or"),
    Op.WHERE: _call("torch.where"),
    Op.CAST: lambda node, args: f"{args[0]}.to({_dtype(node.attrs['to'])})",
    Op.REDUCE_MEAN: _reduce("torch.mean"),
    Op.REDUCE_SUM: _reduce("torch.sum"),
    Op.CUMSUM: _cumsum,
    Op.RMS_NORM: _rms_norm,
    Op.SDPA: _sdpa,
    Op.ARANGE: _arange,
}
