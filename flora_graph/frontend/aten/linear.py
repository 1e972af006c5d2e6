"""ATen converters that emit the linear family (``Linear``, ``MatMul``, ``Conv2d``).

``linear`` -> ``Linear`` (by a 1-D weight: a ``Linear`` of one output, squeezed); ``matmul``/``mm``/``bmm`` ->
``MatMul``, except ``x @ W.T`` with ``W`` a
2-D weight and ``x`` of rank 2 or more, the ``Linear(x, W)`` it is, and a 1-D weight ``b`` then added to that
product alone (``add``, converted in :mod:`~flora_graph.frontend.aten.elementwise`) is folded in as
its bias, ``Linear(x, W, b)``: a ``Linear`` subclass that multiplies instead of calling ``F.linear``
(Falcon's ``x @ W.T + b``) stays a ``Linear`` layer the LoRA passes recognise, and LoRA wrapped
around it an intact site; ``addmm`` (GPT-2's
``Conv1D``) -> ``MatMul`` plus ``Mul``/``Add`` for ``alpha``, ``beta`` and the bias;
``baddbmm`` (Bloom) likewise over batched matrices; ``conv2d`` (both overloads,
``padding="same"``/``"valid"`` included) and 2-D non-transposed ``convolution`` -> ``Conv2d``;
``conv1d`` (both overloads; Whisper) and 1-D ``convolution`` -> ``Conv2d`` over an unsqueezed
unit axis, then ``Squeeze``; ``conv_transpose2d`` and 2-D transposed ``convolution`` (DPT's and Depth
Anything's upsampling) -> ``ConvTranspose2d``, their 1-D forms over an unsqueezed unit axis; ``conv3d``
and 3-D ``convolution`` -> ``Conv2d`` over frames folded into the batch (a video model's tubelets, each
tubelet's frames as channels; any other kernel, each output frame's window of frames as channels);
``conv_transpose3d`` and 3-D transposed ``convolution`` -> one ``ConvTranspose2d`` over the frames folded into
the batch, its time taps overlap-added. The capture-time LoRA Linear op
(``flora_graph::lora_linear``) has its converter in :mod:`flora_graph.frontend.lora_op`.
"""

from __future__ import annotations

from typing import Any

import torch

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend.aten.registry import as_dtype, out_dtype, refuse, register, size_ints
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import dim_product
from flora_graph.ops.movement import SLICE_END

__all__ = ["bias_into_linear"]

aten = torch.ops.aten


@register(aten.linear.default)
def _linear(ctx, x, w, b=None):
    if len(w.shape) == 1:  # F.linear by a vector (D-FINE's integral over its bins): x @ w, the last axis gone
        y = ctx.emit(Op.SQUEEZE, [ctx.emit(Op.LINEAR, [x, ctx.emit(Op.UNSQUEEZE, [w], {"axes": (0,)})])],
                     {"axes": (len(x.shape) - 1,)})
        return y if b is None else ctx.emit(Op.ADD, [y, b])
    return ctx.emit(Op.LINEAR, [x, w] + ([b] if b is not None else []))


def _transposed_weight(b: ComputationNode) -> ComputationNode | None:
    """``W`` where ``b`` is ``W.T`` (a 2-D transpose) of a 2-D weight ``W`` (a ``Const``), else ``None``."""
    if b.op is not Op.TRANSPOSE or tuple(b.attrs.get("perm", ())) != (1, 0):
        return None
    w = b.inputs[0]
    return w if w.op is Op.CONST and len(w.shape) == 2 else None


@register(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ctx, a, b):
    w = _transposed_weight(b)
    if w is not None and len(a.shape) >= 2:
        return ctx.emit(Op.LINEAR, [a, w])  # x @ W.T: the transpose is left unread (capture drops it)
    return ctx.emit(Op.MATMUL, [a, b])


