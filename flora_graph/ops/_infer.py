"""Shape/dtype rules shared by several families (signature: :data:`flora_graph.ir.ops.InferFn`)."""

from __future__ import annotations

from collections.abc import Sequence

from flora_graph.errors import ShapeError
from flora_graph.ir.shapes import broadcast_shapes

__all__ = ["binary", "same_dtype", "same_float_dtype", "unary"]


def same_float_dtype(dtypes: Sequence[str]) -> str:
    """The one dtype of ``dtypes``; ``ShapeError`` when they differ."""
    first = dtypes[0]
    for d in dtypes[1:]:
        if d != first:
            raise ShapeError(f"dtypes {list(dtypes)} differ")
    return first


def same_dtype(dtypes: Sequence[str], what: str) -> str:
    """The one dtype of ``dtypes``; ``ShapeError`` naming ``what`` when they differ."""
    if any(d != dtypes[0] for d in dtypes[1:]):
        raise ShapeError(f"{what}: dtypes {list(dtypes)} differ")
    return dtypes[0]


def unary(shapes, dtypes, attrs):
    """Same shape and dtype as the input."""
    return tuple(shapes[0]), dtypes[0]


def binary(shapes, dtypes, attrs):
    """Broadcast shape; both operands of one dtype."""
    return broadcast_shapes(shapes[0], shapes[1]), same_float_dtype(dtypes)
