"""The linear-algebra family (:mod:`flora_graph.ops.linear`): ``Linear``, ``MatMul``, ``Conv2d``.

Numpy reference against torch (``F.linear``, ``torch.matmul``, ``F.conv2d``, in float64), then
every backend against the reference; see :mod:`tests.ops.harness`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flora_graph.ir import Op
from flora_graph.ir.shapes import dim_product

from .harness import Case, In, const, f64, family_tests, op

_W46, _B4 = const(1, 4, 6), const(2, 4)
_M53, _V5 = const(3, 5, 3), const(4, 5)
CONV_X = In(("batch", 4, 9, 9))


def linear_ref(w: np.ndarray, b: np.ndarray | None = None) -> Any:
    return lambda x: F.linear(x.double(), f64(w), None if b is None else f64(b)).float()


_EXPERTS = const(7, 4, 5, 6)  # 4 experts, [out 5, in 6]
_EXPERTS_T = const(8, 4, 6, 5)  # the same as [in 6, out 5]


def _conv_w(*shape: int) -> np.ndarray:
    return const(sum(shape) * 31 + len(shape), *shape)


def conv(id: str, w: np.ndarray, b: np.ndarray | None = None, *, x: In = CONV_X, **attrs: Any) -> Case:
    """``Conv2d(x, w[, b], **attrs)`` against ``F.conv2d`` with the same stride/padding/dilation/groups."""
    stride, padding = attrs.get("stride", (1, 1)), attrs.get("padding", (0, 0))
    dilation, groups = attrs.get("dilation", (1, 1)), attrs.get("groups", 1)
    return Case(
        id, {"x": x}, op(Op.CONV2D, "x", w, *([] if b is None else [b]), **attrs),
        lambda x: F.conv2d(x.double(), f64(w), None if b is None else f64(b), stride, padding, dilation, groups).float(),
    )

def deconv(id: str, w: np.ndarray, b: np.ndarray | None = None, *, x: In = CONV_X, capture: bool = False,
           **attrs: Any) -> Case:
    """``ConvTranspose2d(x, w[, b], **attrs)`` against ``F.conv_transpose2d`` with the same attributes (captured
    from that call where ``capture``)."""
    stride, padding, out_pad = attrs.get("stride", (1, 1)), attrs.get("padding", (0, 0)), attrs.get("output_padding", (0, 0))
    dilation, groups = attrs.get("dilation", (1, 1)), attrs.get("groups", 1)
    return Case(
        id, {"x": x}, op(Op.CONV_TRANSPOSE2D, "x", w, *([] if b is None else [b]), **attrs),
        lambda x: F.conv_transpose2d(x.double(), f64(w), None if b is None else f64(b), stride, padding, out_pad, groups,
                                     dilation).float(),
        **({"capture": ("conv_transpose2d.input",), "tol": 1e-4} if capture else {}),
    )


def _conv1d(w: np.ndarray, b: np.ndarray | None = None, prefix: str = "", **attrs: Any) -> Any:
    """``Conv2d`` over ``x`` and ``w`` with a unit axis 2, then that axis squeezed (what ``conv1d`` becomes)."""

    def build(g, x, rng):
        x4 = g.add(Op.UNSQUEEZE, [x["x"]], {"axes": (2,)})
        w4 = g.add(Op.UNSQUEEZE, [g.const(f"{prefix}w", w)], {"axes": (2,)})
        y = g.add(Op.CONV2D, [x4, w4] + ([] if b is None else [g.const(f"{prefix}b", b)]), attrs)
        return g.add(Op.SQUEEZE, [y], {"axes": (2,)})

    return build


def _padded_conv1d(w: np.ndarray, before: int, after: int, **attrs: Any) -> Any:
    """``Pad`` of the length by ``before`` and ``after``, then :func:`_conv1d` (``padding="same"`` with an even kernel:
    torch pads less before than after)."""
    def build(g, x, rng):
        padded = g.add(Op.PAD, [x["x"]], {"pads": (0, 0, before, 0, 0, after), "mode": "constant", "value": 0.0})
        return _conv1d(w, **attrs)(g, {"x": padded}, rng)

    return build


def _padded_conv2d(g, x, rng):
    """A 2 x 4 kernel, ``padding="same"``: H padded 0 / 1, W 1 / 2, then ``Conv2d`` without padding."""
    padded = g.add(Op.PAD, [x["x"]], {"pads": (0, 0, 0, 1, 0, 0, 1, 2), "mode": "constant", "value": 0.0})
    return g.add(Op.CONV2D, [padded, g.const("w", _conv_w(5, 3, 2, 4))], {})


def _conv_transpose1d(g, x, rng):
    """``ConvTranspose2d`` over ``x`` and ``w`` with a unit axis 2, then that axis squeezed (``conv_transpose1d``)."""
    x4 = g.add(Op.UNSQUEEZE, [x["x"]], {"axes": (2,)})
    w4 = g.add(Op.UNSQUEEZE, [g.const("w", _conv_w(4, 3, 3))], {"axes": (2,)})
    y = g.add(Op.CONV_TRANSPOSE2D, [x4, w4, g.const("b", _conv_w(3))],
              {"stride": (1, 2), "padding": (0, 1), "output_padding": (0, 1)})
    return g.add(Op.SQUEEZE, [y], {"axes": (2,)})


_TUBE_W, _TUBE_B = _conv_w(5, 3, 2, 4, 4), _conv_w(5)


def _tubelets(g, x, rng):
    """A video's tubelet embedding (``conv3d``, depth kernel 2 = depth stride) as ``Conv2d`` over the tubelets
    folded into the batch and their two frames into the channels."""
    y = g.add(Op.RESHAPE, [x["x"]], {"shape": (0, 3, 2, 2, 8, 8)})
    y = g.add(Op.RESHAPE, [g.add(Op.TRANSPOSE, [y], {"perm": (0, 2, 1, 3, 4, 5)})], {"shape": (-1, 6, 8, 8)})
    w = g.add(Op.RESHAPE, [g.const("w", _TUBE_W)], {"shape": (5, 6, 4, 4)})
    y = g.add(Op.CONV2D, [y, w, g.const("b", _TUBE_B)], {"stride": (4, 4), "padding": (0, 0), "dilation": (1, 1)})
    y = g.add(Op.RESHAPE, [y], {"shape": (-1, 2, 5, 2, 2)})
    return g.add(Op.TRANSPOSE, [y], {"perm": (0, 2, 1, 3, 4)})


_FRAME_W = _conv_w(5, 3, 1, 3, 3)


def _framewise(g, x, rng):
    """``conv3d(padding="same")`` of a one-frame kernel (a video block's spatial convolution): ``Conv2d`` over
    the frames folded into the batch (one-frame tubelets), padded by 1."""
    y = g.add(Op.RESHAPE, [x["x"]], {"shape": (0, 3, 4, 1, 6, 6)})
    y = g.add(Op.RESHAPE, [g.add(Op.TRANSPOSE, [y], {"perm": (0, 2, 1, 3, 4, 5)})], {"shape": (-1, 3, 6, 6)})
    w = g.add(Op.RESHAPE, [g.const("w", _FRAME_W)], {"shape": (5, 3, 3, 3)})
    y = g.add(Op.CONV2D, [y, w], {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)})
    y = g.add(Op.RESHAPE, [y], {"shape": (-1, 4, 5, 6, 6)})
    return g.add(Op.TRANSPOSE, [y], {"perm": (0, 2, 1, 3, 4)})


def _strided_twice(g, x, rng):
    """Two strided conv1d over a dynamic length (Wav2Vec2's feature extractor), then the length
    used as a value: flattened into ``[batch, 5 * (((seq+3)//4)+1)]`` (the IR writes the nested
    floor division as one). Both lengths stay above 1 from ``seq = 3`` up, where torch.export
    would specialize."""
    first = _conv1d(_conv_w(6, 4, 3), stride=(1, 2), padding=(0, 1))(g, x, rng)
    second = _conv1d(_conv_w(5, 6, 1), _conv_w(5), "second_", stride=(1, 2), padding=(0, 1))(g, {"x": first}, rng)
    assert first.shape == ("batch", 6, "((seq+1)//2)"), first.shape  # floor((seq+2-3)/2)+1
    assert second.shape == ("batch", 5, "((seq+3)//4)+1"), second.shape  # floor((((seq+1)//2)+2-1)/2)+1
    return g.add(Op.RESHAPE, [second], {"shape": ("batch", dim_product([5, second.shape[2]]))})


def _baddbmm(alpha: float) -> Any:
    """``c + alpha * (a @ b)``."""

    def build(g, x, rng):
        y = g.add(Op.MUL, [g.add(Op.MATMUL, [x["a"], x["b"]]), g.const("alpha", np.asarray(alpha, np.float32))])
        return g.add(Op.ADD, [y, x["c"]])

    return build


CASES = [
    # ------------------------------------------------------------------ Linear
    Case("linear_2d_bias", {"x": In(("batch", 6))}, op(Op.LINEAR, "x", _W46, _B4), linear_ref(_W46, _B4)),
    Case("linear_2d", {"x": In(("batch", 6))}, op(Op.LINEAR, "x", _W46), linear_ref(_W46)),
    Case("linear_3d_bias", {"x": In(("batch", "seq", 6))}, op(Op.LINEAR, "x", _W46, _B4), linear_ref(_W46, _B4)),
    Case("linear_weight_input", {"x": In(("batch", "seq", 6)), "w": In((4, 6))}, op(Op.LINEAR, "x", "w"),
         lambda x, w: F.linear(x.double(), w.double()).float()),
    Case("linear_2d_weight_input_bias", {"x": In(("batch", 6)), "w": In((4, 6))}, op(Op.LINEAR, "x", "w", _B4),
         lambda x, w: F.linear(x.double(), w.double(), f64(_B4)).float()),
    # ------------------------------------------------------------------ MatMul
    Case("matmul_batched", {"a": In(("batch", 3, "seq", 5)), "b": In(("batch", 3, 5, 2))}, op(Op.MATMUL, "a", "b"),
         lambda a, b: torch.matmul(a.double(), b.double()).float()),
    Case("matmul_broadcast_const", {"a": In(("batch", "seq", 5))}, op(Op.MATMUL, "a", _M53),
         lambda a: torch.matmul(a.double(), f64(_M53)).float()),
    Case("matmul_vector_right", {"a": In(("batch", "seq", 5))}, op(Op.MATMUL, "a", _V5),
         lambda a: torch.matmul(a.double(), f64(_V5)).float()),
    Case("matmul_vector_left", {"b": In(("batch", 5, "seq"))}, op(Op.MATMUL, _V5, "b"),
         lambda b: torch.matmul(f64(_V5), b.double()).float()),
    # ------------------------------------------------------------------ Conv2d
    conv("conv_plain", _conv_w(6, 4, 3, 3), _conv_w(6)),
    conv("conv_no_bias", _conv_w(6, 4, 3, 3)),
    conv("conv_stride", _conv_w(6, 4, 3, 3), stride=(2, 1)),
    conv("conv_padding", _conv_w(6, 4, 3, 2), _conv_w(6), padding=(1, 2)),
    conv("conv_dilation", _conv_w(6, 4, 3, 3), dilation=(2, 1), padding=(2, 1)),
    conv("conv_groups", _conv_w(6, 2, 3, 3), _conv_w(6), groups=2),
    conv("conv_depthwise", _conv_w(4, 1, 3, 3), _conv_w(4), groups=4, padding=(1, 1)),
    conv("conv_depthwise_x2", _conv_w(8, 1, 3, 3), groups=4),
    conv("conv_all", _conv_w(6, 2, 3, 3), _conv_w(6), stride=(2, 3), padding=(1, 2), dilation=(1, 2), groups=2),
    conv("conv_1x1_dynamic_hw", _conv_w(3, 4, 1, 1), x=In(("batch", 4, "seq", "kv"))),
    # ------------------------------------------------------------------ ConvTranspose2d
    deconv("deconv_plain", _conv_w(4, 3, 3, 3), _conv_w(3)),
    deconv("deconv_stride_padding", _conv_w(4, 6, 3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)),
    deconv("deconv_groups_dilation", _conv_w(4, 3, 2, 3), _conv_w(6), groups=2, dilation=(2, 1), padding=(1, 1)),
    # DPT's reassemble: a kernel the size of the stride upsamples by it, over dynamic H and W
    deconv("deconv_upsample_dynamic_hw", _conv_w(4, 2, 4, 4), _conv_w(2), stride=(4, 4), x=In(("batch", 4, "seq", "kv")),
           capture=True),
    # ------------------------------------------------------------------ captured ATen forms
    Case("conv1d", {"x": In(("batch", 4, 11))}, _conv1d(_conv_w(6, 4, 3), _conv_w(6), stride=(1, 2), padding=(0, 1)),
         lambda x: F.conv1d(x, torch.from_numpy(_conv_w(6, 4, 3)), torch.from_numpy(_conv_w(6)), 2, 1),
         tol=1e-4, capture=("conv1d.default",)),
    Case("conv1d_strided_twice_dynamic_length", {"x": In(("batch", 4, "seq"))}, _strided_twice,
         lambda x: F.conv1d(F.conv1d(x, torch.from_numpy(_conv_w(6, 4, 3)), None, 2, 1),
                            torch.from_numpy(_conv_w(5, 6, 1)), torch.from_numpy(_conv_w(5)), 2, 1).reshape(x.shape[0], -1),
         tol=1e-4, dim_min={"seq": 3}, capture=("conv1d.default",)),
    Case("conv1d_same_groups", {"x": In(("batch", 4, 9))}, _conv1d(_conv_w(4, 2, 3), padding=(0, 2), dilation=(1, 2), groups=2),
         lambda x: F.conv1d(x, torch.from_numpy(_conv_w(4, 2, 3)), None, 1, "same", 2, 2),
         tol=1e-4, capture=("conv1d.padding",)),
    # LASR's depthwise convolution: an even kernel, "same" padding split 1 before, 2 after
    Case("conv1d_same_even_kernel", {"x": In(("batch", 4, "seq"))}, _padded_conv1d(_conv_w(4, 1, 4), 1, 2, groups=4),
         lambda x: F.conv1d(x, torch.from_numpy(_conv_w(4, 1, 4)), None, 1, "same", 1, 4),
         tol=1e-4, capture=("conv1d.padding",)),
    Case("conv2d_same_even_kernel", {"x": In(("batch", 3, 6, 7))}, _padded_conv2d,
         lambda x: F.conv2d(x, torch.from_numpy(_conv_w(5, 3, 2, 4)), None, 1, "same"),
         tol=1e-4, capture=("conv2d.padding",)),
    Case("convolution_1d", {"x": In(("batch", 4, 11))}, _conv1d(_conv_w(6, 4, 3), _conv_w(6), padding=(0, 1)),
         lambda x: torch.ops.aten.convolution(x, torch.from_numpy(_conv_w(6, 4, 3)), torch.from_numpy(_conv_w(6)), [1], [1],
                                              [1], False, [0], 1),
         tol=1e-4, capture=("convolution.default",)),
    Case("conv_transpose1d", {"x": In(("batch", 4, "seq"))}, _conv_transpose1d,
         lambda x: F.conv_transpose1d(x, torch.from_numpy(_conv_w(4, 3, 3)), torch.from_numpy(_conv_w(3)), 2, 1, 1),
         tol=1e-4, capture=("conv_transpose1d.default",)),
    Case("convolution_transposed_1d", {"x": In(("batch", 4, "seq"))}, _conv_transpose1d,
         lambda x: torch.ops.aten.convolution(x, torch.from_numpy(_conv_w(4, 3, 3)), torch.from_numpy(_conv_w(3)), [2], [1],
                                              [1], True, [1], 1),
         tol=1e-4, capture=("convolution.default",)),
    Case("conv3d_tubelets", {"x": In(("batch", 3, 4, 8, 8))}, _tubelets,
         lambda x: F.conv3d(x, torch.from_numpy(_TUBE_W), torch.from_numpy(_TUBE_B), (2, 4, 4)),
         tol=1e-4, capture=("conv3d.default",)),
    Case("conv3d_same_one_frame_kernel", {"x": In(("batch", 3, 4, 6, 6))}, _framewise,
         lambda x: F.conv3d(x, torch.from_numpy(_FRAME_W), None, 1, "same"), tol=1e-4, capture=("conv3d.padding",)),
    # ------------------------------------------------------------------ a mixture of experts' layer
    Case("expert_linear", {"x": In(("batch", 6)), "ids": In(("batch",), "int64", "index:4")},
         op(Op.EXPERT_LINEAR, "x", _EXPERTS, "ids"),
         lambda x, ids: torch.einsum("si,soi->so", x, torch.from_numpy(_EXPERTS)[ids]), tol=1e-5),
    Case("expert_linear_transposed", {"x": In(("batch", 6)), "ids": In(("batch",), "int64", "index:4")},
         op(Op.EXPERT_LINEAR, "x", _EXPERTS_T, "ids", transposed=1),
         lambda x, ids: torch.einsum("si,sio->so", x, torch.from_numpy(_EXPERTS_T)[ids]), tol=1e-5),
    Case("baddbmm", {"c": In(("batch", 1, "seq")), "a": In(("batch", 3, 5)), "b": In(("batch", 5, "seq"))},
         _baddbmm(0.5), lambda c, a, b: torch.baddbmm(c, a, b, beta=1.0, alpha=0.5), tol=1e-5,
         capture=("baddbmm.default",)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)


_CONV3D = {  # (weight [O, C/groups, kt, kh, kw], bias, keyword arguments of F.conv3d); x is [batch, 4, frames, 6, 7]
    "overlapping_time_padded": (_conv_w(5, 4, 3, 3, 3), _conv_w(5), {"padding": 1}),
    "depth_stride_below_kernel": (_conv_w(5, 4, 2, 1, 1), None, {}),
    "strided": (_conv_w(6, 4, 3, 3, 3), _conv_w(6), {"stride": (2, 2, 1), "padding": (1, 1, 0)}),
    "dilated_grouped": (_conv_w(6, 2, 2, 3, 1), _conv_w(6), {"dilation": (2, 1, 1), "groups": 2, "padding": (2, 1, 0)}),
    "same": (_conv_w(4, 4, 3, 2, 3), None, {"padding": "same"}),
}


_DECONV3D = {  # (weight [C, O/groups, kt, kh, kw], bias, keyword arguments of F.conv_transpose3d); x [batch, 4, T, 5, 6]
    "plain": (_conv_w(4, 3, 3, 3, 3), _conv_w(3), {}),
    "strided_padded": (_conv_w(4, 2, 3, 3, 2), _conv_w(2), {"stride": (2, 2, 1), "padding": (1, 1, 0),
                                                           "output_padding": (1, 0, 0)}),
    "dilated_grouped": (_conv_w(4, 3, 2, 1, 3), None, {"stride": (3, 1, 2), "dilation": (2, 1, 1), "groups": 2,
                                                        "padding": (1, 0, 1)}),
    "upsampling_time": (_conv_w(4, 5, 4, 1, 1), _conv_w(5), {"stride": (2, 1, 1), "padding": (1, 0, 0)}),
}


_VIDEO = [(F.conv3d, name, (6, 6, 7), ((1, 5), (3, 9), (2, 4))) for name in _CONV3D] + \
    [(F.conv_transpose3d, name, (4, 5, 6), ((1, 3), (3, 7), (2, 2))) for name in _DECONV3D]


@pytest.mark.parametrize(("conv", "name", "example", "runs"), _VIDEO, ids=[f"{c.__name__}-{n}" for c, n, *_ in _VIDEO])
def test_three_d_convolutions_over_any_number_of_frames(conv, name: str, example: tuple[int, ...],
                                                        runs: tuple[tuple[int, int], ...]) -> None:
    """Any 3-D convolution (a video VAE's: overlapping windows in time, time padding, strides, dilation, groups,
    "same" padding) and 3-D transposed convolution (strides, padding, output padding, dilation, groups) over a
    dynamic number of frames, against torch in float64 on the numpy reference, ONNX Runtime and TorchScript, at
    frame counts other than the example's (tubelets keep their own form, the table above)."""
    from flora_graph.frontend import capture
    from flora_graph.runtimes.executable import compile
    from flora_graph.runtimes.reference import run

    w, b, kw = (_CONV3D if conv is F.conv3d else _DECONV3D)[name]
    weight, bias = torch.from_numpy(w), None if b is None else torch.from_numpy(b)

    class M(torch.nn.Module):
        def forward(self, x):
            return conv(x, weight, bias, **kw)

    frames0, h, wd = example
    graph = capture(M(), torch.randn(2, 4, frames0, h, wd), {"x": {0: "batch", 2: "frames"}})
    backends = [compile(graph, "onnxruntime"), compile(graph, "torchscript")]
    for batch, frames in runs:
        x = torch.randn(batch, 4, frames, h, wd, generator=torch.Generator().manual_seed(frames))
        want = conv(x.double(), weight.double(), None if bias is None else bias.double(), **kw).float().numpy()
        for got in (run(graph, {"x": x.numpy()}), *(fn(x=x.numpy()) for fn in backends)):
            assert got["output"].shape == want.shape
            np.testing.assert_allclose(got["output"], want, rtol=1e-4, atol=1e-4)
