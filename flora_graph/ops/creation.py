"""Values made from attributes alone: ``Arange``.

Declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule, numpy
semantics, ONNX rule and torch rule side by side. Its bounds are attributes of kind
``"dim"``: an int or a dim name (``Arange(end="seq")``) read, at run time, off the graph
input that carries it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import Shape, canonical_dim, dim_terms, divide_dims, subtract_dims
from flora_graph.ops._onnx import scalar_dim
from flora_graph.ops._torch import bound_expr, torch_dtype
from flora_graph.ops.registry import define

__all__: list[str] = []


def _infer_arange(shapes, dtypes, attrs):
    """``[start, end)`` by ``step``; with a named bound, a positive step that divides ``end - start``
    exactly has a dim as its size (``Arange(past_seq, past_seq+seq)`` has ``seq``, ``Arange(0, 3*batch, 3)``
    has ``batch``)."""
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    size: Any
    if isinstance(step, str) or step == 0:
        raise ShapeError(f"Arange: step must be a nonzero int, got {step!r}")
    if isinstance(start, int) and isinstance(end, int):
        size = max(0, -(-(end - start) // step))
    elif step > 0 and (diff := subtract_dims(end, start)) is not None \
            and (start == 0 or all(c >= 0 for c, _ in dim_terms(diff))) \
            and (size := diff if step == 1 else divide_dims(diff, step)) is not None:
        pass  # Arange(past_seq, past_seq+seq) -> seq; Arange(0, seq-1), a size, -> seq-1; not Arange(1, seq)
    else:
        raise ShapeError(f"Arange({start}, {end}, {step}): the length cannot be written as a dim")
    shape: Shape = (canonical_dim(size),)
    return shape, attrs["dtype"]


def _numpy_arange(*, start: int, end: int, step: int, dtype: str) -> np.ndarray:
    return np.arange(start, end, step, dtype=dtype)


def _onnx_arange(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Range`` over rank-0 bounds of the compute dtype (a named bound read off a graph input)."""
    dtype = ctx.dtype
    bounds = [scalar_dim(ctx, node.attrs[k], node, dtype) for k in ("start", "end", "step")]
    ctx.emit("Range", bounds, [out])


def _torch_arange(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    start, end, step = (bound_expr(a[k], node, ()) for k in ("start", "end", "step"))
    return f"torch.arange({start}, {end}, {step}, dtype={torch_dtype(a['dtype'])})"


define(
    "ARANGE", "Arange", (0, 0),
    {"start": AttrSpec("dim", 0), "end": AttrSpec("dim", required=True), "step": AttrSpec("dim", 1),
     "dtype": AttrSpec("str", "int64", choices=("int32", "int64", "float32", "float64"))},
    infer=_infer_arange, doc="start, start + step, ... < end; bounds may name dims (Arange(0, 'seq')).",
    numpy=_numpy_arange, onnx=_onnx_arange, torch=_torch_arange,
)
