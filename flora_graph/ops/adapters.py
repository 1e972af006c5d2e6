"""Adapter slots: ``LoRASlot`` (one adapter per run) and ``LoRAMixedSlot`` (one adapter per row).

A slot is a LoRA site whose adapter weights are graph inputs, so the adapter is chosen when
the graph runs, not when it is built (:mod:`flora_graph.passes.adapter_slots` makes slots
from the LoRA sites of a captured graph). Both ops read the base layer's output ``base`` and
the site's input ``x`` and compute ``base + up(down(x, A), B)``, the scale folded into
``B`` (PEFT's layout). Attributes: ``module`` (the adapted module, for messages and
names), ``kind`` (``"linear"``, ``"conv"``, ``"embedding"`` or ``"experts"``) and, for a conv site, the down projection's
``kernel``/``stride``/``padding``/``dilation`` (the up projection is a 1x1 convolution). An embedding
site's ``x`` is the token ids (int64) and its down projection takes their columns of ``A``
(``[rank, vocab]``, PEFT's ``lora_embedding_A``): the product of their one-hot rows with ``A.T``.

* ``LoRASlot(base, x, A, B)``: ``A`` is ``[rank, in]`` (linear) or ``[rank, C, kh, kw]``
  (conv), ``B`` is ``[out, rank]`` or ``[out, rank, 1, 1]``. Rank 0 adds exact zeros.
* ``kind="experts"`` (LoRA on a mixture of experts' expert tensor): a fifth input ``ids`` (int ``[pairs]``), ``x``
  ``[pairs, in]`` the (token, expert) pairs, ``A`` ``[experts, rank, in]``, ``B`` ``[experts, out, rank]``; pair ``s``
  adds ``x[s] @ A[ids[s]].T @ B[ids[s]].T``. Mixed: a sixth input ``ids`` after ``adapter_index``, stacks
  ``[slots, experts, R, in]`` / ``[slots, experts, out, R]``, the pairs batch-major (``pairs / batch`` a row), pair
  ``s`` reading the stacks seen as ``[slots*experts, ...]`` at ``adapter_index[row] * experts + ids[s]``. ONNX: a
  ``Loop`` over the experts present (:func:`~flora_graph.ops.linear.emit_expert_loop`), no weight copied per pair.
* ``dora=1`` (a linear slot of one module, DoRA's weight-decomposed adapter): a last input ``d`` ``[out]`` (mixed: a
  stack ``[slots, out]``, each row's own), the slot giving ``(1 + d) * (base + delta)``; ``base`` is the layer's
  product without its bias (``adapter-slots`` adds the bias after the slot), and ``d = m / ||W + s B A|| - 1`` per output
  row, zeros for a plain LoRA adapter.
* ``lora_bias=1`` (a linear slot of one module): a last input ``c`` ``[out]`` (mixed: a stack ``[slots, out]``, each
  row's own; after a DoRA slot's ``d``), added to the delta: ``base + (delta + c)``, a DoRA slot's
  ``(1 + d) * (base + delta) + c``. It carries what an adapter adds to the layer's bias (PEFT's ``lora_bias``, a bias
  it trained, a module trained whole with its bias); zeros for an adapter that adds none.
* ``LoRAMixedSlot(base, x, A_stack, B_stack, adapter_index)``: per row ``i`` of the batch,
  the adapter ``adapter_index[i]`` of the stacks (``-1``: the last slot, by convention all
  zeros). Linear: ``A_stack`` ``[slots, in, R]`` (``A.T`` per adapter), ``B_stack``
  ``[slots, R, out]``; an embedding the same with ``in`` the vocabulary, each row's ids picking
  rows of its own adapter's ``A.T`` (one ``Gather`` from the stack seen as ``[slots*vocab, R]``:
  no row copies a whole table). Conv: ``A_stack`` ``[slots, R, kh*kw*C]`` (patch order ``(i, j, c)``,
  taps major), ``B_stack`` ``[slots, out, R]``; ``x``'s first dim is the batch.

The ONNX rules emit what :mod:`flora_graph.serving` exports: ``Gemm``/``MatMul`` (``Conv``
for a swappable conv site) for the swappable slot; ``Gather`` of each row's weights and two
batched ``MatMul`` for the mixed one, conv inputs as patches (``Pad`` + one strided
``Slice`` per kernel tap). The torch rules use ``F.linear``/``torch.matmul`` and
``F.unfold``, so rank 0 works. No pass folds or merges a slot: its weights are inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import FLOAT_DTYPES, AttrSpec
from flora_graph.ir.shapes import Dim, canonical_dim, format_shape
from flora_graph.ops._infer import same_dtype
from flora_graph.ops._onnx import ONNX_DTYPES
from flora_graph.ops._torch import ints
from flora_graph.ops.linear import emit_expert_loop
from flora_graph.ops.registry import define

__all__: list[str] = []

_ATTRS = {
    "module": AttrSpec("str", required=True),
    "kind": AttrSpec("str", "linear", choices=("linear", "conv", "embedding", "experts")),
    "kernel": AttrSpec("ints", (1, 1)),
    "stride": AttrSpec("ints", (1, 1)),
    "padding": AttrSpec("ints", (0, 0)),
    "dilation": AttrSpec("ints", (1, 1)),
    "members": AttrSpec("str", ""),  # a packed slot (pack-slots): the members' modules, comma-joined
    "member_outs": AttrSpec("ints", ()),  # and their output sizes, in order
    "dora": AttrSpec("int", 0),  # a linear slot that also takes DoRA's magnitude: d [out] (a stack [slots, out])
    "lora_bias": AttrSpec("int", 0),  # a linear slot that also takes a bias: c [out] (a stack [slots, out]), last
}


# --------------------------------------------------------------------------- shapes
def _fail(what: str, msg: str, shapes) -> ShapeError:
    return ShapeError(f"{what}: {msg} (inputs {', '.join(format_shape(s) for s in shapes)})")


def _float(dtypes, what: str) -> str:
    dtype = same_dtype(dtypes, what)
    if dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{what}: dtype {dtype} is not a float")
    return dtype


def _spatial(x: Dim, k: int, s: int, p: int, d: int, what: str) -> Dim:
    """A conv output size; a named size only through a pointwise, unstrided, unpadded kernel."""
    if not isinstance(x, int):
        if (k, s, p) == (1, 1, 0):
            return x
        raise ShapeError(f"{what}: spatial dims must be static unless the kernel is 1x1, stride 1, no padding")
    return (x + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_base(x, out: Dim, attrs, what: str) -> tuple[Dim, ...]:
    for key in ("kernel", "stride", "padding", "dilation"):
        if len(attrs[key]) != 2:
            raise ShapeError(f"{what}: {key} must have 2 values, got {attrs[key]}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = attrs["kernel"], attrs["stride"], attrs["padding"], attrs["dilation"]
    return (x[0], out, _spatial(x[2], kh, sh, ph, dh, what), _spatial(x[3], kw, sw, pw, dw, what))


def _experts_ids(shapes, dtypes, what: str, at: int) -> None:
    if len(shapes) != at + 1 or dtypes[at] not in ("int64", "int32") or len(shapes[at]) != 1:
        raise _fail(what, f"an experts slot takes the pairs' expert ids (int [pairs]) as input {at}", shapes)


_EXTRA_WHAT = {"dora": "DoRA magnitude", "lora_bias": "bias"}
_STACK_WHAT = {"dora": "DoRA magnitudes' stack", "lora_bias": "biases' stack"}


def _extras(shapes, attrs, what: str) -> tuple[str, ...]:
    """The vectors a linear slot of one module takes after its other inputs, in order: ``"dora"`` (DoRA's magnitude
    ``d``) and ``"lora_bias"`` (a bias ``c``), each ``[out]`` (a stack ``[slots, out]``)."""
    extras = tuple(k for k in ("dora", "lora_bias") if attrs.get(k))
    if extras and (attrs["kind"] != "linear" or attrs.get("members")):
        raise _fail(what, f"only a linear slot of one module takes a {' or a '.join(_EXTRA_WHAT[k] for k in extras)}",
                    shapes)
    return extras


def _extra_names(extras: tuple[str, ...], stacks: bool = False) -> str:
    """`` and the DoRA magnitude and the bias`` (``stacks``: ``... magnitudes' stack ... biases' stack``)."""
    return "".join(f" and the {(_STACK_WHAT if stacks else _EXTRA_WHAT)[k]}" for k in extras)


def _infer_slot(shapes, dtypes, attrs):
    base, x, a, b = shapes[:4]
    what = f"LoRASlot of module {attrs['module']!r}"
    embedding = attrs["kind"] == "embedding"
    if attrs["kind"] == "experts":
        _experts_ids(shapes, dtypes, what, 4)
        dtype = _float(dtypes[:4], what)
        if len(x) != 2 or len(a) != 3 or len(b) != 3 or a[0] != b[0] or a[2] != x[1] or b[2] != a[1] \
                or canonical_dim(shapes[4][0]) != canonical_dim(x[0]):
            raise _fail(what, "want x [pairs, in], A [experts, rank, in], B [experts, out, rank], ids [pairs]", shapes)
        want = (x[0], b[1])
        if tuple(base) != tuple(want):
            raise _fail(what, f"base {format_shape(base)} is not the layer's output {format_shape(want)}", shapes)
        return tuple(base), dtype
    extras = _extras(shapes, attrs, what)
    if len(shapes) != 4 + len(extras):
        raise _fail(what, "takes base, x, A and B" + _extra_names(extras), shapes)
    dtype = _float(dtypes[:1] + dtypes[2:] if embedding else dtypes, what)
    for k, extra in enumerate(extras):
        if tuple(shapes[4 + k]) != (b[0],):
            raise _fail(what, f"its {_EXTRA_WHAT[extra]} must be [out] = [{b[0]}]", shapes)
    if attrs["kind"] == "linear":
        if len(x) < 1 or len(a) != 2 or len(b) != 2 or x[-1] != a[1] or b[1] != a[0]:
            raise _fail(what, "want x [..., in], A [rank, in], B [out, rank]", shapes)
        want = (*x[:-1], b[0])
    elif embedding:
        if dtypes[1] not in ("int64", "int32") or len(a) != 2 or len(b) != 2 or b[1] != a[0]:
            raise _fail(what, "want integer ids x [...], A [rank, vocab], B [out, rank]", shapes)
        want = (*x, b[0])
    else:
        if len(x) != 4 or len(a) != 4 or len(b) != 4 or a[1] != x[1] or b[1] != a[0] or tuple(b[2:]) != (1, 1):
            raise _fail(what, "want x [N, C, H, W], A [rank, C, kh, kw], B [out, rank, 1, 1]", shapes)
        if tuple(a[2:]) != tuple(attrs["kernel"]):
            raise _fail(what, f"A's kernel {tuple(a[2:])} is not the kernel attribute {attrs['kernel']}", shapes)
        want = _conv_base(x, b[0], attrs, what)
    if tuple(base) != tuple(want):
        raise _fail(what, f"base {format_shape(base)} is not the layer's output {format_shape(want)}", shapes)
    return tuple(base), dtype


def _infer_mixed_experts(shapes, dtypes, what: str):
    _experts_ids(shapes, dtypes, what, 5)
    base, x, a, b, idx, _ = shapes
    dtype = _float(dtypes[:4], what)
    if dtypes[4] != "int64" or len(idx) != 1:
        raise ShapeError(f"{what}: adapter_index must be int64 [batch], got {dtypes[4]}{format_shape(idx)}")
    if len(x) != 2 or len(a) != 4 or len(b) != 4 or a[:2] != b[:2] or a[3] != x[1] or b[3] != a[2] \
            or canonical_dim(shapes[5][0]) != canonical_dim(x[0]):
        raise _fail(what, "want x [pairs, in], A stack [slots, experts, R, in], B stack [slots, experts, out, R], "
                    "ids [pairs]", shapes)
    if not isinstance(a[1], int):  # a pair's row of the stacks is slot * experts + expert
        raise _fail(what, "the stacks' number of experts must be static", shapes)
    want = (x[0], b[2])
    if tuple(base) != tuple(want):
        raise _fail(what, f"base {format_shape(base)} is not the layer's output {format_shape(want)}", shapes)
    return tuple(base), dtype


def _infer_mixed(shapes, dtypes, attrs):
    what = f"LoRAMixedSlot of module {attrs['module']!r}"
    if attrs["kind"] == "experts":
        return _infer_mixed_experts(shapes, dtypes, what)
    extras = _extras(shapes, attrs, what)
    if len(shapes) != 5 + len(extras):
        raise _fail(what, "takes base, x, the A and B stacks and adapter_index" + _extra_names(extras, stacks=True),
                    shapes)
    base, x, a, b, idx = shapes[:5]
    for k, extra in enumerate(extras):
        if len(shapes[5 + k]) != 2 or shapes[5 + k][0] != a[0] or shapes[5 + k][1] != b[2]:
            raise _fail(what, f"its {_STACK_WHAT[extra]} must be [slots, out]", shapes)
    embedding = attrs["kind"] == "embedding"
    dtype = _float(dtypes[:4] + dtypes[5:] if extras else dtypes[:1] + dtypes[2:4] if embedding else dtypes[:4], what)
    if dtypes[4] != "int64" or len(idx) != 1:
        raise ShapeError(f"{what}: adapter_index must be int64 [batch], got {dtypes[4]}{format_shape(idx)}")
    if len(a) != 3 or len(b) != 3 or a[0] != b[0]:
        raise _fail(what, "want A and B stacks of rank 3 with one number of slots", shapes)
    if len(x) < 2 or x[0] != idx[0]:
        raise _fail(what, "x's first dim must be the batch dim of adapter_index", shapes)
    if embedding:
        if dtypes[1] not in ("int64", "int32") or a[2] != b[1]:
            raise _fail(what, "want integer ids x [batch, ...], A stack [slots, vocab, R], B stack [slots, R, out]",
                        shapes)
        want = (*x, b[2])
    elif attrs["kind"] == "linear":
        if x[-1] != a[1] or a[2] != b[1]:
            raise _fail(what, "want x [batch, ..., in], A stack [slots, in, R], B stack [slots, R, out]", shapes)
        want = (*x[:-1], b[2])
    else:
        kh, kw = attrs["kernel"]
        if len(x) != 4 or not isinstance(x[1], int) or a[2] != kh * kw * x[1] or a[1] != b[2]:
            raise _fail(what, "want x [batch, C, H, W], A stack [slots, R, kh*kw*C], B stack [slots, out, R]", shapes)
        want = _conv_base(x, b[1], attrs, what)  # static spatial dims unless pointwise: the patches need them
    if tuple(base) != tuple(want):
        raise _fail(what, f"base {format_shape(base)} is not the layer's output {format_shape(want)}", shapes)
    return tuple(base), dtype


# --------------------------------------------------------------------------- numpy
def _patches(x: np.ndarray, kernel, stride, padding, dilation) -> np.ndarray:
    """im2col: ``[N, C*kh*kw, H'*W']``, channels major (the order of ``W.reshape(O, -1)``)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def _rows(x: np.ndarray) -> np.ndarray:
    """``x`` as ``[batch, rows, in]`` (no ``-1``: a batch of 0 rows reshapes too)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _numpy_experts(base: np.ndarray, x: np.ndarray, a: np.ndarray, b: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``base`` plus each pair's ``x[s] @ a[ids[s]].T @ b[ids[s]].T``, one product per expert present."""
    out = np.array(base, copy=True)
    for e in np.unique(ids):
        rows = np.flatnonzero(ids == e)
        out[rows] += (x[rows] @ a[e].T) @ b[e].T
    return out


