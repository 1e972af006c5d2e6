"""Helpers of the ONNX rules: simple one-node rules, int64 constants, named dims as values.

A rule appends ONNX nodes through the driver's context ``ctx``
(:class:`~flora_graph.runtimes.onnx_lowering.LoweringContext`: ``emit``, ``constant``,
``scalar``, ``once``, ``arg``/``args``, ``value``, ``names``, ``graph``, ``opset``, ``dtype``).
A named dim in an attribute becomes an int64 value computed in the graph:
``Shape(input, start=i, end=i + 1)`` of a graph input that carries it (made once per name
and shared), products multiplied, and the pieces ``Concat``-ed into the shape/starts/ends
input of the ONNX op. Nothing here imports ``onnx`` at module level, so ``import flora_graph``
stays light; the data type codes are the ONNX specification's ``TensorProto.DataType`` values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from flora_graph.errors import GraphError
from flora_graph.ir.shapes import Dim, canonical_dim, dim_terms, floor_div_parts, is_dim_name, linear_rest

if TYPE_CHECKING:
    from flora_graph.ir.node import ComputationNode

__all__ = [
    "ONNX_DTYPES", "STASH_DOUBLE", "STASH_FLOAT", "axes_input", "dim_tensor", "dims_tensor", "int64", "scalar_dim",
    "simple", "split_key", "tensor_attr",
]

ONNX_DTYPES = {"float16": 10, "bfloat16": 16, "float32": 1, "float64": 11, "int32": 6, "int64": 7, "bool": 9}
"""IR dtype -> ONNX ``TensorProto.DataType`` code (FLOAT16, BFLOAT16, FLOAT, DOUBLE, INT32, INT64, BOOL)."""
STASH_FLOAT, STASH_DOUBLE = ONNX_DTYPES["float32"], ONNX_DTYPES["float64"]

Lowering = Callable[[Any, "ComputationNode", str], None]


def simple(op_type: str, **attrs: str) -> Lowering:
    """A rule emitting one ``op_type`` node with the same inputs and the IR ``attrs`` renamed (onnx=ir)."""

    def lower(ctx: Any, node: ComputationNode, out: str) -> None:
        ctx.emit(op_type, ctx.args(node), [out], **{k: node.attrs[v] for k, v in attrs.items()})

    lower.__doc__ = f"Lowers to ONNX ``{op_type}``."
    return lower


def int64(ctx: Any, values: Sequence[int], hint: str) -> str:
    """A new int64 ``[len(values)]`` initializer."""
    return ctx.constant(np.array(list(values), dtype=np.int64), hint)


def tensor_attr(array: np.ndarray) -> Any:
    """``array`` as an ONNX ``TensorProto`` attribute value (``ConstantOfShape(value=...)``)."""
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array))


def axes_input(op_type: str) -> Lowering:
    """A rule emitting ``op_type`` with the node's ``axes`` attribute as an int64 input."""

    def lower(ctx: Any, node: ComputationNode, out: str) -> None:
        ctx.emit(op_type, [ctx.arg(node, 0), int64(ctx, node.attrs["axes"], f"{node.name}/axes")], [out])

    lower.__doc__ = f"``{op_type}`` with its axes as an int64 input."
    return lower


def dim_tensor(ctx: Any, dim: Dim, node: ComputationNode) -> str:
    """An int64 ``[1]`` value holding ``dim``: a constant, or read off the graph input carrying it (made once)."""
    if isinstance(dim, int):
        return int64(ctx, [dim], f"{node.name}/dim")
    dim = canonical_dim(dim)

    def make() -> str:
        for inp in ctx.graph.inputs:
            for i, d in enumerate(inp.shape):
                if isinstance(d, str) and canonical_dim(d) == dim:
                    return ctx.emit("Shape", [ctx.names[inp]], start=i, end=i + 1)
        for inp in ctx.graph.inputs:  # a term of its own in an input's dim: past_seq of past_seq+seq, less seq
            for i, d in enumerate(inp.shape):
                rest = linear_rest(d, dim) if isinstance(d, str) and is_dim_name(dim) else None
                if rest is not None:
                    return ctx.emit("Sub", [ctx.emit("Shape", [ctx.names[inp]], start=i, end=i + 1),
                                            dim_tensor(ctx, rest, node)])
        parts = floor_div_parts(dim)
        if parts is not None:  # ((samples-10)//5): a dim is never negative, so Div's truncation is the floor
            return ctx.emit("Div", [dim_tensor(ctx, parts[0], node), int64(ctx, [parts[1]], f"{node.name}/divisor")])
        terms = dim_terms(dim)
        if len(terms) == 1 and terms[0][0] == 1 and len(terms[0][1]) == 1:
            raise GraphError(f"node {node.name!r} ({node.op.value}): dim {dim!r} is not carried by any graph input")
        value = None
        for coef, names in terms:  # a product of dims, or a sum of such terms
            term = None
            for n in names:
                term = dim_tensor(ctx, n, node) if term is None else ctx.emit("Mul", [term, dim_tensor(ctx, n, node)])
            if term is None or abs(coef) != 1:
                c = dim_tensor(ctx, abs(coef), node)
                term = c if term is None else ctx.emit("Mul", [term, c])
            if value is None:
                value = term if coef > 0 else ctx.emit("Neg", [term])
            else:
                value = ctx.emit("Add" if coef > 0 else "Sub", [value, term])
        return value

    return ctx.once(("dim", dim), make)


def dims_tensor(ctx: Any, dims: Sequence[Dim], node: ComputationNode, hint: str) -> str:
    """An int64 ``[len(dims)]`` value: one constant when every dim is static, else a ``Concat``."""
    if all(isinstance(d, int) for d in dims):
        return int64(ctx, [int(d) for d in dims], f"{node.name}/{hint}")  # type: ignore[arg-type]
    return ctx.emit("Concat", [dim_tensor(ctx, d, node) for d in dims], axis=0)


def scalar_dim(ctx: Any, dim: Dim, node: ComputationNode, dtype: str) -> str:
    """A rank-0 value of ``dtype`` holding ``dim`` (for ``Range``; made once per dim and dtype)."""
    if isinstance(dim, int):
        return ctx.constant(np.array(dim, dtype=dtype), f"{node.name}/{dim}")

    def make() -> str:
        value = ctx.emit("Squeeze", [dim_tensor(ctx, dim, node), int64(ctx, [0], f"{node.name}/axes")])
        return value if dtype == "int64" else ctx.emit("Cast", [value], to=ONNX_DTYPES[dtype])

    return ctx.once(("scalar-dim", canonical_dim(dim), dtype), make)


def split_key(node: ComputationNode) -> tuple[Any, ...]:
    """``Split`` nodes with the same key are pieces of one ONNX ``Split``."""
    rank = len(node.inputs[0].shape)
    return (id(node.inputs[0]), node.attrs["axis"] % rank, tuple(node.attrs["sizes"]))
