"""The numpy reference interpreter: the executable definition of every op.

:data:`NUMPY_IMPLS` maps each non-leaf :class:`~flora_graph.ir.ops.Op` to a small numpy
function ``impl(*inputs, **attrs) -> ndarray``; every other backend is tested against it.
:func:`run` walks the nodes in order (the torch.fx ``Interpreter`` / JAX ``eval_jaxpr``
pattern), keeps values in an environment and frees each one after its last use.

Each op computes in its node's dtype; float16/bfloat16 values are widened to float32 for
the computation and every result is rounded to the node's dtype. Statistics (softmax,
LayerNorm) and erf-based GELU use float64 internally, then cast back.

Attributes of kind ``"dim"``/``"dims"`` may name dynamic dims (``Slice(ends=("seq",))``);
:func:`eval_node` resolves them from the sizes the graph inputs bind (``dims``), so the
implementations see plain ints. The transformer op family lives in
:mod:`flora_graph.runtimes.reference_ops`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

from flora_graph.errors import GraphError, RuntimeInputError, ShapeError, UnsupportedOpError
from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op, schema
from flora_graph.ir.shapes import format_shape
from flora_graph.runtimes.reference_ops import TRANSFORMER_IMPLS

__all__ = ["NUMPY_IMPLS", "check_inputs", "eval_node", "resolve_attrs", "run"]

Impl = Callable[..., np.ndarray]


# --------------------------------------------------------------------------- op semantics
def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":  # integer division truncates toward zero (C, ONNX Runtime)
        q = a // b
        return q + ((a % b != 0) & ((a < 0) != (b < 0)))
    return a / b


def _gelu(x: np.ndarray, *, approximate: str) -> np.ndarray:
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))
    else:
        y = 0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0)))
    return y.astype(x.dtype)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


def _softmax(x: np.ndarray, *, axis: int) -> np.ndarray:
    x64 = x.astype(np.float64)
    e = np.exp(x64 - np.max(x64, axis=axis, keepdims=True, initial=-np.inf))
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def _layer_norm(
    x: np.ndarray, scale: np.ndarray | None = None, bias: np.ndarray | None = None, *, axis: int, epsilon: float
) -> np.ndarray:
    axes = tuple(range(axis % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = np.square(x64 - mean).mean(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def _reshape(x: np.ndarray, *, shape: tuple[int, ...]) -> np.ndarray:
    # -1 is what the dims not copied by a 0 leave over, so [0, -1] stays defined for an empty batch
    rest = math.prod(d for i, d in enumerate(x.shape) if i >= len(shape) or shape[i] != 0)
    infer = rest // math.prod(t for t in shape if t > 0)
    return x.reshape([x.shape[i] if t == 0 else infer if t == -1 else t for i, t in enumerate(shape)])


def _flatten(x: np.ndarray, *, axis: int) -> np.ndarray:
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _split(x: np.ndarray, *, axis: int, sizes: tuple[int, ...], index: int) -> np.ndarray:
    start = sum(sizes[:index])
    where = [slice(None)] * x.ndim
    where[axis % x.ndim] = slice(start, start + sizes[index])
    return x[tuple(where)]


def _conv2d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> np.ndarray:
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    ho, wo = win.shape[2:4]
    win = win.reshape(n, groups, cg, ho, wo, kh, kw)
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True).reshape(n, o, ho, wo)
    return y if b is None else y + b.reshape(1, o, 1, 1)


NUMPY_IMPLS: dict[Op, Impl] = {
    Op.LINEAR: _linear,
    Op.MATMUL: np.matmul,
    Op.CONV2D: _conv2d,
    Op.ADD: np.add,
    Op.SUB: np.subtract,
    Op.MUL: np.multiply,
    Op.DIV: _div,
    Op.NEG: np.negative,
    Op.RELU: lambda x: np.maximum(x, 0),
    Op.GELU: _gelu,
    Op.SILU: lambda x: x * _sigmoid(x),
    Op.SIGMOID: _sigmoid,
    Op.TANH: np.tanh,
    Op.IDENTITY: lambda x: x,
    Op.SOFTMAX: _softmax,
    Op.LAYER_NORM: _layer_norm,
    Op.RESHAPE: _reshape,
    Op.FLATTEN: _flatten,
    Op.TRANSPOSE: lambda x, *, perm: np.transpose(x, perm),
    Op.CONCAT: lambda *xs, axis: np.concatenate(xs, axis=axis),
    Op.SPLIT: _split,
    **TRANSFORMER_IMPLS,
}


# --------------------------------------------------------------------------- inputs
def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16; ml_dtypes (an onnx dependency) does

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _to_numpy(name: str, value: Any) -> np.ndarray:
    """Convert a numpy array, torch tensor or array-like; raise ``RuntimeInputError``."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        value = t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise RuntimeInputError(f"input {name!r}: cannot convert {type(value).__name__} to an array ({exc})") from None