def _pair_slots(index: np.ndarray, pairs: int) -> np.ndarray:
    """Each (token, expert) pair's adapter: its batch row's (pairs are batch-major, ``pairs / batch`` a row)."""
    return index[np.arange(pairs) // (pairs // len(index))]


def _numpy_slot(base, x, a, b, *extra, module, kind, kernel, stride, padding, dilation, members="", member_outs=(),
                dora=0, lora_bias=0) -> np.ndarray:
    if kind == "experts":  # extra: the pairs' ids
        return _numpy_experts(base, x, a, b, extra[0])
    if kind == "linear":
        s1 = base + (x @ a.T) @ b.T
        s1 = s1 + extra[0] * s1 if dora else s1  # DoRA (extra: d): (1 + d) * (base + delta), base without its bias
        return s1 + extra[-1] if lora_bias else s1  # the bias c, last
    if kind == "embedding":
        return base + a.T[x] @ b.T
    p = _patches(x, kernel, stride, padding, dilation)
    a2, b2 = a.reshape(a.shape[0], math.prod(a.shape[1:])), b.reshape(b.shape[0], b.shape[1])
    return base + (b2 @ (a2 @ p)).reshape(base.shape)


def _numpy_mixed(base, x, a, b, index, *extra, module, kind, kernel, stride, padding, dilation, members="",
                 member_outs=(), dora=0, lora_bias=0) -> np.ndarray:
    if kind == "experts":  # a pair's expert (extra: the ids) of its row's adapter, the stacks as [slots*experts, ...]
        experts = a.shape[1]
        comb = _pair_slots(index, x.shape[0]) * experts + extra[0]  # -1 (no adapter): the zero slot, from the end
        return _numpy_experts(base, x, a.reshape(a.shape[0] * experts, *a.shape[2:]),
                              b.reshape(b.shape[0] * experts, *b.shape[2:]), comb)
    ag, bg = a[index], b[index]  # -1 reads the last (zero) slot; out of range raises IndexError
    if kind == "embedding":  # row i's ids index its own adapter's [vocab, R]
        rows = np.take_along_axis(ag, x.reshape(x.shape[0], -1, 1), axis=1)  # [batch, ids, R]
        return base + (rows @ bg).reshape(base.shape)
    if kind == "linear":
        s1 = base + ((_rows(x) @ ag) @ bg).reshape(base.shape)
        lead = (len(index), *[1] * (base.ndim - 2), -1)  # each row's own vector, over its positions
        if dora:  # extra: the stack of d
            s1 = s1 + extra[0][index].reshape(lead) * s1
        return s1 + extra[-1][index].reshape(lead) if lora_bias else s1  # the stack of c, last
    p = _patches(x, kernel, stride, padding, dilation)
    n, c, taps, cols = x.shape[0], x.shape[1], kernel[0] * kernel[1], p.shape[2]
    p = p.reshape(n, c, taps, cols).transpose(0, 2, 1, 3).reshape(n, taps * c, cols)  # taps major: (i, j, c)
    return base + (bg @ (ag @ p)).reshape(base.shape)


# --------------------------------------------------------------------------- ONNX
def _add(ctx: Any, base: str, delta: str, out: str, magnitude: str | None = None, bias: str | None = None) -> None:
    """``base + delta`` into ``out``; with DoRA's ``magnitude`` ``d``, ``(base + delta) + d * (base + delta)``; with a
    ``bias`` ``c`` added to the part that reads the weights (``base + (delta + c)``, ``s1 + (d * s1 + c)``): the last
    ``Add`` reads the slot's sum and a value of its weights, as :mod:`~flora_graph.serving.base_branch` expects."""
    if magnitude is None:
        ctx.emit("Add", [base, delta if bias is None else ctx.emit("Add", [delta, bias])], [out])
        return
    s1 = ctx.emit("Add", [base, delta])
    scaled = ctx.emit("Mul", [magnitude, s1])
    ctx.emit("Add", [s1, scaled if bias is None else ctx.emit("Add", [scaled, bias])], [out])


def _onnx_slot(ctx: Any, node: ComputationNode, out: str) -> None:
    """``base + up(down(x, A), B)``: two ``Gemm(transB=1)`` for 2-D x, ``MatMul`` by transposed
    weights otherwise; a conv site is ``Conv`` with A's kernel then a 1x1 ``Conv`` by B."""
    base, x, a, b = (ctx.arg(node, i) for i in range(4))
    attrs = node.attrs
    if attrs["kind"] == "experts":
        _onnx_experts(ctx, node, base, x, a, b, ctx.arg(node, 4), out)
        return
    if attrs["kind"] == "embedding":  # the ids' columns of A [rank, vocab], then ids' axes first: [..., rank]
        rank = len(node.inputs[1].shape)
        h = ctx.emit("Transpose", [ctx.emit("Gather", [a, x], axis=1)], perm=[*range(1, rank + 1), 0])
        delta = ctx.emit("MatMul", [h, ctx.emit("Transpose", [b], perm=[1, 0])])
    elif attrs["kind"] == "conv":
        pads = [*attrs["padding"], *attrs["padding"]]
        h = ctx.emit("Conv", [x, a], kernel_shape=list(attrs["kernel"]), strides=list(attrs["stride"]), pads=pads,
                     dilations=list(attrs["dilation"]))
        delta = ctx.emit("Conv", [h, b], kernel_shape=[1, 1])
    elif len(node.inputs[1].shape) == 2:
        delta = ctx.emit("Gemm", [ctx.emit("Gemm", [x, a], transB=1), b], transB=1)
    else:
        h = ctx.emit("MatMul", [x, ctx.emit("Transpose", [a], perm=[1, 0])])
        delta = ctx.emit("MatMul", [h, ctx.emit("Transpose", [b], perm=[1, 0])])
    _add(ctx, base, delta, out, ctx.arg(node, 4) if attrs.get("dora") else None,
         ctx.arg(node, len(node.inputs) - 1) if attrs.get("lora_bias") else None)


def _onnx_experts(ctx: Any, node: ComputationNode, base: str, x: str, a: str, b: str, ids: str, out: str) -> None:
    """``base`` plus a ``Loop`` over the experts present, each pair's rows times ``A[e].T`` then ``B[e].T``."""
    if node.inputs[-1].dtype != "int64":
        ids = ctx.emit("Cast", [ids], to=ONNX_DTYPES["int64"])
    delta = emit_expert_loop(ctx, x, ids, [(a, 1), (b, 1)], int(node.shape[1]), ctx.fresh(f"{out}/lora"))
    _add(ctx, base, delta, out)


def _onnx_mixed_experts(ctx: Any, node: ComputationNode, out: str) -> None:
    """Each pair's own expert of its row's adapter: the stacks seen as ``[slots*experts, ...]``, indexed by
    ``adapter_index[row] * experts + id`` (pairs batch-major, ``pairs / batch`` a row; ``-1``, the zero slot,
    counts from the end), through the experts ``Loop``."""
    base, x, a_stack, b_stack, idx, ids = (ctx.arg(node, i) for i in range(6))
    module, experts = node.attrs["module"], int(node.inputs[2].shape[1])
    if node.inputs[5].dtype != "int64":
        ids = ctx.emit("Cast", [ids], to=ONNX_DTYPES["int64"])
    zero = ctx.constant(np.array(0, np.int64), f"{module}/zero")
    pairs = ctx.emit("Gather", [ctx.emit("Shape", [ids]), zero], axis=0)
    per_row = ctx.emit("Div", [pairs, ctx.emit("Gather", [ctx.emit("Shape", [idx]), zero], axis=0)])
    row = ctx.emit("Div", [ctx.emit("Range", [zero, pairs, ctx.constant(np.array(1, np.int64), f"{module}/one")]),
                           per_row])
    comb = ctx.emit("Add", [ctx.emit("Mul", [ctx.emit("Gather", [idx, row], axis=0),
                                             ctx.constant(np.array(experts, np.int64), f"{module}/experts")]), ids])
    flat = []
    for stack in (a_stack, b_stack):  # [slots*experts, ...], the product spelled out: a rank-0 stack is empty
        dims = ctx.emit("Shape", [stack])
        lead = ctx.emit("ReduceProd", [ctx.emit("Slice", [dims, ctx.constant(np.array([0], np.int64), f"{module}/at0"),
                                                          ctx.constant(np.array([2], np.int64), f"{module}/at2")])],
                        keepdims=1)
        tail = ctx.emit("Slice", [dims, ctx.constant(np.array([2], np.int64), f"{module}/from"),
                                  ctx.constant(np.array([4], np.int64), f"{module}/to")])
        flat.append(ctx.emit("Reshape", [stack, ctx.emit("Concat", [lead, tail], axis=0)], allowzero=1))
    delta = emit_expert_loop(ctx, x, comb, [(flat[0], 1), (flat[1], 1)], int(node.shape[1]), ctx.fresh(f"{out}/lora"))
    _add(ctx, base, delta, out)


def _onnx_patches(ctx: Any, node: ComputationNode, x: str) -> str:
    """im2col of a conv site's input as ``[batch, kh*kw*C, H'*W']`` (channel order ``(i, j, c)``).

    ``Pad``, then one strided ``Slice`` per kernel tap, concatenated along channels: copies
    only, so the per-row product that follows costs what a rank-``R`` convolution costs.
    """
    attrs, shape, module = node.attrs, node.inputs[1].shape, node.attrs["module"]
    c = shape[1]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = attrs["kernel"], attrs["stride"], attrs["padding"], attrs["dilation"]
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return ctx.emit("Reshape", [x, ctx.constant(np.array([0, c, -1], np.int64), f"{module}/patches_shape")])
    h, w = int(shape[2]), int(shape[3])
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ph or pw:
        x = ctx.emit("Pad", [x, ctx.constant(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64), f"{module}/pads")])
    axes = ctx.once(("lora-axes-23",), lambda: ctx.constant(np.array([2, 3], np.int64), "axes_2_3"))
    steps = ctx.constant(np.array([sh, sw], np.int64), f"{module}/steps")
    taps = []
    for i in range(kh):
        for j in range(kw):
            starts = ctx.constant(np.array([i * dh, j * dw], np.int64), f"{module}/start_{i}_{j}")
            ends = ctx.constant(np.array([i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1], np.int64),
                                f"{module}/end_{i}_{j}")
            taps.append(ctx.emit("Slice", [x, starts, ends, axes, steps]))
    cat = ctx.emit("Concat", taps, axis=1)
    shape_out = np.array([0, kh * kw * c, oh * ow], np.int64)
    return ctx.emit("Reshape", [cat, ctx.constant(shape_out, f"{module}/patches_shape")])


