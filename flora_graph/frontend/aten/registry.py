"""The ATen -> IR table and what every converter shares.

A converter gets the capture context and the fx node's arguments with fx nodes already
replaced by IR values (a :class:`ComputationNode`, a tuple of them, a :class:`SymDim`, or
a plain Python value) and returns the IR value of the node. Converters are keyed by ATen
overload (``aten.add.Tensor``) and registered with :func:`register` by the family modules
of :mod:`flora_graph.frontend.aten`.

Holds: :data:`ATEN_TABLE`, :func:`register`, :class:`SymDim`, :func:`aten_name`,
:data:`NO_TENSOR_OPS` (shape reads and runtime assertions), :data:`SIZE_OPS` (size reads capture
makes dims) and the helpers the families
share: :func:`out_dtype`, :func:`operand`, :func:`as_dtype`, :func:`compute_dtype`,
:func:`dim_of`, :func:`axis_of`, :func:`cast_to_out` and :func:`refuse`. Sizes given as
``SymInt`` arrive as :class:`SymDim`; types follow torch's promotion: operands are cast to
the dtype torch computes in (read off the fx node).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import GraphError, ShapeError, UnsupportedOpError
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim, add_dims, canonical_dim

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__ = [
    "ATEN_TABLE", "NO_TENSOR_OPS", "SIZE_OPS", "Converter", "SymDim", "as_dtype", "aten_name", "axis_of", "cast_to_out",
    "compute_dtype", "dim_of", "operand", "out_dtype", "refuse", "refuse_used_outputs", "register", "size_ints",
]

aten = torch.ops.aten


@dataclass(frozen=True)
class SymDim:
    """A symbolic size read off a tensor (``aten.sym_size``), as an IR dim."""

    dim: Dim


Converter = Callable[..., Any]
ATEN_TABLE: dict[Any, Converter] = {}
"""ATen overload (or ``operator.getitem``) -> its converter."""

# Shape reads and runtime assertions: they produce no tensor.
NO_TENSOR_OPS = {
    aten.sym_size.int,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_tensor_metadata.default,
    aten._assert_async.msg,  # a check on values (one_hot's index range): torch's, at trace time; no graph node
    aten._assert_async.default,
}

SIZE_OPS = frozenset({
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
})
"""Size reads (``x.size(1)``, ``x.numel()``, ``x.stride(0)``, ``x.storage_offset()``): capture makes
the ``SymInt`` each returns a dim (``CaptureContext.ir_dim`` of its value), so they need no converter."""


def aten_name(target: Any) -> str:
    """Printable name of an fx call target (``aten.linear.default``)."""
    return str(target) if not callable(target) or hasattr(target, "_schema") else getattr(target, "__name__", str(target))


def register(*targets: Any, table: dict[Any, Converter] | None = None) -> Callable[[Converter], Converter]:
    """Register a converter for one or more ATen overloads (in :data:`ATEN_TABLE`, or in ``table``)."""

    def deco(fn: Converter) -> Converter:
        for t in targets:
            (ATEN_TABLE if table is None else table)[t] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- dtypes and operands
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refuse(ctx: CaptureContext, what: str) -> UnsupportedOpError:
    """The error for a form of the current node that capture does not support (``what``)."""
    return UnsupportedOpError(f"{ctx.where()}: {what}", {f"{aten_name(ctx.fx_node.target)} ({what})": [ctx.where()]})


def refuse_used_outputs(ctx: CaptureContext, what: str, *indices: int) -> None:
    """Raise :func:`refuse` (``what``) when an output of the current node's tuple result at one of
    ``indices`` is read by some ``getitem`` that something uses; unused outputs are fine."""
    used = {int(u.args[1]) for u in ctx.fx_node.users if u.target is operator.getitem and u.users}
    if used & set(indices):
        raise refuse(ctx, what)


def out_dtype(ctx: CaptureContext, index: int = 0) -> str:
    """The dtype torch gives the current node's result (``index``: which one of a tuple)."""
    val = ctx.fx_node.meta.get("val")
    if isinstance(val, tuple | list):
        val = val[index]
    return str(val.dtype).removeprefix("torch.")


def operand(ctx: CaptureContext, v: Any, dtype: str) -> ComputationNode:
    """An arithmetic operand in the dtype torch computes in: a node (cast when it differs) or a number.

    A number becomes a rank-0 constant (inside an adapter, its ``scaling``).
    """
    if isinstance(v, ComputationNode):
        return v if v.dtype == dtype else ctx.emit(Op.CAST, [v], {"to": dtype})
    if isinstance(v, SymDim):
        return as_dtype(ctx, v, dtype)
    return ctx.scalar(v, dtype)


