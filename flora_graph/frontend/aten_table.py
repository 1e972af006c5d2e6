"""The ATen -> IR table: one small converter per ATen overload.

A converter gets the capture context and the fx node's arguments with fx nodes already
replaced by IR values (a :class:`ComputationNode`, a tuple of them, a :class:`SymDim`, or
a plain Python value) and returns the IR value of the node. Alias ops (``clone``,
``detach``, eval-mode ``dropout``) return their input unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from flora_graph.errors import GraphError, ShapeError, UnsupportedOpError
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import Dim, canonical_dim

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__ = ["ATEN_TABLE", "SymDim", "aten_name", "operand", "out_dtype"]

aten = torch.ops.aten


@dataclass(frozen=True)
class SymDim:
    """A symbolic size read off a tensor (``aten.sym_size``), as an IR dim."""

    dim: Dim


Converter = Callable[..., Any]
ATEN_TABLE: dict[Any, Converter] = {}


def aten_name(target: Any) -> str:
    """Printable name of an fx call target (``aten.linear.default``)."""
    return str(target) if not callable(target) or hasattr(target, "_schema") else getattr(target, "__name__", str(target))


def register(*targets: Any) -> Callable[[Converter], Converter]:
    """Register a converter for one or more ATen overloads."""

    def deco(fn: Converter) -> Converter:
        for t in targets:
            ATEN_TABLE[t] = fn
        return fn

    return deco


def _alias(ctx: CaptureContext, x: ComputationNode, *_: Any, **__: Any) -> ComputationNode:
    return x


register(aten.clone.default, aten.detach.default, aten.alias.default, aten.contiguous.default)(_alias)


@register(aten.dropout.default)
def _dropout(ctx: CaptureContext, x: ComputationNode, p: float = 0.5, train: bool = False) -> ComputationNode:
    if train and p > 0:
        raise UnsupportedOpError("dropout in training mode cannot be captured; call model.eval()", {"aten.dropout.default(train=True)": [ctx.where()]})
    return x


@register(aten.linear.default)
def _linear(ctx, x, w, b=None):
    return ctx.emit(Op.LINEAR, [x, w] + ([b] if b is not None else []))


@register(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ctx, a, b):
    return ctx.emit(Op.MATMUL, [a, b])


@register(aten.t.default)
def _t(ctx, x):
    return x if len(x.shape) < 2 else ctx.emit(Op.TRANSPOSE, [x], {"perm": (1, 0)})


@register(aten.transpose.int)
def _transpose(ctx, x, d0, d1):
    perm = list(range(len(x.shape)))
    d0, d1 = d0 % len(perm), d1 % len(perm)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(perm)})


@register(aten.permute.default)
def _permute(ctx, x, dims):
    return ctx.emit(Op.TRANSPOSE, [x], {"perm": tuple(d % len(x.shape) for d in dims)})


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
        raise UnsupportedOpError(f"{ctx.where()}: a dynamic size ({v.dim}) used as a tensor value",
                                 {f"{aten_name(ctx.fx_node.target)} (a size as a value)": [ctx.where()]})
    return ctx.scalar(v, dtype)


def _binary(op: Op) -> Converter:
    def conv(ctx, a, b, *, alpha=1):
        dtype = out_dtype(ctx)  # torch's type promotion: int + float -> float, int / int -> float
        a, b = operand(ctx, a, dtype), operand(ctx, b, dtype)
        if alpha != 1:
            b = ctx.emit(Op.MUL, [b, ctx.scalar(alpha, b.dtype)])
        return ctx.emit(op, [a, b])

    return conv


register(aten.add.Tensor, aten.add.Scalar)(_binary(Op.ADD))
register(aten.sub.Tensor, aten.sub.Scalar)(_binary(Op.SUB))
register(aten.mul.Tensor, aten.mul.Scalar)(_binary(Op.MUL))


@register(aten.div.Tensor, aten.div.Scalar)
def _div(ctx, a, b):
    dtype = out_dtype(ctx)
    return ctx.emit(Op.DIV, [operand(ctx, a, dtype), operand(ctx, b, dtype)])


@register(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx, a, b, alpha=1):
    return _binary(Op.SUB)(ctx, b, a, alpha=alpha)  # rsub(a, b, alpha) = b - alpha * a


def _unary(op: Op) -> Converter:
    return lambda ctx, x: ctx.emit(op, [x])


for _t_op, _ir_op in [
    (aten.neg.default, Op.NEG),
    (aten.relu.default, Op.RELU),
    (aten.silu.default, Op.SILU),
    (aten.sigmoid.default, Op.SIGMOID),
    (aten.tanh.default, Op.TANH),
]:
    register(_t_op)(_unary(_ir_op))


@register(aten.gelu.default)
def _gelu(ctx, x, approximate="none"):
    return ctx.emit(Op.GELU, [x], {"approximate": approximate})


@register(aten.softmax.int, aten._softmax.default)
def _softmax(ctx, x, dim, dtype_or_half=None):
    if isinstance(dtype_or_half, torch.dtype) or dtype_or_half is True:
        raise UnsupportedOpError("softmax with a dtype change is not supported", {"softmax(dtype=...)": [ctx.where()]})
    return ctx.emit(Op.SOFTMAX, [x], {"axis": int(dim)})


@register(aten.layer_norm.default)
def _layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if weight is None and bias is not None:
        weight = ctx.tensor(1.0, like=bias, shape=bias.shape)
    ins = [x] + [t for t in (weight, bias) if t is not None]
    return ctx.emit(Op.LAYER_NORM, ins, {"axis": -len(normalized_shape), "epsilon": float(eps)})


def _reshape_target(ctx: CaptureContext, x: ComputationNode, shape: Sequence[Any]) -> tuple[Dim, ...]:
    """Torch's target sizes as IR Reshape sizes: a dim equal to the input's at that position -> 0 (ONNX's
    copy), another named dim -> its name, a size that is no product of dims (``seq - 1``) -> -1 (one at most)."""
    out: list[Dim] = []
    for i, s in enumerate(shape):
        dim = s.dim if isinstance(s, SymDim) else s
        if isinstance(dim, int):
            out.append(dim)
            continue
        try:
            dim = canonical_dim(dim)
        except ShapeError:
            out.append(-1)
            continue
        out.append(0 if i < len(x.shape) and dim == canonical_dim(x.shape[i]) else dim)
    if out.count(-1) > 1:
        raise GraphError(f"{ctx.where()}: reshape of {x.name} to {list(shape)} has more than one size that cannot be expressed")
    return tuple(out)


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(ctx, x, shape):
    return ctx.emit(Op.RESHAPE, [x], {"shape": _reshape_target(ctx, x, shape)})


@register(aten.flatten.using_ints)
def _flatten(ctx, x, start=0, end=-1):
    rank = len(x.shape)
    if rank == 0:
        return ctx.emit(Op.RESHAPE, [x], {"shape": (1,)})
    start, end = start % rank, end % rank
    if start == 1 and end == rank - 1:
        return ctx.emit(Op.FLATTEN, [x], {"axis": 1})
    tail = list(x.shape[end + 1 :])
    if not all(isinstance(d, int) for d in tail):
        raise GraphError(f"{ctx.where()}: flatten({start}, {end}) of {x.name} keeps named dims after the range")
    return ctx.emit(Op.RESHAPE, [x], {"shape": (0,) * start + (-1,) + tuple(tail)})


@register(aten.cat.default)
def _cat(ctx, tensors, dim=0):
    kept = [t for t in tensors if tuple(t.shape) != (0,)] or list(tensors)[:1]  # torch skips 1-D empty tensors
    return kept[0] if len(kept) == 1 else ctx.emit(Op.CONCAT, kept, {"axis": int(dim)})


@register(aten.split_with_sizes.default)
def _split_with_sizes(ctx, x, sizes, dim=0):
    sizes = tuple(int(s) for s in sizes)
    return tuple(ctx.emit(Op.SPLIT, [x], {"axis": int(dim), "sizes": sizes, "index": i}) for i in range(len(sizes)))


@register(aten.split.Tensor)
def _split(ctx, x, split_size, dim=0):
    total = x.shape[dim]
    if not isinstance(total, int):
        raise GraphError(f"{ctx.where()}: split of {x.name} along named dim {total!r}")
    sizes = [split_size] * (total // split_size) + ([total % split_size] if total % split_size else [])
    return _split_with_sizes(ctx, x, sizes, dim)


@register(aten.chunk.default)
def _chunk(ctx, x, chunks, dim=0):
    total = x.shape[dim]
    if not isinstance(total, int):
        raise GraphError(f"{ctx.where()}: chunk of {x.name} along named dim {total!r}")
    return _split(ctx, x, max(1, -(-total // chunks)), dim)  # torch: pieces of ceil(total / chunks)


@register(operator.getitem)
def _getitem(ctx, seq, index):
    if not isinstance(seq, tuple):
        raise GraphError(f"{ctx.where()}: getitem on a non-tuple value")
    return seq[index]


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (int(v[0]), int(v[-1]))


@register(aten.conv2d.default, aten.conv2d.padding)
def _conv2d(ctx, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same" with stride 1
            total = [d * (k - 1) for d, k in zip(_pair(dilation), w.shape[2:], strict=True)]
            if any(t % 2 for t in total):
                raise UnsupportedOpError("asymmetric 'same' padding", {"aten.conv2d.padding": [ctx.where()]})
            padding = [t // 2 for t in total]
    attrs = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation), "groups": int(groups)}
    return ctx.emit(Op.CONV2D, [x, w] + ([b] if b is not None else []), attrs)


@register(aten.convolution.default)
def _convolution(ctx, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed or len(w.shape) != 4:
        raise UnsupportedOpError("only 2-D, non-transposed convolutions are supported", {"aten.convolution.default": [ctx.where()]})
    return _conv2d(ctx, x, w, b, stride, padding, dilation, groups)


# Shape reads and runtime assertions: they produce no tensor.
NO_TENSOR_OPS = {
    aten.sym_size.int,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_tensor_metadata.default,
}


# The transformer op family (attention, embedding, slicing, casts, comparisons, ...) and the
# capture-time LoRA Linear op live in their own modules and register their converters here when imported.
import flora_graph.frontend.aten_transformer  # noqa: E402
import flora_graph.frontend.lora_op  # noqa: E402, F401