def _onnx_mixed(ctx: Any, node: ComputationNode, out: str) -> None:
    """Each row's ``A``/``B`` by ``Gather`` (``-1`` counts from the end: the zero slot), then two
    batched ``MatMul``; the delta is reshaped to the base's shape (a 3-D input's delta has it already)."""
    if node.attrs["kind"] == "embedding":
        _onnx_mixed_embedding(ctx, node, out)
        return
    if node.attrs["kind"] == "experts":
        _onnx_mixed_experts(ctx, node, out)
        return
    base, x = ctx.arg(node, 0), ctx.arg(node, 1)
    module, idx = node.attrs["module"], ctx.arg(node, 4)
    ag = ctx.emit("Gather", [ctx.arg(node, 2), idx], axis=0)
    bg = ctx.emit("Gather", [ctx.arg(node, 3), idx], axis=0)
    if node.attrs["kind"] == "conv":  # [batch, out, R] @ ([batch, R, kkC] @ [batch, kkC, H'W'])
        d = ctx.emit("MatMul", [bg, ctx.emit("MatMul", [ag, _onnx_patches(ctx, node, x)])])
    elif len(node.inputs[1].shape) == 3:  # [batch, seq, in] @ [batch, in, R] @ [batch, R, out]: the base's shape
        _add(ctx, base, ctx.emit("MatMul", [ctx.emit("MatMul", [x, ag]), bg]), out, *_row_extras(ctx, node, idx))
        return
    else:  # [batch, rows, in] @ [batch, in, R] @ [batch, R, out]
        d_in = node.inputs[1].shape[-1]
        x3 = ctx.once(("lora-rows", x), lambda: ctx.emit(  # shared by the sites reading x (q/k/v)
            "Reshape", [x, ctx.constant(np.array([0, -1, d_in], np.int64), f"{node.inputs[2].name}/rows")]))
        d = ctx.emit("MatMul", [ctx.emit("MatMul", [x3, ag]), bg])
    like = node.inputs[0]
    rest = like.shape[1:]
    if all(isinstance(v, int) for v in rest):
        target = ctx.constant(np.array([0, *rest], np.int64), f"{module}/delta/shape")
    else:
        target = ctx.emit("Shape", [ctx.value(like)])
    _add(ctx, base, ctx.emit("Reshape", [d, target]), out, *_row_extras(ctx, node, idx))