def dim_value(ctx: CaptureContext, v: SymDim) -> ComputationNode:
    """A dynamic size as a rank-0 int64 value (``arange(seq) + past_seq``: a cache's positions):
    ``Arange(d, d + 1)`` read off the input carrying ``d``, reshaped to a scalar."""
    try:
        d = canonical_dim(v.dim)
        end = add_dims(d, 1)
    except ShapeError:
        raise UnsupportedOpError(f"{ctx.where()}: a dynamic size ({v.dim}) used as a tensor value",
                                 {f"{aten_name(ctx.fx_node.target)} (a size as a value)": [ctx.where()]}) from None
    one = ctx.emit(Op.ARANGE, [], {"start": d, "end": end, "step": 1, "dtype": "int64"})
    return ctx.emit(Op.RESHAPE, [one], {"shape": ()})


def as_dtype(ctx: CaptureContext, v: Any, dtype: str) -> ComputationNode:
    """``v`` (a node or a Python number) as a node of ``dtype``, cast when it differs."""
    if isinstance(v, SymDim):
        v = dim_value(ctx, v)
    if isinstance(v, ComputationNode):
        return v if v.dtype == dtype else ctx.emit(Op.CAST, [v], {"to": dtype})
    if isinstance(v, bool | int | float):
        return ctx.new_param(f"{ctx.fx_node.name}_scalar", np.asarray(v, dtype=dtype))
    raise GraphError(f"{ctx.where()}: cannot use {type(v).__name__} {v!r} as a tensor")


def cast_to_out(ctx: CaptureContext, x: ComputationNode) -> ComputationNode:
    """``x`` cast to the dtype torch gives the current node's result (nothing when it has it)."""
    return as_dtype(ctx, x, out_dtype(ctx))


def compute_dtype(ctx: CaptureContext, *args: Any) -> str:
    """torch's result type of the current node's tensor/number operands ``args`` (fx values)."""
    probes = []
    for a in args:
        if isinstance(a, torch.fx.Node):
            v = a.meta["val"]
            if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):  # a size read off a tensor: a number
                probes.append({torch.SymInt: 1, torch.SymFloat: 1.0, torch.SymBool: True}[type(v)])
                continue
            probes.append(torch.empty([] if v.dim() == 0 else [1], dtype=v.dtype))
        else:
            probes.append(a)
    if not any(isinstance(p, torch.Tensor) for p in probes):
        raise refuse(ctx, "an operation on Python numbers alone")
    if len(probes) == 1:
        return _dtype_name(probes[0].dtype)
    return _dtype_name(torch.result_type(*probes[:2]))


# --------------------------------------------------------------------------- sizes and axes
def dim_of(ctx: CaptureContext, v: Any) -> Dim:
    """An int, a :class:`SymDim` or a dim name as an IR dim (a name, a product of names, or an int)."""
    if isinstance(v, SymDim | str):  # a SymInt argument, or a dim of an IR shape
        raw = v.dim if isinstance(v, SymDim) else v
        try:
            return canonical_dim(raw)
        except ShapeError:
            raise refuse(ctx, f"a dynamic size {raw!r} that is not a product of dims") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise GraphError(f"{ctx.where()}: expected a size, got {v!r}")
    return int(v)


def size_ints(v: Any, n: int, default: Any = None) -> tuple[int, ...]:
    """A torch size argument (an int, or a list of 1 or ``n``; empty: ``default``) as ``n`` ints."""
    if v is None or (isinstance(v, list | tuple) and not v):
        v = default
    v = list(v) if isinstance(v, list | tuple) else [v]
    return tuple(int(v[0]) if len(v) == 1 else int(v[i]) for i in range(n))


def axis_of(dim: int, rank: int) -> int:
    """A torch dim (maybe negative) as an axis of a tensor of ``rank`` (0 for a scalar)."""
    return dim % rank if rank else 0


def chunk_samples(m: int) -> list[int]:
    """The sizes a rounding to multiples of ``m`` (a chunked scan's) is checked on: both sides of the first
    multiples of ``m`` and the start of the range, a few values whatever ``m``."""
    return sorted({v for k in (1, 2, 3) for v in (k * m - 1, k * m, k * m + 1)} | {1, 2, 3} - {0})