def bias_into_linear(ctx, a: Any, b: Any) -> ComputationNode | None:
    """``Linear(x, W, bias)`` for ``a + b`` (either order) where one is a bias-less ``Linear(x, W)`` of a
    constant weight that nothing but this sum reads and the other a 1-D weight ``[out]`` of its dtype, else ``None``.

    The ``Linear`` left unread takes the new node's name (inside an adapter: ``<module>.base``),
    so the folded node is named as a plain ``nn.Linear`` base layer's would be.
    """
    fx_args = tuple(ctx.fx_node.args[:2])
    if len(fx_args) != 2:
        return None
    for lin, bias, fx_lin in ((a, b, fx_args[0]), (b, a, fx_args[1])):
        if not (isinstance(lin, ComputationNode) and isinstance(bias, ComputationNode)
                and lin.op is Op.LINEAR and len(lin.inputs) == 2 and lin.inputs[1].op is Op.CONST
                and bias.op is Op.CONST and tuple(bias.shape) == (lin.shape[-1],)
                and lin.dtype == bias.dtype == out_dtype(ctx)
                and isinstance(fx_lin, torch.fx.Node) and len(fx_lin.users) == 1):
            continue
        folded = ctx.emit(Op.LINEAR, [*lin.inputs, bias])
        if lin.meta.get("role") and lin.meta.get("role") == folded.meta.get("role"):
            lin.name, folded.name = folded.name, lin.name  # the unread one is dropped at the end of capture
        return folded
    return None


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


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (int(v[0]), int(v[-1]))