def _row_extras(ctx: Any, node: ComputationNode, idx: str) -> tuple[str | None, str | None]:
    """A slot's rows' DoRA magnitudes and biases (``None`` where it takes none), each ``[batch, 1, ..., out]``: each
    row's of its stack, over its positions."""
    found: list[str | None] = []
    at = 5
    for key in ("dora", "lora_bias"):
        if not node.attrs.get(key):
            found.append(None)
            continue
        rows = ctx.emit("Gather", [ctx.arg(node, at), idx], axis=0)  # [batch, out]
        at += 1
        rank = len(node.inputs[0].shape)
        if rank > 2:
            axes = ctx.once(("lora-row-axes", rank), lambda rank=rank: ctx.constant(
                np.arange(1, rank - 1, dtype=np.int64), f"lora_row_axes_{rank}"))
            rows = ctx.emit("Unsqueeze", [rows, axes])
        found.append(rows)
    return found[0], found[1]


def _onnx_mixed_embedding(ctx: Any, node: ComputationNode, out: str) -> None:
    """Row ``i``'s ids index its own adapter's ``A.T``: one ``Gather`` from the stack as ``[slots*vocab, R]`` by
    ``slot * vocab + id`` (``-1``, the zero slot, made ``slots - 1`` first), then a batched ``MatMul`` by each row's
    ``B``; ids ``[batch, n, ...]``."""
    base, x, a_stack, b_stack, idx = (ctx.arg(node, i) for i in range(5))
    module, ids = node.attrs["module"], node.inputs[1]
    vocab = int(node.inputs[2].shape[1])
    if node.inputs[1].dtype != "int64":
        x = ctx.emit("Cast", [x], to=ONNX_DTYPES["int64"])
    slots = ctx.emit("Gather", [ctx.emit("Shape", [a_stack]), ctx.constant(np.array(0, np.int64), f"{module}/zero")],
                     axis=0)
    slot = ctx.emit("Mod", [ctx.emit("Add", [idx, slots]), slots])  # -1 -> slots - 1
    lead = [-1] + [1] * (len(ids.shape) - 1)  # [batch, 1, ...]: broadcast over the ids' other axes
    start = ctx.emit("Reshape", [ctx.emit("Mul", [slot, ctx.constant(np.array(vocab, np.int64), f"{module}/vocab")]),
                                 ctx.constant(np.array(lead, np.int64), f"{module}/lead")])
    h = ctx.emit("Gather", [ctx.emit("Flatten", [a_stack], axis=2), ctx.emit("Add", [start, x])], axis=0)
    bg = ctx.emit("Gather", [b_stack, idx], axis=0)  # [batch, R, out]
    if len(ids.shape) > 2:  # [batch, 1, ..., R, out]: one B per row over the ids' other axes
        axes = ctx.constant(np.arange(1, len(ids.shape) - 1, dtype=np.int64), f"{module}/inner_axes")
        bg = ctx.emit("Unsqueeze", [bg, axes])
    d = ctx.emit("MatMul", [h, bg])  # [batch, ..., R] @ [batch, (1, ...,) R, out]: the base's shape
    _add(ctx, base, d, out)


