"""Linear algebra: ``Linear``, ``MatMul``, ``ExpertLinear`` (a mixture of experts' layer), ``Conv2d``,
``ConvTranspose2d``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import FLOAT_DTYPES, AttrSpec, Op
from flora_graph.ir.shapes import (
    Dim,
    add_dims,
    broadcast_shapes,
    canonical_dim,
    dim_product,
    format_shape,
    window_count,
)
from flora_graph.ops._infer import same_float_dtype
from flora_graph.ops._onnx import ONNX_DTYPES, simple
from flora_graph.ops._torch import call, ints
from flora_graph.ops.registry import define

__all__: list[str] = []


# --------------------------------------------------------------------------- Linear
def _infer_linear(shapes, dtypes, attrs):
    x, w = shapes[0], shapes[1]
    if len(x) < 1 or len(w) != 2:
        raise ShapeError(f"Linear needs x of rank >= 1 and W of rank 2, got {format_shape(x)}, {format_shape(w)}")
    if canonical_dim(x[-1]) != canonical_dim(w[1]):
        raise ShapeError(
            f"Linear: x {format_shape(x)} has {x[-1]} features, W {format_shape(w)} expects {w[1]}"
        )
    if len(shapes) == 3 and (len(shapes[2]) != 1 or canonical_dim(shapes[2][0]) != canonical_dim(w[0])):
        raise ShapeError(f"Linear: bias {format_shape(shapes[2])} does not match W {format_shape(w)}")
    return (*x[:-1], w[0]), same_float_dtype(dtypes)


def _numpy_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def _onnx_linear(ctx: Any, node: ComputationNode, out: str) -> None:
    """``x @ W.T + b``: ``Gemm(transB=1)`` for 2-D float x, else ``MatMul`` with a pre-transposed W."""
    x, w = node.inputs[0], node.inputs[1]
    bias = [ctx.arg(node, 2)] if len(node.inputs) == 3 else []
    if len(x.shape) == 2 and node.dtype in FLOAT_DTYPES:
        ctx.emit("Gemm", [ctx.arg(node, 0), ctx.arg(node, 1), *bias], [out], transB=1)
        return
    if w.op is Op.CONST:
        wt = ctx.widen(ctx.param(w, transposed=True), w.dtype)
    else:
        wt = ctx.emit("Transpose", [ctx.arg(node, 1)], perm=[1, 0])
    y = ctx.emit("MatMul", [ctx.arg(node, 0), wt], None if bias else [out])
    if bias:
        ctx.emit("Add", [y, *bias], [out])


define(
    "LINEAR", "Linear", (2, 3),
    infer=_infer_linear, doc="x @ W.T (+ b); W is [out, in] (torch layout).",
    numpy=_numpy_linear, onnx=_onnx_linear, torch=call("F.linear"),
)


# --------------------------------------------------------------------------- MatMul
def _infer_matmul(shapes, dtypes, attrs):
    a, b = shapes
    if not a or not b:
        raise ShapeError("MatMul operands must have rank >= 1")
    a2 = (1, *a) if len(a) == 1 else tuple(a)
    b2 = (*b, 1) if len(b) == 1 else tuple(b)
    if canonical_dim(a2[-1]) != canonical_dim(b2[-2]):
        raise ShapeError(f"MatMul: {format_shape(a)} @ {format_shape(b)} inner dims differ")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    out = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out, same_float_dtype(dtypes)


define(
    "MATMUL", "MatMul", (2, 2),
    infer=_infer_matmul, doc="numpy/ONNX MatMul with batch broadcasting.",
    numpy=np.matmul, onnx=simple("MatMul"), torch=call("torch.matmul"),
)


# --------------------------------------------------------------------------- ExpertLinear
def _infer_expert_linear(shapes, dtypes, attrs):
    x, w, ids = shapes
    if len(x) != 2 or len(w) != 3 or len(ids) != 1:
        raise ShapeError(f"ExpertLinear needs x [S, in], W [experts, out, in] (or [experts, in, out] transposed) "
                         f"and ids [S], got {format_shape(x)}, {format_shape(w)}, {format_shape(ids)}")
    features, out = (w[1], w[2]) if attrs.get("transposed") else (w[2], w[1])
    if canonical_dim(x[1]) != canonical_dim(features) or canonical_dim(x[0]) != canonical_dim(ids[0]):
        raise ShapeError(f"ExpertLinear: x {format_shape(x)}, W {format_shape(w)} and ids {format_shape(ids)} "
                         "do not agree")
    if dtypes[2] not in ("int64", "int32"):
        raise ShapeError(f"ExpertLinear: ids must be int64 or int32, got {dtypes[2]}")
    return (x[0], out), same_float_dtype(dtypes[:2])


def _numpy_expert_linear(x: np.ndarray, w: np.ndarray, ids: np.ndarray, *, transposed: int = 0) -> np.ndarray:
    out = np.zeros((x.shape[0], w.shape[2] if transposed else w.shape[1]), np.result_type(x, w))
    for e in np.unique(ids):
        rows = np.flatnonzero(ids == e)
        out[rows] = x[rows] @ (w[e] if transposed else w[e].T)
    return out


def _onnx_expert_linear(ctx: Any, node: ComputationNode, out: str) -> None:
    """A ``Loop`` over the experts ``ids`` names (:func:`emit_expert_loop`)."""
    trans_b = 0 if node.attrs.get("transposed") else 1
    emit_expert_loop(ctx, ctx.arg(node, 0), ctx.arg(node, 2), [(ctx.arg(node, 1), trans_b)], int(node.shape[1]), out)


def emit_expert_loop(ctx: Any, x: str, ids: str, weights: list[tuple[str, int]], width: int, out: str) -> str:
    """``out[s] = x[s] @ op(w1[ids[s]]) @ op(w2[ids[s]]) ...`` (``op`` transposing where ``transB`` is 1; ``width``
    columns): a ``Loop`` over the experts ``ids`` names (``Unique``), each taking its rows (``NonZero``), multiplying
    them by its own weights in turn (``Gather`` of one expert each, ``Gemm``) and writing them back (``ScatterND``).
    Each expert's weights are read once per call, not once per row, and the products are matrix products: a prompt
    of ``T`` tokens routed to ``k`` experts each does not gather ``T * k`` weight copies. An expert index may be
    negative (``Gather`` counts it from the end). Returns ``out``."""
    from onnx import TensorProto, helper

    compute = ONNX_DTYPES[ctx.dtype]
    name = ctx.fresh
    uniq = ctx.emit("Unique", [ids], [name(f"{out}/experts")], sorted=1)
    trip = ctx.emit("Squeeze", [ctx.emit("Shape", [uniq])])
    rows = ctx.emit("Shape", [ids])
    cols = ctx.constant(np.array([width], np.int64), f"{out}/width")
    zeros = ctx.emit("ConstantOfShape", [ctx.emit("Concat", [rows, cols], axis=0)],
                     value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    start = ctx.emit("Cast", [zeros], to=compute)
    i, cond, acc = name(f"{out}/i"), name(f"{out}/cond"), name(f"{out}/acc")
    e, hit, nz, sel, xs = (name(f"{out}/{v}") for v in ("expert", "hit", "nonzero", "rows", "x"))
    cond_out, acc_out = name(f"{out}/cond_out"), name(f"{out}/acc_out")
    nodes = [helper.make_node("Gather", [uniq, i], [e], axis=0),
             helper.make_node("Equal", [ids, e], [hit]),
             helper.make_node("NonZero", [hit], [nz]),
             helper.make_node("Transpose", [nz], [sel], perm=[1, 0]),
             helper.make_node("GatherND", [x, sel], [xs])]
    y = xs
    for k, (w, trans_b) in enumerate(weights):
        we, yk = name(f"{out}/w{k}"), name(f"{out}/y{k}")
        nodes += [helper.make_node("Gather", [w, e], [we], axis=0),
                  helper.make_node("Gemm", [y, we], [yk], transB=trans_b)]
        y = yk
    nodes += [helper.make_node("ScatterND", [acc, sel, y], [acc_out]),
              helper.make_node("Identity", [cond], [cond_out])]
    body = helper.make_graph(
        nodes, f"{out}/per_expert",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc, compute, None)],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc_out, compute, None)])
    return ctx.emit("Loop", [trip, "", start], [out], body=body)


def _torch_expert_linear(node: ComputationNode, args: list[str]) -> str:
    w = f"{args[1]}[{args[2]}]"
    if node.attrs.get("transposed"):
        return f"torch.bmm({args[0]}.unsqueeze(1), {w}).squeeze(1)"
    return f"torch.bmm({w}, {args[0]}.unsqueeze(-1)).squeeze(-1)"


define(
    "EXPERT_LINEAR", "ExpertLinear", (3, 3),
    {"transposed": AttrSpec("int", 0)},
    infer=_infer_expert_linear,
    doc="Row s of x times expert ids[s]'s weight: x[s] @ W[ids[s]].T (W [experts, out, in]), or x[s] @ W[ids[s]] "
        "with transposed=1 (W [experts, in, out]); a mixture of experts' layer on its (token, expert) pairs.",
    numpy=_numpy_expert_linear, onnx=_onnx_expert_linear, torch=_torch_expert_linear,
)


# --------------------------------------------------------------------------- Conv2d
def _conv_out(size: Dim, k: int, s: int, p: int, d: int) -> Dim:
    """Output positions: ``seq`` for a same-padded kernel, ``seq-2`` for a valid 3-tap one,
    ``((samples-10)//5)+1`` for a 10-tap stride-5 one over a dynamic length."""
    try:
        return window_count(size, k, s, p, d)
    except ShapeError as e:
        raise ShapeError(f"Conv2d: {e}") from None


def _infer_conv2d(shapes, dtypes, attrs):
    x, w = shapes[0], shapes[1]
    if len(x) != 4 or len(w) != 4:
        raise ShapeError(f"Conv2d needs x [N,C,H,W] and W [O,C/g,kh,kw], got {format_shape(x)}, {format_shape(w)}")
    g = attrs["groups"]
    for name in ("stride", "padding", "dilation"):
        if len(attrs[name]) != 2:
            raise ShapeError(f"Conv2d: {name} must have 2 values, got {attrs[name]}")
    if g < 1 or not isinstance(w[0], int) or w[0] % g:
        raise ShapeError(f"Conv2d: {w[0]} output channels not divisible by groups={g}")
    cin = x[1]
    if not isinstance(cin, int) or not isinstance(w[1], int) or cin != w[1] * g:
        raise ShapeError(f"Conv2d: x has {cin} channels, W {format_shape(w)} with groups={g} expects {w[1] * g}")
    if len(shapes) == 3 and (len(shapes[2]) != 1 or shapes[2][0] != w[0]):
        raise ShapeError(f"Conv2d: bias {format_shape(shapes[2])} does not match {w[0]} channels")
    if not isinstance(w[2], int) or not isinstance(w[3], int):
        raise ShapeError(f"Conv2d: kernel size of W {format_shape(w)} must be static")
    (sh, sw), (ph, pw), (dh, dw) = attrs["stride"], attrs["padding"], attrs["dilation"]
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ShapeError("Conv2d: stride and dilation must be >= 1 and padding >= 0")
    h = _conv_out(x[2], int(w[2]), sh, ph, dh)
    ww = _conv_out(x[3], int(w[3]), sw, pw, dw)
    return (x[0], w[0], h, ww), same_float_dtype(dtypes)


def _numpy_conv2d(
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


def _onnx_conv2d(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Conv`` with symmetric pads ``[ph, pw, ph, pw]``."""
    (ph, pw), kernel = node.attrs["padding"], [int(d) for d in node.inputs[1].shape[2:]]
    ctx.emit("Conv", ctx.args(node), [out], kernel_shape=kernel, strides=list(node.attrs["stride"]),
             pads=[ph, pw, ph, pw], dilations=list(node.attrs["dilation"]), group=node.attrs["groups"])


def _torch_conv2d(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    bias = args[2] if len(args) == 3 else "None"
    return (
        f"F.conv2d({args[0]}, {args[1]}, {bias}, {ints(a['stride'])}, {ints(a['padding'])}, "
        f"{ints(a['dilation'])}, {int(a['groups'])})"
    )


define(
    "CONV2D", "Conv2d", (2, 3),
    {
        "stride": AttrSpec("ints", (1, 1)),
        "padding": AttrSpec("ints", (0, 0)),
        "dilation": AttrSpec("ints", (1, 1)),
        "groups": AttrSpec("int", 1),
    },
    infer=_infer_conv2d, doc="NCHW convolution, W [O, C/groups, kh, kw], symmetric padding (ph, pw).",
    numpy=_numpy_conv2d, onnx=_onnx_conv2d, torch=_torch_conv2d,
)


# --------------------------------------------------------------------------- ConvTranspose2d
def _transposed_out(size: Dim, k: int, s: int, p: int, d: int, extra: int) -> Dim:
    """``(size - 1) * s - 2 p + d (k - 1) + extra + 1`` positions (torch's and ONNX's), ``2*seq`` for a
    2-tap stride-2 kernel over a dynamic ``seq``."""
    rest = d * (k - 1) + extra + 1 - 2 * p - s
    out = add_dims(dim_product([s, size]), rest) if not isinstance(size, int) else (size - 1) * s + rest + s
    if isinstance(out, int) and out < 1:
        raise ShapeError(f"ConvTranspose2d: input size {size} gives {out} output positions")
    return out


def _infer_conv_transpose2d(shapes, dtypes, attrs):
    x, w = shapes[0], shapes[1]
    if len(x) != 4 or len(w) != 4:
        raise ShapeError(f"ConvTranspose2d needs x [N,C,H,W] and W [C,O/g,kh,kw], got {format_shape(x)}, {format_shape(w)}")
    g = attrs["groups"]
    for name in ("stride", "padding", "dilation", "output_padding"):
        if len(attrs[name]) != 2:
            raise ShapeError(f"ConvTranspose2d: {name} must have 2 values, got {attrs[name]}")
    if not all(isinstance(d, int) for d in w) or g < 1 or w[0] % g:
        raise ShapeError(f"ConvTranspose2d: W {format_shape(w)} must be static, its {w[0]} input channels "
                         f"divisible by groups={g}")
    if x[1] != w[0]:
        raise ShapeError(f"ConvTranspose2d: x has {x[1]} channels, W {format_shape(w)} expects {w[0]}")
    cout = w[1] * g
    if len(shapes) == 3 and (len(shapes[2]) != 1 or shapes[2][0] != cout):
        raise ShapeError(f"ConvTranspose2d: bias {format_shape(shapes[2])} does not match {cout} channels")
    (sh, sw), (ph, pw), (dh, dw), (oh, ow) = attrs["stride"], attrs["padding"], attrs["dilation"], attrs["output_padding"]
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0 or not (0 <= oh < max(sh, dh) and 0 <= ow < max(sw, dw)):
        raise ShapeError("ConvTranspose2d: stride and dilation must be >= 1, padding >= 0, and output_padding "
                         "below the stride or the dilation")
    h = _transposed_out(x[2], w[2], sh, ph, dh, oh)
    ww = _transposed_out(x[3], w[3], sw, pw, dw, ow)
    return (x[0], cout, h, ww), same_float_dtype(dtypes)


def _numpy_conv_transpose2d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    output_padding: tuple[int, int],
    groups: int,
) -> np.ndarray:
    """Each input position adds ``x * W`` over its kernel taps at ``stride`` times its place (float64),
    then the ``padding`` is cut from both ends."""
    (sh, sw), (ph, pw), (dh, dw), (oh, ow) = stride, padding, dilation, output_padding
    n, c, h, wd = x.shape
    _, cog, kh, kw = w.shape
    full_h, full_w = (h - 1) * sh + dh * (kh - 1) + 1 + oh, (wd - 1) * sw + dw * (kw - 1) + 1 + ow
    xg = x.astype(np.float64).reshape(n, groups, c // groups, h, wd)
    wg = w.astype(np.float64).reshape(groups, c // groups, cog, kh, kw)
    y = np.zeros((n, groups, cog, full_h, full_w))
    for i in range(kh):
        for j in range(kw):
            tap = np.einsum("ngchw,gco->ngohw", xg, wg[:, :, :, i, j], optimize=True)
            y[:, :, :, i * dh:i * dh + (h - 1) * sh + 1:sh, j * dw:j * dw + (wd - 1) * sw + 1:sw] += tap
    y = y.reshape(n, groups * cog, full_h, full_w)[:, :, ph:full_h - ph, pw:full_w - pw]
    return (y if b is None else y + b.reshape(1, -1, 1, 1)).astype(x.dtype)


def _onnx_conv_transpose2d(ctx: Any, node: ComputationNode, out: str) -> None:
    """``ConvTranspose`` with symmetric pads ``[ph, pw, ph, pw]`` and ``output_padding``."""
    a, kernel = node.attrs, [int(d) for d in node.inputs[1].shape[2:]]
    (ph, pw) = a["padding"]
    ctx.emit("ConvTranspose", ctx.args(node), [out], kernel_shape=kernel, strides=list(a["stride"]),
             pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), output_padding=list(a["output_padding"]),
             group=a["groups"])


def _torch_conv_transpose2d(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    bias = args[2] if len(args) == 3 else "None"
    return (f"F.conv_transpose2d({args[0]}, {args[1]}, {bias}, {ints(a['stride'])}, {ints(a['padding'])}, "
            f"{ints(a['output_padding'])}, {int(a['groups'])}, {ints(a['dilation'])})")


define(
    "CONV_TRANSPOSE2D", "ConvTranspose2d", (2, 3),
    {
        "stride": AttrSpec("ints", (1, 1)),
        "padding": AttrSpec("ints", (0, 0)),
        "dilation": AttrSpec("ints", (1, 1)),
        "output_padding": AttrSpec("ints", (0, 0)),
        "groups": AttrSpec("int", 1),
    },
    infer=_infer_conv_transpose2d,
    doc="NCHW transposed convolution (the gradient of Conv2d), W [C, O/groups, kh, kw], symmetric padding cut "
        "from the output, output_padding added at its end (torch conv_transpose2d, ONNX ConvTranspose).",
    numpy=_numpy_conv_transpose2d, onnx=_onnx_conv_transpose2d, torch=_torch_conv_transpose2d,
)