def _cast(name: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """Cast to the declared dtype where safe: floats and ints to a float, ints to an int."""
    kind, want = arr.dtype.kind, _np_dtype(dtype)
    ok = {"f": "fiu", "V": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(want.kind, "")  # "V": bfloat16
    if kind not in ok and str(arr.dtype) != dtype:
        raise RuntimeInputError(f"input {name!r}: dtype {arr.dtype} cannot be cast to the declared {dtype}")
    return arr.astype(want, copy=False)


def _bind_dim(dims: dict[str, int], dim: int | str, size: int, where: str) -> None:
    if isinstance(dim, int):
        if dim != size:
            raise RuntimeInputError(f"{where} has size {size}, the graph declares {dim}")
    elif dims.setdefault(dim, size) != size:
        raise RuntimeInputError(f"{where} binds dim {dim!r} to {size}, but another input bound it to {dims[dim]}")


def _eval_dim(dim: int | str, dims: Mapping[str, int]) -> int | None:
    if isinstance(dim, int):
        return dim
    if dim in dims:
        return dims[dim]
    parts = [p if p.isdigit() else dims.get(p) for p in dim.split("*")]
    return None if None in parts else math.prod(int(p) for p in parts)  # type: ignore[arg-type]


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False  # no op may write into the caller's data or the graph's weights
    return view


def check_inputs(graph: Graph, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Convert, cast and shape-check ``inputs``; return arrays by name and the bound named dims."""
    declared = {n.name: n for n in graph.inputs}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise RuntimeInputError(f"unknown input(s) {unknown}; graph {graph.name!r} takes {sorted(declared)}")
    missing = [k for k in declared if k not in inputs]
    if missing:
        raise RuntimeInputError(f"missing input(s) {missing} for graph {graph.name!r}")
    arrays: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    compound: list[tuple[int | str, int, str]] = []
    for name, node in declared.items():
        arr = _cast(name, _to_numpy(name, inputs[name]), node.dtype)
        if arr.ndim != len(node.shape):
            raise RuntimeInputError(
                f"input {name!r} has rank {arr.ndim} (shape {list(arr.shape)}), the graph declares {format_shape(node.shape)}"
            )
        for i, (dim, size) in enumerate(zip(node.shape, arr.shape, strict=True)):
            where = f"input {name!r} dim {i}"
            if isinstance(dim, str) and "*" in dim:
                compound.append((dim, size, where))
            else:
                _bind_dim(dims, dim, size, where)
        arrays[name] = arr
    for dim, size, where in compound:  # "batch*seq": check once its factors are bound
        value = _eval_dim(dim, dims)
        _bind_dim(dims, dim if value is None else value, size, where)
    _check_dim_max(graph, dims)
    return arrays, dims


def _check_dim_max(graph: Graph, dims: Mapping[str, int]) -> None:
    """Refuse a named dim bound past its ``graph.dim_max`` bound, naming the dim, the input and the bound."""
    for dim, hi in graph.dim_max.items():
        size = dims.get(dim)
        if size is not None and size > hi:
            where = next((f"input {n.name!r} dim {i}" for n in graph.inputs for i, d in enumerate(n.shape) if d == dim), "")
            raise RuntimeInputError(
                f"{where}: dim {dim!r} is {size}, past its maximum {hi} (graph {graph.name!r} takes "
                f"sizes 0..{hi} of {dim!r}: graph.dim_max)"
            )


# --------------------------------------------------------------------------- interpreter
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
    size = _eval_dim(dim, dims or {})
    if size is None:
        raise GraphError(
            f"node {node.name!r} ({node.op.value}): dim {dim!r} is not bound by the graph inputs "
            f"(bound: {dict(dims) if dims is not None else 'none given'})"
        )
    return size


def eval_node(node: ComputationNode, args: list[np.ndarray], dims: Mapping[str, int] | None = None) -> np.ndarray:
    """Evaluate one non-leaf node on its input arrays, in the node's dtype.

    ``dims`` binds named dims to sizes (as :func:`check_inputs` returns them); it is needed
    only by nodes whose attributes name a dim.
    """
    impl = NUMPY_IMPLS.get(node.op)
    if impl is None:
        raise UnsupportedOpError(
            f"node {node.name!r}: no numpy implementation of {node.op.value}", {node.op.value: [node.name]}
        )
    dtype = _np_dtype(node.dtype)
    attrs = resolve_attrs(node, dims)
    args = [a.astype(np.float32) if a.dtype.kind in "fV" and a.dtype.itemsize < 4 else a for a in args]
    try:
        out = np.asarray(impl(*args, **attrs))
    except (ValueError, TypeError, IndexError) as exc:
        raise GraphError(f"node {node.name!r} ({node.op.value}): {exc}") from exc
    return out.astype(dtype, copy=False)


def _check_shape(node: ComputationNode, value: np.ndarray, dims: Mapping[str, int]) -> None:
    want = [_eval_dim(d, dims) for d in node.shape]
    if len(want) != value.ndim or any(w is not None and w != s for w, s in zip(want, value.shape, strict=False)):
        raise ShapeError(
            f"node {node.name!r} ({node.op.value}) produced shape {list(value.shape)}, "
            f"its declared shape is {format_shape(node.shape)} with {dict(dims)}"
        )


def run(graph: Graph, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run ``graph`` on named inputs (numpy arrays, torch tensors or array-likes).

    Returns ``{output name: array}``. Only nodes an output depends on are evaluated; each
    value is freed after its last use. Raises :class:`RuntimeInputError` (naming the
    input) for missing, unknown, mis-shaped or mistyped inputs, and :class:`ShapeError`
    when a node's result disagrees with its declared shape.
    """
    arrays, dims = check_inputs(graph, inputs)
    env = {name: _readonly(arr) for name, arr in arrays.items()}
    order = graph.live_nodes()
    last_use = {i.name: pos for pos, n in enumerate(order) for i in n.inputs}
    keep = {n.name for n in graph.outputs.values()}
    for pos, node in enumerate(order):
        if node.op is Op.INPUT:
            continue
        if node.op is Op.CONST:
            if node.attrs["param"] not in graph.params:
                raise GraphError(f"Const node {node.name!r} refers to unknown param {node.attrs['param']!r}")
            value = _readonly(graph.params[node.attrs["param"]])
        else:
            try:
                args = [env[i.name] for i in node.inputs]
            except KeyError as exc:
                raise GraphError(f"node {node.name!r} reads {exc.args[0]!r} before it is defined") from None
            value = eval_node(node, args, dims)
            for i in node.inputs:
                if last_use[i.name] == pos and i.name not in keep:
                    env.pop(i.name, None)
        _check_shape(node, value, dims)
        env[node.name] = value
    out: dict[str, np.ndarray] = {}
    for key, node in graph.outputs.items():
        value = env[node.name]
        # hand back arrays the caller owns: no views of weights/inputs, no aliasing between outputs
        out[key] = value.copy() if not value.flags.writeable or any(v is value for v in out.values()) else value
    return out