# --------------------------------------------------------------------------- torch
def _unfold(x: str, attrs: dict[str, Any]) -> str:
    return (f"F.unfold({x}, {ints(attrs['kernel'])}, {ints(attrs['dilation'])}, {ints(attrs['padding'])}, "
            f"{ints(attrs['stride'])})")


def _torch_experts(base: str, x: str, a: str, b: str, ids: str) -> str:
    return f"{base} + torch.bmm({b}[{ids}], torch.bmm({a}[{ids}], {x}.unsqueeze(-1))).squeeze(-1)"


def _torch_slot(node: ComputationNode, args: list[str]) -> str:
    base, x, a, b = args[:4]
    if node.attrs["kind"] == "experts":
        return _torch_experts(base, x, a, b, args[4])
    if node.attrs["kind"] == "linear":
        summed = f"{base} + F.linear(F.linear({x}, {a}), {b})"
        summed = f"(1 + {args[4]}) * ({summed})" if node.attrs.get("dora") else summed
        return f"{summed} + {args[-1]}" if node.attrs.get("lora_bias") else summed
    if node.attrs["kind"] == "embedding":
        return f"{base} + F.linear(F.embedding({x}, {a}.t()), {b})"
    # im2col + matmul rather than conv2d, which refuses a weight of 0 output channels (rank 0)
    delta = f"torch.matmul({b}.flatten(1), torch.matmul({a}.flatten(1), {_unfold(x, node.attrs)}))"
    return f"{base} + {delta}.reshape_as({base})"


