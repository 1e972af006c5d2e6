"""Reductions and scans: ``ReduceMean``, ``ReduceSum``, ``CumSum``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. The numpy rules sum and average
floats in float64 (the caller rounds the result to the node's dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import normalize_axis
from flora_graph.ops._onnx import int64
from flora_graph.ops._torch import ints, torch_dtype
from flora_graph.ops.registry import define

__all__: list[str] = []


# --------------------------------------------------------------------------- ReduceMean, ReduceSum
def _reduce_axes(axes: Sequence[int], rank: int, what: str) -> list[int]:
    norm = [normalize_axis(a, rank, what=f"{what} axis") for a in axes] if axes else list(range(rank))
    if len(set(norm)) != len(norm):
        raise ShapeError(f"{what}: axes {tuple(axes)} repeat an axis")
    return norm


def _infer_reduce(shapes, dtypes, attrs):
    """``ReduceMean``/``ReduceSum`` over ``axes`` (empty: every axis), ``keepdims`` 0 or 1."""
    x = shapes[0]
    if dtypes[0] == "bool":
        raise ShapeError("reductions do not take bool inputs (cast first)")
    if attrs["keepdims"] not in (0, 1):
        raise ShapeError(f"keepdims must be 0 or 1, got {attrs['keepdims']}")
    axes = set(_reduce_axes(attrs["axes"], len(x), "reduce"))
    if attrs["keepdims"]:
        return tuple(1 if i in axes else d for i, d in enumerate(x)), dtypes[0]
    return tuple(d for i, d in enumerate(x) if i not in axes), dtypes[0]


def _numpy_reduce(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def impl(x: np.ndarray, *, axes: tuple[int, ...], keepdims: int) -> np.ndarray:
        axis = tuple(a % x.ndim for a in axes) if axes else None
        return fn(x, axis=axis, keepdims=bool(keepdims), dtype=np.float64 if x.dtype.kind in "fV" else None)

    return impl


def _mean(x: np.ndarray, *, axis, keepdims: bool, dtype) -> np.ndarray:
    return np.mean(x, axis=axis, keepdims=keepdims, dtype=dtype or np.float64)


def _onnx_reduce(op_type: str) -> Callable[[Any, ComputationNode, str], None]:
    def lower(ctx: Any, node: ComputationNode, out: str) -> None:
        axes = node.attrs["axes"]
        extra = [int64(ctx, axes, f"{node.name}/axes")] if axes else []
        ctx.emit(op_type, [ctx.arg(node, 0), *extra], [out], keepdims=node.attrs["keepdims"])

    lower.__doc__ = f"``{op_type}`` with its axes as an input (none: every axis)."
    return lower


def _torch_reduce(fn: str) -> Callable[[ComputationNode, list[str]], str]:
    def lower(node: ComputationNode, args: list[str]) -> str:
        rank = len(node.inputs[0].shape)
        axes = [a % rank for a in node.attrs["axes"]] or list(range(rank))
        keep = bool(node.attrs["keepdims"])
        dtype = f", dtype={torch_dtype(node.dtype)}" if fn == "torch.sum" else ""  # torch sums integers as int64
        return f"{fn}({args[0]}, {ints(axes)}, {keep}{dtype})"

    return lower


_REDUCE_ATTRS = {"axes": AttrSpec("ints", ()), "keepdims": AttrSpec("int", 1)}

define(
    "REDUCE_MEAN", "ReduceMean", (1, 1), dict(_REDUCE_ATTRS),
    infer=_infer_reduce, doc="Mean over axes (empty: all), keeping them as size 1 when keepdims.",
    numpy=_numpy_reduce(_mean), onnx=_onnx_reduce("ReduceMean"), torch=_torch_reduce("torch.mean"),
    groups=("Reduce",),
)
define(
    "REDUCE_SUM", "ReduceSum", (1, 1), dict(_REDUCE_ATTRS),
    infer=_infer_reduce, doc="Sum over axes (empty: all), keeping them as size 1 when keepdims.",
    numpy=_numpy_reduce(np.sum), onnx=_onnx_reduce("ReduceSum"), torch=_torch_reduce("torch.sum"),
    groups=("Reduce",),
)


# --------------------------------------------------------------------------- CumSum
def _infer_cumsum(shapes, dtypes, attrs):
    if dtypes[0] == "bool":
        raise ShapeError("CumSum does not take bool inputs (cast first)")
    normalize_axis(attrs["axis"], len(shapes[0]))
    return tuple(shapes[0]), dtypes[0]


def _numpy_cumsum(x: np.ndarray, *, axis: int) -> np.ndarray:
    return np.cumsum(x, axis=axis, dtype=np.float64 if x.dtype.kind in "fV" else None)


def _onnx_cumsum(ctx: Any, node: ComputationNode, out: str) -> None:
    """``CumSum`` with its axis as a rank-0 int64 input."""
    axis = ctx.constant(np.array(node.attrs["axis"], dtype=np.int64), f"{node.name}/axis")
    ctx.emit("CumSum", [ctx.arg(node, 0), axis], [out])


def _torch_cumsum(node: ComputationNode, args: list[str]) -> str:
    return f"torch.cumsum({args[0]}, {int(node.attrs['axis'])}, dtype={torch_dtype(node.dtype)})"


define(
    "CUMSUM", "CumSum", (1, 1), {"axis": AttrSpec("int", required=True)},
    infer=_infer_cumsum, doc="Inclusive cumulative sum along axis.",
    numpy=_numpy_cumsum, onnx=_onnx_cumsum, torch=_torch_cumsum,
)