def _same(ctx: Any, x: ComputationNode, totals: list[int]) -> tuple[ComputationNode, list[int]]:
    """``padding="same"`` (stride 1) over the last ``len(totals)`` axes of ``x``, each padded by ``totals[i]`` in
    all: the convolution's own symmetric padding where every total is even, else an explicit ``Pad`` of torch's
    split (``total // 2`` before, the rest after: an even kernel, LASR's depthwise convolutions) and none."""
    if not any(t % 2 for t in totals):
        return x, [t // 2 for t in totals]
    lead = [0] * (len(x.shape) - len(totals))
    pads = (*lead, *(t // 2 for t in totals), *lead, *(t - t // 2 for t in totals))
    return ctx.emit(Op.PAD, [x], {"pads": pads, "mode": "constant", "value": 0.0}), [0] * len(totals)


@register(aten.conv2d.default, aten.conv2d.padding)
def _conv2d(ctx, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same" with stride 1
            x, padding = _same(ctx, x, [d * (k - 1) for d, k in zip(_pair(dilation), w.shape[2:], strict=True)])
    attrs = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation), "groups": int(groups)}
    return ctx.emit(Op.CONV2D, [x, w] + ([b] if b is not None else []), attrs)


@register(aten.conv1d.default, aten.conv1d.padding)
def _conv1d(ctx, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """``Conv2d`` over ``x`` ``[N, C, 1, L]`` and ``w`` ``[O, C/g, 1, k]``, then the unit axis squeezed."""
    if len(x.shape) != 3 or len(w.shape) != 3:
        raise refuse(ctx, "conv1d needs x [N, C, L] and w [O, C/groups, k]")
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same" with stride 1
            x, (padding,) = _same(ctx, x, [_pair(dilation)[0] * (int(w.shape[2]) - 1)])
    x4 = ctx.emit(Op.UNSQUEEZE, [x], {"axes": (2,)})
    w4 = ctx.emit(Op.UNSQUEEZE, [w], {"axes": (2,)})
    attrs = {"stride": (1, _pair(stride)[0]), "padding": (0, _pair(padding)[0]), "dilation": (1, _pair(dilation)[0]),
             "groups": int(groups)}
    y = ctx.emit(Op.CONV2D, [x4, w4] + ([b] if b is not None else []), attrs)
    return ctx.emit(Op.SQUEEZE, [y], {"axes": (2,)})


@register(aten.conv3d.default, aten.conv3d.padding)
def _conv3d(ctx, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """A 3-D convolution as ``Conv2d`` over frames folded into the batch: a kernel that tiles time (a video
    model's tubelets: depth stride = depth kernel, no depth padding or dilation, one group, a static number
    of frames it divides) takes each tubelet's frames as channels; any other (a video VAE's causal
    convolutions: overlapping windows, time padding, strides, groups, a dynamic number of frames) stacks
    each output frame's ``kt`` input frames as channels (:func:`_frame_windows`)."""
    if len(x.shape) != 5 or len(w.shape) != 5:
        raise refuse(ctx, "conv3d needs x [N, C, T, H, W] and w [O, C/groups, kt, kh, kw]")
    st, dil = size_ints(stride, 3), size_ints(dilation, 3)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same" with stride 1
            x, padding = _same(ctx, x, [d * (k - 1) for d, k in zip(dil, w.shape[2:], strict=True)])
    pad = size_ints(padding, 3)
    o, c, kt, kh, kw = (int(d) for d in w.shape)
    frames = x.shape[2]
    if int(groups) != 1 or st[0] != kt or pad[0] or dil[0] != 1 or not isinstance(frames, int) or frames % kt:
        return _frame_windows(ctx, x, w, b, st, pad, dil, int(groups))
    tubes = frames // kt
    h, wd = x.shape[3], x.shape[4]
    y = ctx.emit(Op.RESHAPE, [x], {"shape": (0, c, tubes, kt, h, wd)})
    y = ctx.emit(Op.TRANSPOSE, [y], {"perm": (0, 2, 1, 3, 4, 5)})  # [N, tubes, C, kt, H, W]
    y = ctx.emit(Op.RESHAPE, [y], {"shape": (-1, c * kt, h, wd)})
    w2 = ctx.emit(Op.RESHAPE, [w], {"shape": (o, c * kt, kh, kw)})
    y = ctx.emit(Op.CONV2D, [y, w2] + ([b] if b is not None else []),
                 {"stride": st[1:], "padding": pad[1:], "dilation": dil[1:], "groups": 1})
    y = ctx.emit(Op.RESHAPE, [y], {"shape": (-1, tubes, o, y.shape[2], y.shape[3])})
    return ctx.emit(Op.TRANSPOSE, [y], {"perm": (0, 2, 1, 3, 4)})  # [N, O, tubes, H', W']


def _frame_windows(ctx: Any, x: ComputationNode, w: ComputationNode, b: ComputationNode | None, st: tuple[int, ...],
                   pad: tuple[int, ...], dil: tuple[int, ...], groups: int) -> ComputationNode:
    """Any 3-D convolution as one ``Conv2d``: the time axis padded, the ``kt`` frames each output frame reads
    (``Slice`` per tap, every ``st`` frames) stacked beside the channels, ``[N, C, kt, T', H, W]`` ->
    ``[N*T', C*kt, H, W]``, convolved with ``w`` as ``[O, C/groups*kt, kh, kw]`` (the channel-major order keeps
    the groups), and unfolded to ``[N, O, T', H', W']``. Holds ``kt`` copies of the input's frames."""
    o, cg, kt, kh, kw = (int(d) for d in w.shape)
    c = x.shape[1]
    if not isinstance(c, int):
        raise refuse(ctx, f"conv3d of {x.name} with a dynamic number of channels {c!r}")
    if pad[0]:
        x = ctx.emit(Op.PAD, [x], {"pads": (0, 0, pad[0], 0, 0, 0, 0, pad[0], 0, 0), "mode": "constant", "value": 0.0})
    taps = []
    for j in range(kt):  # tap j reads frames j*dil .. end - (kt-1-j)*dil: one per position of the window
        back = (kt - 1 - j) * dil[0]
        tap = ctx.emit(Op.SLICE, [x], {"axes": (2,), "starts": (j * dil[0],), "ends": (-back if back else SLICE_END,),
                                       "steps": (1,)})
        taps.append(ctx.emit(Op.UNSQUEEZE, [tap], {"axes": (2,)}))
    y = taps[0] if kt == 1 else ctx.emit(Op.CONCAT, taps, {"axis": 2})  # [N, C, kt, L, H, W]
    if st[0] > 1:
        y = ctx.emit(Op.SLICE, [y], {"axes": (3,), "starts": (0,), "ends": (SLICE_END,), "steps": (st[0],)})
    n, frames, h, wd = y.shape[0], y.shape[3], y.shape[4], y.shape[5]
    y = ctx.emit(Op.TRANSPOSE, [y], {"perm": (0, 3, 1, 2, 4, 5)})  # [N, T', C, kt, H, W]
    y = ctx.emit(Op.RESHAPE, [y], {"shape": (-1, c * kt, h, wd)})
    w2 = ctx.emit(Op.RESHAPE, [w], {"shape": (o, cg * kt, kh, kw)})
    y = ctx.emit(Op.CONV2D, [y, w2] + ([b] if b is not None else []),
                 {"stride": st[1:], "padding": pad[1:], "dilation": dil[1:], "groups": groups})
    y = ctx.emit(Op.RESHAPE, [y], {"shape": (n, frames, o, y.shape[2], y.shape[3])})
    return ctx.emit(Op.TRANSPOSE, [y], {"perm": (0, 2, 1, 3, 4)})


@register(aten.conv_transpose3d.input)
def _conv_transpose3d(ctx, x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """A 3-D transposed convolution as one ``ConvTranspose2d`` over the frames folded into the batch, every
    time tap's output channels side by side (``w`` as ``[C, O/groups*kt, kh, kw]``), then the taps overlap-added
    in time: each tap's frames spread ``st`` apart (zero frames between), shifted by ``j*dil`` and summed,
    cropped by the time padding and extended by its output padding. Any number of frames."""
    if len(x.shape) != 5 or len(w.shape) != 5:
        raise refuse(ctx, "conv_transpose3d needs x [N, C, T, H, W] and w [C, O/groups, kt, kh, kw]")
    st, pad, opad, dil = (size_ints(v, 3) for v in (stride, padding, output_padding, dilation))
    c, og, kt, kh, kw = (int(d) for d in w.shape)
    if x.shape[1] != c:
        raise refuse(ctx, f"conv_transpose3d of {x.name} with {x.shape[1]!r} channels for a weight of {c}")
    n, frames, h, wd = x.shape[0], x.shape[2], x.shape[3], x.shape[4]
    o = og * int(groups)
    y = ctx.emit(Op.TRANSPOSE, [x], {"perm": (0, 2, 1, 3, 4)})  # [N, T, C, H, W]
    y = ctx.emit(Op.RESHAPE, [y], {"shape": (-1, c, h, wd)})
    w2 = ctx.emit(Op.RESHAPE, [w], {"shape": (c, og * kt, kh, kw)})
    y = ctx.emit(Op.CONV_TRANSPOSE2D, [y, w2], {"stride": st[1:], "padding": pad[1:], "dilation": dil[1:],
                                                "output_padding": opad[1:], "groups": int(groups)})
    ho, wo = y.shape[2], y.shape[3]
    y = ctx.emit(Op.RESHAPE, [y], {"shape": (n, frames, o, kt, ho, wo)})  # channels (o, tap), group-major
    if st[0] > 1:  # st - 1 zero frames after each frame, the last frame's dropped: (T - 1) * st + 1 frames
        y = ctx.emit(Op.UNSQUEEZE, [y], {"axes": (2,)})
        y = ctx.emit(Op.PAD, [y], {"pads": (0, 0, 0, 0, 0, 0, 0, 0, 0, st[0] - 1, 0, 0, 0, 0), "mode": "constant",
                                   "value": 0.0})
        y = ctx.emit(Op.RESHAPE, [y], {"shape": (n, dim_product([frames, st[0]]), o, kt, ho, wo)})
        y = ctx.emit(Op.SLICE, [y], {"axes": (1,), "starts": (0,), "ends": (1 - st[0],), "steps": (1,)})
    total = None
    for j in range(kt):  # tap j lands j*dil frames later
        tap = ctx.emit(Op.SLICE, [y], {"axes": (3,), "starts": (j,), "ends": (j + 1,), "steps": (1,)})
        tap = ctx.emit(Op.SQUEEZE, [tap], {"axes": (3,)})
        before, after = j * dil[0], (kt - 1 - j) * dil[0] + opad[0]
        if before or after:
            tap = ctx.emit(Op.PAD, [tap], {"pads": (0, before, 0, 0, 0, 0, after, 0, 0, 0), "mode": "constant",
                                           "value": 0.0})
        total = tap if total is None else ctx.emit(Op.ADD, [total, tap])
    if pad[0]:
        total = ctx.emit(Op.SLICE, [total], {"axes": (1,), "starts": (pad[0],), "ends": (-pad[0],), "steps": (1,)})
    y = ctx.emit(Op.TRANSPOSE, [total], {"perm": (0, 2, 1, 3, 4)})  # [N, O, T', H', W']
    if b is not None:
        y = ctx.emit(Op.ADD, [y, ctx.emit(Op.RESHAPE, [b], {"shape": (o, 1, 1, 1)})])
    return y


@register(aten.convolution.default)
def _convolution(ctx, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if len(w.shape) == 5:
        if transposed:
            return _conv_transpose3d(ctx, x, w, b, stride, padding, output_padding, groups, dilation)
        return _conv3d(ctx, x, w, b, stride, padding, dilation, groups)
    if len(w.shape) not in (3, 4):
        raise UnsupportedOpError("only 1-D, 2-D and 3-D convolutions are supported",
                                 {"aten.convolution.default": [ctx.where()]})
    if transposed:
        conv = _conv_transpose1d if len(w.shape) == 3 else _conv_transpose2d
        return conv(ctx, x, w, b, stride, padding, output_padding, groups, dilation)
    conv = _conv1d if len(w.shape) == 3 else _conv2d
    return conv(ctx, x, w, b, stride, padding, dilation, groups)


@register(aten.conv_transpose2d.input)
def _conv_transpose2d(ctx, x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    if len(x.shape) != 4 or len(w.shape) != 4:
        raise refuse(ctx, "conv_transpose2d needs x [N, C, H, W] and w [C, O/groups, kh, kw]")
    attrs = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation),
             "output_padding": _pair(output_padding), "groups": int(groups)}
    return ctx.emit(Op.CONV_TRANSPOSE2D, [x, w] + ([b] if b is not None else []), attrs)


@register(aten.conv_transpose1d.default)
def _conv_transpose1d(ctx, x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``ConvTranspose2d`` over ``x`` ``[N, C, 1, L]`` and ``w`` ``[C, O/g, 1, k]``, then the unit axis squeezed."""
    if len(x.shape) != 3 or len(w.shape) != 3:
        raise refuse(ctx, "conv_transpose1d needs x [N, C, L] and w [C, O/groups, k]")
    x4 = ctx.emit(Op.UNSQUEEZE, [x], {"axes": (2,)})
    w4 = ctx.emit(Op.UNSQUEEZE, [w], {"axes": (2,)})
    attrs = {"stride": (1, _pair(stride)[0]), "padding": (0, _pair(padding)[0]), "dilation": (1, _pair(dilation)[0]),
             "output_padding": (0, _pair(output_padding)[0]), "groups": int(groups)}
    y = ctx.emit(Op.CONV_TRANSPOSE2D, [x4, w4] + ([b] if b is not None else []), attrs)
    return ctx.emit(Op.SQUEEZE, [y], {"axes": (2,)})


@register(aten.baddbmm.default)
def _baddbmm(ctx, bias, a, b, *, beta=1, alpha=1):
    """``beta * bias + alpha * (a @ b)`` (Bloom's attention scores)."""
    return _addmm(ctx, bias, a, b, beta=beta, alpha=alpha)
