"""The reference semantics of one node: :func:`eval_node` runs an op's numpy rule.

Each op computes in its node's dtype; float16/bfloat16 values are widened to float32 for
the computation and every result is rounded to the node's dtype. Attributes of kind
``"dim"``/``"dims"`` may name dynamic dims (``Slice(ends=("seq",))``); :func:`resolve_attrs`
replaces them by the sizes the graph inputs bind (``dims``), so the numpy rules see plain
ints. The interpreter loop over a whole graph is :func:`flora_graph.runtimes.reference.run`;
passes that fold constants call :func:`eval_node` directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from flora_graph.errors import GraphError, UnsupportedOpError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op, schema
from flora_graph.ir.shapes import eval_dim, is_static
from flora_graph.ops.registry import OPS

__all__ = ["eval_dim", "eval_node", "fold_static", "np_dtype", "resolve_attrs"]


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of IR dtype ``name`` (bfloat16 from ``ml_dtypes``, an onnx dependency)."""
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def resolve_attrs(node: ComputationNode, dims: Mapping[str, int] | None) -> dict[str, Any]:
    """``node.attrs`` with every named dim of its ``"dim"``/``"dims"`` attributes replaced by its size.

    Raises :class:`GraphError` naming the node and the dim when ``dims`` does not bind it.
    """
    specs = schema(node.op).attrs
    out = dict(node.attrs)
    for key, value in node.attrs.items():
        kind = specs[key].kind if key in specs else None
        if kind == "dim" and isinstance(value, str):
            out[key] = _resolve_dim(node, value, dims)
        elif kind == "dims" and any(isinstance(v, str) for v in value):
            out[key] = tuple(_resolve_dim(node, v, dims) if isinstance(v, str) else v for v in value)
    return out


def _resolve_dim(node: ComputationNode, dim: str, dims: Mapping[str, int] | None) -> int:
    size = eval_dim(dim, dims or {})
    if size is None:
        raise GraphError(
            f"node {node.name!r} ({node.op.value}): dim {dim!r} is not bound by the graph inputs "
            f"(bound: {dict(dims) if dims is not None else 'none given'})"
        )
    return size


def eval_node(node: ComputationNode, args: list[np.ndarray], dims: Mapping[str, int] | None = None) -> np.ndarray:
    """Evaluate one non-leaf node on its input arrays, in the node's dtype.

    ``dims`` binds named dims to sizes (as :func:`~flora_graph.runtimes.reference.check_inputs`
    returns them); it is needed only by nodes whose attributes name a dim.
    """
    d = OPS.get(node.op)
    if d is None:
        raise UnsupportedOpError(
            f"node {node.name!r}: no numpy implementation of {node.op.value}", {node.op.value: [node.name]}
        )
    dtype = np_dtype(node.dtype)
    attrs = resolve_attrs(node, dims)
    try:
        args = [a.astype(np.float32) if a.dtype.kind in "fV" and a.dtype.itemsize < 4 else a for a in args]
        out = np.asarray(d.numpy(*args, **attrs))
        return out.astype(dtype, copy=False)
    except (ValueError, TypeError, IndexError) as exc:
        raise GraphError(f"node {node.name!r} ({node.op.value}): {exc}") from exc
    except MemoryError as exc:  # numpy's "Unable to allocate ..." names no node
        raise GraphError(f"node {node.name!r} ({node.op.value}): out of memory computing its result "
                         f"(declared shape {list(node.shape)} {node.dtype}): {exc}") from None


def fold_static(
    params: Mapping[str, np.ndarray], nodes: Iterable[ComputationNode], max_elements: int,
) -> tuple[dict[ComputationNode, np.ndarray], dict[str, str]]:
    """The value of every node of ``nodes`` (in graph order) computable from weights alone.

    ``Const`` nodes take their param from ``params``; a node whose inputs all have a value,
    whose shape is static and whose result has at most ``max_elements`` values is evaluated
    with :func:`eval_node`, so chains fold in one walk. Returns ``(values, refused)``, ``refused``
    naming each node left out for its size, with the reason. Used by the ``constant-fold``
    pass and by the torch code generator (weight-only expressions computed once).
    """
    values: dict[ComputationNode, np.ndarray] = {}
    refused: dict[str, str] = {}
    for n in nodes:
        if n.op is Op.CONST:
            values[n] = params[n.attrs["param"]]
            continue
        if n.op is Op.INPUT or not n.inputs or not all(i in values for i in n.inputs):
            continue
        if not is_static(n.shape):  # Expand(Const, ("batch", 4)): its size comes from the inputs at run time
            continue
        size = int(np.prod([int(d) for d in n.shape], dtype=np.int64))
        if size > max_elements:
            refused[n.name] = f"constant-fold: result has {size} values > max_elements={max_elements}"
            continue
        values[n] = eval_node(n, [values[i] for i in n.inputs])
    return values, refused