def _torch_mixed(node: ComputationNode, args: list[str]) -> str:
    base, x, a, b, idx = args[:5]
    if node.attrs["kind"] == "experts":  # a pair's expert of its row's adapter (-1: the zero slot, from the end)
        experts = int(node.inputs[2].shape[1])
        row = f"torch.arange({x}.shape[0], device={x}.device) // ({x}.shape[0] // {idx}.shape[0])"
        comb = f"({idx}[{row}] * {experts} + {args[5]})"
        return _torch_experts(base, x, f"{a}.flatten(0, 1)", f"{b}.flatten(0, 1)", comb)
    ag, bg = f"{a}[{idx}]", f"{b}[{idx}]"  # a negative index counts from the end, as Gather does
    if node.attrs["kind"] == "embedding":  # row i's ids index its own adapter's [vocab, R]
        rows = f"{idx}.reshape([-1] + [1] * ({x}.dim() - 1)).expand_as({x})"
        picked = f"{a}[{rows}, {x}]"
        return f"{base} + torch.matmul({picked}.flatten(1, -2), {bg}).reshape_as({base})"
    if node.attrs["kind"] == "linear":
        rows = f"{x}.unsqueeze(1)" if len(node.inputs[1].shape) == 2 else f"{x}.flatten(1, -2)"
        summed = f"{base} + torch.matmul(torch.matmul({rows}, {ag}), {bg}).reshape_as({base})"
        lead = ", ".join(["-1"] + ["1"] * (len(node.inputs[0].shape) - 2))
        if node.attrs.get("dora"):
            summed = f"(1 + {args[5]}[{idx}].reshape([{lead}, {args[5]}.shape[1]])) * ({summed})"
        if node.attrs.get("lora_bias"):
            summed = f"{summed} + {args[-1]}[{idx}].reshape([{lead}, {args[-1]}.shape[1]])"
        return summed
    c, (kh, kw) = node.inputs[1].shape[1], node.attrs["kernel"]
    patches = f"{_unfold(x, node.attrs)}.unflatten(1, [{c}, {kh * kw}]).transpose(1, 2).flatten(1, 2)"
    return f"{base} + torch.matmul({bg}, torch.matmul({ag}, {patches})).reshape_as({base})"


define(
    "LORA_SLOT", "LoRASlot", (4, 6), _ATTRS,  # experts: + ids; DoRA: + magnitude; + bias
    infer=_infer_slot, doc="base + up(down(x, A), B): a LoRA site whose A, B (scale folded) are inputs.",
    numpy=_numpy_slot, onnx=_onnx_slot, torch=_torch_slot, groups=["Adapter"],
)

define(
    "LORA_MIXED_SLOT", "LoRAMixedSlot", (5, 7), _ATTRS,
    infer=_infer_mixed, doc="base + up(down(x, A[i]), B[i]) per batch row, i = adapter_index[row] into stacks.",
    numpy=_numpy_mixed, onnx=_onnx_mixed, torch=_torch_mixed, groups=["Adapter"],
)
