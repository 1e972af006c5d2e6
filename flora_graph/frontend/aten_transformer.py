"""ATen converters of the transformer op family; importing this module registers them in ``ATEN_TABLE``.

Embedding/index_select/select/unbind/one-tensor index -> ``Gather``; ``gather`` ->
``GatherElements``; index with several tensors on consecutive axes -> ``Index``;
scaled-dot-product attention (with ``enable_gqa`` expanded into ``Unsqueeze``/``Expand``/
``Reshape`` of k and v) -> ``SDPA``; ``rms_norm`` -> ``RMSNorm``; pow, sqrt, rsqrt, exp, log,
cos, sin, abs, reciprocal; means, sums, cumsum; comparisons, boolean logic,
``where``/``masked_fill``; dtype casts -> ``Cast``; slice/unsqueeze/squeeze/expand; arange and
the ``full``/``ones``/``zeros`` family (a constant when every size is static, else ``Expand``
of a scalar to the named sizes); ``triu``/``tril`` (``Arange`` + comparison + ``Where``);
``diff`` with a one-element ``prepend`` (transformers' packed-sequence check); ``addmm``.

Sizes given as ``SymInt`` arrive as :class:`SymDim` and become attributes naming the
dynamic dim (``Slice(ends=("seq",))``, ``Arange(end="seq")``). Types follow torch's
promotion: operands are cast to the dtype torch computes in (read off the fx node).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import GraphError, ShapeError, UnsupportedOpError
from flora_graph.frontend.aten_table import SymDim, aten_name, out_dtype, register
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim, canonical_dim

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten


# --------------------------------------------------------------------------- helpers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _refuse(ctx: CaptureContext, what: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"{ctx.where()}: {what}", {f"{aten_name(ctx.fx_node.target)} ({what})": [ctx.where()]})


def as_dtype(ctx: CaptureContext, v: Any, dtype: str) -> ComputationNode:
    """``v`` (a node or a Python number) as a node of ``dtype``, cast when it differs."""
    if isinstance(v, SymDim):
        raise _refuse(ctx, f"a dynamic size ({v.dim}) used as a tensor value")
    if isinstance(v, ComputationNode):
        return v if v.dtype == dtype else ctx.emit(Op.CAST, [v], {"to": dtype})
    if isinstance(v, bool | int | float):
        return ctx.new_param(f"{ctx.fx_node.name}_scalar", np.asarray(v, dtype=dtype))
    raise GraphError(f"{ctx.where()}: cannot use {type(v).__name__} {v!r} as a tensor")


def compute_dtype(ctx: CaptureContext, *args: Any) -> str:
    """torch's result type of the current node's tensor/number operands ``args`` (fx values)."""
    probes = []
    for a in args:
        if isinstance(a, torch.fx.Node):
            v = a.meta["val"]
            probes.append(torch.empty([] if v.dim() == 0 else [1], dtype=v.dtype))
        else:
            probes.append(a)
    if not any(isinstance(p, torch.Tensor) for p in probes):
        raise _refuse(ctx, "an operation on Python numbers alone")
    if len(probes) == 1:
        return _dtype_name(probes[0].dtype)
    return _dtype_name(torch.result_type(*probes[:2]))


def dim_of(ctx: CaptureContext, v: Any) -> Dim:
    """An int, a :class:`SymDim` or a dim name as an IR dim (a name, a product of names, or an int)."""
    if isinstance(v, SymDim | str):  # a SymInt argument, or a dim of an IR shape
        raw = v.dim if isinstance(v, SymDim) else v
        try:
            return canonical_dim(raw)
        except ShapeError:
            raise _refuse(ctx, f"a dynamic size {raw!r} that is not a product of dims") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise GraphError(f"{ctx.where()}: expected a size, got {v!r}")
    return int(v)


def _axis(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _cast_to_out(ctx: CaptureContext, x: ComputationNode) -> ComputationNode:
    return as_dtype(ctx, x, out_dtype(ctx))


# --------------------------------------------------------------------------- casts
@register(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)
def _to(ctx, x, *args, **kwargs):
    """Any ``to``/``_to_copy``: a ``Cast`` to the dtype torch reports, nothing when it is unchanged."""
    return _cast_to_out(ctx, x)


@register(aten.type_as.default)
def _type_as(ctx, x, other):
    return as_dtype(ctx, x, other.dtype)


# --------------------------------------------------------------------------- gather
@register(aten.embedding.default)
def _embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return ctx.emit(Op.GATHER, [weight, indices], {"axis": 0})


@register(aten.index_select.default)
def _index_select(ctx, x, dim, index):
    return ctx.emit(Op.GATHER, [x, index], {"axis": int(dim)})


@register(aten.gather.default)
def _gather_elements(ctx, x, dim, index, *, sparse_grad=False):
    return ctx.emit(Op.GATHER_ELEMENTS, [x, index], {"axis": int(dim)})


@register(aten.select.int)
def _select(ctx, x, dim, index):
    if isinstance(index, SymDim):
        raise _refuse(ctx, "select at a dynamic index")
    idx = ctx.new_param(f"{ctx.fx_node.name}_index", np.asarray(int(index), dtype=np.int64))
    return ctx.emit(Op.GATHER, [x, idx], {"axis": int(dim)})


@register(aten.unbind.int)
def _unbind(ctx, x, dim=0):
    axis = _axis(int(dim), len(x.shape))
    if not isinstance(x.shape[axis], int):
        raise _refuse(ctx, f"unbind along the dynamic dim {x.shape[axis]!r}")
    picks = [ctx.new_param(f"{ctx.fx_node.name}_index", np.asarray(i, dtype=np.int64)) for i in range(x.shape[axis])]
    return tuple(ctx.emit(Op.GATHER, [x, i], {"axis": axis}) for i in picks)


@register(aten.index.Tensor)
def _index(ctx, x, indices):
    """One index tensor -> ``Gather``; several on consecutive axes -> ``Index`` (their shapes broadcast)."""
    used = [(i, t) for i, t in enumerate(indices) if t is not None]
    if any(t.dtype == "bool" for _, t in used):
        raise _refuse(ctx, "indexing with a bool mask")
    if not used or [i for i, _ in used] != list(range(used[0][0], used[0][0] + len(used))):
        raise _refuse(ctx, "advanced indexing of axes that are not consecutive")
    if len(used) == 1:
        return ctx.emit(Op.GATHER, [x, used[0][1]], {"axis": used[0][0]})
    return ctx.emit(Op.INDEX, [x, *(t for _, t in used)], {"axis": used[0][0]})


# --------------------------------------------------------------------------- attention, normalisation
def _repeat_heads(ctx: CaptureContext, t: ComputationNode, heads: Dim) -> ComputationNode:
    """``t [.., Hk, S, E]`` with each head repeated to ``heads`` (torch's ``enable_gqa``)."""
    shape = t.shape
    hk = shape[-3]
    if not isinstance(hk, int) or not isinstance(heads, int) or heads % hk:
        raise _refuse(ctx, f"grouped-query attention of {heads} query heads over {hk} key/value heads")
    if heads == hk:
        return t
    rank = len(shape)
    wide = ctx.emit(Op.UNSQUEEZE, [t], {"axes": (rank - 2,)})
    wide = ctx.emit(Op.EXPAND, [wide], {"shape": (*shape[:-2], heads // hk, *shape[-2:])})
    return ctx.emit(Op.RESHAPE, [wide], {"shape": (*shape[:-3], heads, *shape[-2:])})


def _sdpa_node(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa=False):
    if dropout_p:
        raise _refuse(ctx, f"attention dropout {dropout_p} (export the model in eval mode with dropout 0)")
    if enable_gqa:
        k, v = _repeat_heads(ctx, k, q.shape[-3]), _repeat_heads(ctx, v, q.shape[-3])
    inputs = [q, k, v]
    if mask is not None:
        inputs.append(mask if mask.dtype == "bool" else as_dtype(ctx, mask, q.dtype))
    return ctx.emit(Op.SDPA, inputs, {"is_causal": int(bool(is_causal)), "scale": float(scale or 0.0)})


@register(aten.scaled_dot_product_attention.default)
def _sdpa(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    return _sdpa_node(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@register(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_flash_cpu(ctx, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    return (_sdpa_node(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale), None)  # (output, logsumexp)


@register(aten._scaled_dot_product_efficient_attention.default)
def _sdpa_efficient(ctx, q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    return (_sdpa_node(ctx, q, k, v, attn_bias, dropout_p, is_causal, scale), None, None, None)


@register(aten.rms_norm.default)
def _rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(getattr(torch, x.dtype)).eps
    ins = [x] if weight is None else [x, weight]
    return ctx.emit(Op.RMS_NORM, ins, {"axis": -len(normalized_shape), "epsilon": float(eps)})


# --------------------------------------------------------------------------- elementwise math
def _float_unary(op: Op):
    def conv(ctx, x):
        return ctx.emit(op, [_cast_to_out(ctx, x)])

    return conv


for _target, _op in [
    (aten.exp.default, Op.EXP), (aten.log.default, Op.LOG), (aten.sqrt.default, Op.SQRT), (aten.rsqrt.default, Op.RSQRT),
    (aten.reciprocal.default, Op.RECIPROCAL), (aten.cos.default, Op.COS), (aten.sin.default, Op.SIN),
    (aten.abs.default, Op.ABS),
]:
    register(_target)(_float_unary(_op))


@register(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow(ctx, base, exponent):
    dtype = out_dtype(ctx)
    return ctx.emit(Op.POW, [as_dtype(ctx, base, dtype), as_dtype(ctx, exponent, dtype)])


@register(aten.addmm.default)
def _addmm(ctx, bias, a, b, *, beta=1, alpha=1):
    """``beta * bias + alpha * (a @ b)`` (GPT-2's ``Conv1D``)."""
    y = ctx.emit(Op.MATMUL, [a, b])
    if alpha != 1:
        y = ctx.emit(Op.MUL, [y, as_dtype(ctx, alpha, y.dtype)])
    if beta == 0:
        return y
    if beta != 1:
        bias = ctx.emit(Op.MUL, [bias, as_dtype(ctx, beta, bias.dtype)])
    return ctx.emit(Op.ADD, [y, bias])


# --------------------------------------------------------------------------- reductions
def _reduce_axes(x: ComputationNode, dim: Any) -> tuple[int, ...]:
    if dim is None:
        return ()
    dims = [dim] if isinstance(dim, int) else list(dim)
    return tuple(sorted(d % len(x.shape) for d in dims)) if x.shape else ()


@register(aten.mean.dim, aten.sum.dim_IntList)
def _reduce_dim(ctx, x, dim=None, keepdim=False, *, dtype=None):
    op = Op.REDUCE_MEAN if ctx.fx_node.target is aten.mean.dim else Op.REDUCE_SUM
    axes = _reduce_axes(x, dim)
    if not x.shape:
        return _cast_to_out(ctx, x)
    return ctx.emit(op, [_cast_to_out(ctx, x)], {"axes": axes, "keepdims": int(bool(keepdim))})


@register(aten.mean.default, aten.sum.default)
def _reduce_all(ctx, x, *, dtype=None):
    op = Op.REDUCE_MEAN if ctx.fx_node.target is aten.mean.default else Op.REDUCE_SUM
    if not x.shape:
        return _cast_to_out(ctx, x)
    return ctx.emit(op, [_cast_to_out(ctx, x)], {"axes": (), "keepdims": 0})


@register(aten.cumsum.default)
def _cumsum(ctx, x, dim, *, dtype=None):
    return ctx.emit(Op.CUMSUM, [_cast_to_out(ctx, x)], {"axis": int(dim)})


# --------------------------------------------------------------------------- comparisons, logic, where
def _compare(op: Op, negate: bool = False):
    def conv(ctx, a, b):
        dtype = compute_dtype(ctx, *ctx.fx_node.args[:2])
        y = ctx.emit(op, [as_dtype(ctx, a, dtype), as_dtype(ctx, b, dtype)])
        return ctx.emit(Op.NOT, [y]) if negate else y

    return conv


for _targets, _op, _neg in [
    ((aten.eq.Tensor, aten.eq.Scalar), Op.EQUAL, False),
    ((aten.ne.Tensor, aten.ne.Scalar), Op.EQUAL, True),
    ((aten.lt.Tensor, aten.lt.Scalar), Op.LESS, False),
    ((aten.le.Tensor, aten.le.Scalar), Op.LESS_OR_EQUAL, False),
    ((aten.gt.Tensor, aten.gt.Scalar), Op.GREATER, False),
    ((aten.ge.Tensor, aten.ge.Scalar), Op.GREATER_OR_EQUAL, False),
]:
    register(*_targets)(_compare(_op, _neg))


def _bool_only(ctx: CaptureContext, *xs: Any) -> list[ComputationNode]:
    for x in xs:
        if not isinstance(x, ComputationNode) or x.dtype != "bool":
            got = x.dtype if isinstance(x, ComputationNode) else type(x).__name__
            raise _refuse(ctx, f"bitwise/logical op on {got} (only bool tensors are supported)")
    return list(xs)


@register(aten.logical_not.default, aten.bitwise_not.default)
def _not(ctx, x):
    return ctx.emit(Op.NOT, _bool_only(ctx, x))


@register(aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor)
def _and(ctx, a, b):
    return ctx.emit(Op.AND, _bool_only(ctx, a, b))


@register(aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor)
def _or(ctx, a, b):
    return ctx.emit(Op.OR, _bool_only(ctx, a, b))


@register(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(ctx, cond, a, b):
    dtype = out_dtype(ctx)
    return ctx.emit(Op.WHERE, [as_dtype(ctx, cond, "bool"), as_dtype(ctx, a, dtype), as_dtype(ctx, b, dtype)])


@register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, x, mask, value):
    return ctx.emit(Op.WHERE, [as_dtype(ctx, mask, "bool"), as_dtype(ctx, value, x.dtype), x])


# --------------------------------------------------------------------------- movement
@register(aten.slice.Tensor)
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    start = 0 if start is None else dim_of(ctx, start)
    end = 2**63 - 1 if end is None else dim_of(ctx, end)
    axis = _axis(int(dim), len(x.shape))
    if isinstance(x.shape[axis], int) and isinstance(end, int) and end > x.shape[axis]:
        end = x.shape[axis]  # x[..., 8:] of a static dim of 16: end 16, not 2**63 - 1
    whole = (isinstance(end, int) and end >= 2**62) or end == canonical_dim(x.shape[axis])
    if start == 0 and step == 1 and whole:
        return x
    return ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (start,), "ends": (end,), "steps": (int(step),)})


@register(aten.unsqueeze.default)
def _unsqueeze(ctx, x, dim):
    return ctx.emit(Op.UNSQUEEZE, [x], {"axes": (int(dim) % (len(x.shape) + 1),)})


def _squeeze_axes(ctx: CaptureContext, x: ComputationNode, axes: Sequence[int] | None) -> ComputationNode:
    rank = len(x.shape)
    chosen = range(rank) if axes is None else [a % rank for a in axes] if rank else []
    keep = tuple(sorted({a for a in chosen if x.shape[a] == 1}))  # torch leaves a dim that is not 1 alone
    return ctx.emit(Op.SQUEEZE, [x], {"axes": keep}) if keep else x


@register(aten.squeeze.dim)
def _squeeze_dim(ctx, x, dim):
    return _squeeze_axes(ctx, x, [int(dim)])


@register(aten.squeeze.dims)
def _squeeze_dims(ctx, x, dims):
    return _squeeze_axes(ctx, x, [int(d) for d in dims])


@register(aten.squeeze.default)
def _squeeze_all(ctx, x):
    return _squeeze_axes(ctx, x, None)


def _expand_to(ctx: CaptureContext, x: ComputationNode, size: Sequence[Any]) -> ComputationNode:
    lead = len(size) - len(x.shape)
    target: list[Dim] = []
    for i, s in enumerate(size):
        if not isinstance(s, SymDim) and s == -1:
            target.append(x.shape[i - lead])
        else:
            target.append(dim_of(ctx, s))
    if tuple(canonical_dim(d) for d in target) == x.shape:
        return x
    return ctx.emit(Op.EXPAND, [x], {"shape": tuple(target)})


@register(aten.expand.default)
def _expand(ctx, x, size, *, implicit=False):
    return _expand_to(ctx, x, size)


@register(aten.expand_as.default)
def _expand_as(ctx, x, other):
    return _expand_to(ctx, x, other.shape)


@register(aten.diff.default)
def _diff(ctx, x, n=1, dim=-1, prepend=None, append=None):
    """``x[j] - x[j - 1]`` along ``dim``; with a one-element ``prepend`` the length stays, so a dynamic dim works:
    ``x - Where(j == 0, prepend, Gather(x, j - 1))``."""
    rank = len(x.shape)
    axis = _axis(int(dim), rank)
    size = x.shape[axis]
    if n != 1 or append is not None:
        raise _refuse(ctx, "diff with n != 1 or append")
    if prepend is None:
        if not isinstance(size, int):
            raise _refuse(ctx, f"diff along the dynamic dim {size!r} without prepend (its length is {size} - 1)")
        hi = ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (1,), "ends": (size,)})
        lo = ctx.emit(Op.SLICE, [x], {"axes": (axis,), "starts": (0,), "ends": (max(size - 1, 0),)})
        return ctx.emit(Op.SUB, [hi, lo])
    if prepend.shape[axis] != 1:
        raise _refuse(ctx, "diff with a prepend longer than one element")
    prev = ctx.emit(Op.SUB, [ctx.emit(Op.ARANGE, [], {"end": size}), as_dtype(ctx, 1, "int64")])
    shifted = ctx.emit(Op.GATHER, [x, prev], {"axis": axis})  # x[j - 1]; j = 0 wraps and is replaced below
    first = ctx.emit(Op.LESS, [prev, as_dtype(ctx, 0, "int64")])
    if rank - axis > 1:
        first = ctx.emit(Op.UNSQUEEZE, [first], {"axes": tuple(range(1, rank - axis))})
    shifted = ctx.emit(Op.WHERE, [first, as_dtype(ctx, prepend, x.dtype), shifted])
    return ctx.emit(Op.SUB, [x, shifted])


# --------------------------------------------------------------------------- sources
@register(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(ctx, *bounds, **kwargs):
    dtype = out_dtype(ctx)
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
    if any(isinstance(b, float) for b in (start, end, step)):
        if any(isinstance(b, SymDim) for b in (start, end, step)):
            raise _refuse(ctx, "arange with float and dynamic bounds")
        return ctx.new_param(ctx.fx_node.name, np.arange(start, end, step, dtype=np.float64).astype(dtype))
    start, end, step = (dim_of(ctx, b) for b in (start, end, step))
    if all(isinstance(b, int) for b in (start, end, step)):
        return ctx.new_param(ctx.fx_node.name, np.arange(start, end, step, dtype=dtype))
    if dtype not in ("int32", "int64", "float32", "float64"):
        raise _refuse(ctx, f"arange of dtype {dtype}")
    return ctx.emit(Op.ARANGE, [], {"start": start, "end": end, "step": step, "dtype": dtype})


def _filled(ctx: CaptureContext, size: Sequence[Any], value: Any) -> ComputationNode:
    """``size`` filled with ``value`` in the node's dtype: a constant, or ``Expand`` of a scalar to named sizes."""
    dtype = out_dtype(ctx)
    dims = [dim_of(ctx, s) for s in size]
    if isinstance(value, SymDim):
        raise _refuse(ctx, "a tensor filled with a dynamic size")
    if all(isinstance(d, int) for d in dims):
        return ctx.new_param(ctx.fx_node.name, np.full([int(d) for d in dims], value, dtype=dtype))
    scalar = ctx.new_param(f"{ctx.fx_node.name}_value", np.asarray(value, dtype=dtype))
    return ctx.emit(Op.EXPAND, [scalar], {"shape": tuple(dims)})


@register(aten.full.default)
def _full(ctx, size, fill_value, **kwargs):
    return _filled(ctx, size, fill_value)


@register(aten.ones.default, aten.zeros.default)
def _ones_zeros(ctx, size, **kwargs):
    return _filled(ctx, size, 1 if ctx.fx_node.target is aten.ones.default else 0)


@register(aten.new_ones.default, aten.new_zeros.default)
def _new_ones_zeros(ctx, x, size, **kwargs):
    return _filled(ctx, size, 1 if ctx.fx_node.target is aten.new_ones.default else 0)


@register(aten.new_full.default)
def _new_full(ctx, x, size, fill_value, **kwargs):
    return _filled(ctx, size, fill_value)


@register(aten.full_like.default)
def _full_like(ctx, x, fill_value, **kwargs):
    return _filled(ctx, x.shape, fill_value)


@register(aten.ones_like.default, aten.zeros_like.default)
def _ones_zeros_like(ctx, x, **kwargs):
    value = 1 if ctx.fx_node.target is aten.ones_like.default else 0
    return _filled(ctx, x.shape, value)


@register(aten.triu.default, aten.tril.default)
def _triangle(ctx, x, diagonal=0):
    """Keep ``col - row >= diagonal`` (triu) or ``<= diagonal`` (tril) of the last two dims, zero elsewhere."""
    if len(x.shape) < 2:
        raise GraphError(f"{ctx.where()}: triu/tril of a tensor of rank {len(x.shape)}")
    upper = ctx.fx_node.target is aten.triu.default
    rows, cols = x.shape[-2:]
    k = int(dim_of(ctx, diagonal))
    if isinstance(rows, int) and isinstance(cols, int):
        ones = np.ones((rows, cols), dtype=bool)
        keep = ctx.new_param(f"{ctx.fx_node.name}_keep", np.triu(ones, k) if upper else np.tril(ones, k))
    else:
        r = ctx.emit(Op.UNSQUEEZE, [ctx.emit(Op.ARANGE, [], {"end": rows})], {"axes": (1,)})
        c = ctx.emit(Op.ARANGE, [], {"end": cols})
        shifted = ctx.emit(Op.ADD, [r, as_dtype(ctx, k, "int64")]) if k else r
        keep = ctx.emit(Op.GREATER_OR_EQUAL if upper else Op.LESS_OR_EQUAL, [c, shifted])
    return ctx.emit(Op.WHERE, [keep, x, as_dtype(ctx, 0, x.dtype)])


@register(aten.scalar_tensor.default)
def _scalar_tensor(ctx, value, **kwargs):
    if isinstance(value, SymDim):
        raise _refuse(ctx, "a tensor holding a dynamic size")
    return ctx.new_param(ctx.fx_node.name, np.asarray(value, dtype=out_dtype(ctx)))

