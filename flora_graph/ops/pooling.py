"""Pooling, resizing and sampling: ``MaxPool2d``, ``AvgPool2d``, ``Resize``, ``GridSample``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. All take NCHW input, ``Resize`` with static
spatial dims. Windows follow torch (symmetric padding; floor mode, or with ``ceil_mode=1`` torch's ceil
mode: one more window where the last would cover part of the input, none starting in the right
padding). ONNX Runtime's ``ceil_mode`` agrees with torch's, but ``onnx``'s shape inference does not
where a window would start in the padding, so the lowering writes ceil mode over static sizes as floor
mode over extra right padding instead (exact for max pooling and for an average that excludes the
padding or has none; an average that counts its padding in ceil mode is refused by the shape rule
where it gains a window). A dynamic H or W pools in floor mode, or in ceil mode where no window can
start past the input (no padding, windows at least as long as their stride: Funnel's pooling of its
sequence), which ONNX's own ``ceil_mode`` then counts alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import Dim, add_dims, canonical_dim, floor_divide_dim, format_shape, window_count
from flora_graph.ops._infer import same_float_dtype
from flora_graph.ops._onnx import dims_tensor
from flora_graph.ops._torch import ints
from flora_graph.ops.registry import define

__all__ = ["ceil_adds_counted_window", "ceil_window_count"]

_POOL_ATTRS = {
    "kernel": AttrSpec("ints", required=True),
    "stride": AttrSpec("ints", required=True),
    "padding": AttrSpec("ints", (0, 0)),
    "ceil_mode": AttrSpec("int", 0),
}


def _check_nchw(what: str, x, *, static: bool = True) -> None:
    if len(x) != 4 or (static and _dynamic_hw(x)):
        raise ShapeError(f"{what} needs x [N, C, H, W]{' with static H and W' if static else ''}, got {format_shape(x)}")


def _infer_pool(what: str, x, attrs, dilation=(1, 1)):
    ceil = bool(attrs.get("ceil_mode", 0))
    _check_nchw(what, x, static=False)  # a dynamic H or W has ((H+2p-d(k-1)-1)//s)+1 positions (floor mode)
    for name in ("kernel", "stride", "padding"):
        if len(attrs[name]) != 2:
            raise ShapeError(f"{what}: {name} must have 2 values, got {attrs[name]}")
    if ceil and _dynamic_hw(x) and not _ceil_native(attrs, dilation):
        raise ShapeError(f"{what}: ceil mode over a dynamic H or W needs padding 0 and windows at least as long as "
                         f"their stride, got {format_shape(x)} with kernel {tuple(attrs['kernel'])}, stride "
                         f"{tuple(attrs['stride'])}, padding {tuple(attrs['padding'])}")
    out = []
    for size, k, s, p, d in zip(x[2:], attrs["kernel"], attrs["stride"], attrs["padding"], dilation, strict=True):
        if min(k, s, d) < 1 or p < 0 or 2 * p > k:
            raise ShapeError(f"{what}: kernel, stride, dilation must be >= 1 and 0 <= padding <= kernel / 2")
        try:
            out.append(ceil_window_count(size, k, s, p, d) if ceil else window_count(size, k, s, p, d))
        except ShapeError as e:
            raise ShapeError(f"{what}: {e}") from None
    return (x[0], x[1], *out)


def _dynamic_hw(shape) -> bool:
    """Whether NCHW ``shape`` has a dynamic H or W."""
    return not all(isinstance(d, int) for d in shape[2:])


def _ceil_native(attrs, dilation=(1, 1)) -> bool:
    """Whether ceil mode's windows need no correction: no padding, and each window (``d (k - 1) + 1`` long) at least
    as long as its stride, so that none starts past the input. ONNX's ``ceil_mode`` then counts torch's windows at any
    size, a dynamic one too, and a window's taps inside the input are all it averages."""
    return not any(attrs["padding"]) and all(d * (k - 1) + 1 >= s for k, s, d in
                                             zip(attrs["kernel"], attrs["stride"], dilation, strict=True))


def ceil_window_count(size: Dim, kernel: int, stride: int, padding: int, dilation: int = 1) -> Dim:
    """torch's ceil-mode window count: ``ceil((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1``,
    less one where the last window would start in the right padding. At least 1 where a window
    starts inside the input, however short the input (``ShapeError`` otherwise). A dynamic ``size`` is
    a floor-division dim, for the windows :func:`_ceil_native` takes (no padding, none shorter than its stride)."""
    span = dilation * (kernel - 1) + 1
    if not isinstance(size, int):  # padding 0, span >= stride (_ceil_native): ceil((size - span) / stride) + 1,
        # which is (size - span + stride - 1) // stride + 1
        return add_dims(floor_divide_dim(canonical_dim(f"{canonical_dim(size)}-{span - stride + 1}"), stride), 1)
    n = -(-(size + 2 * padding - span) // stride) + 1
    if (n - 1) * stride >= size + padding:
        n -= 1
    if n < 1:
        raise ShapeError(f"input size {size} gives no window of kernel {kernel} (stride {stride}, padding {padding})")
    return n


def _ceil_extra(x_shape, attrs, dilation=(1, 1)) -> tuple[int, int]:
    """The right padding beyond ``padding`` that makes floor mode count ceil mode's windows (0 in floor mode)."""
    if not attrs.get("ceil_mode", 0) or _dynamic_hw(x_shape):
        return (0, 0)  # floor mode; or a dynamic size, which ONNX's own ceil mode pools (_ceil_native)
    extra = []
    for size, k, s, p, d in zip(x_shape[2:], attrs["kernel"], attrs["stride"], attrs["padding"], dilation, strict=True):
        n = ceil_window_count(size, k, s, p, d)
        extra.append(max(0, (n - 1) * s + d * (k - 1) + 1 - size - 2 * p))
    return extra[0], extra[1]


def _windows(x: np.ndarray, kernel, stride, padding, dilation, fill: float) -> np.ndarray:
    """``[N, C, Ho, Wo, kh, kw]`` windows of ``x`` padded with ``fill``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


# --------------------------------------------------------------------------- MaxPool2d
def _infer_max_pool(shapes, dtypes, attrs):
    if len(attrs["dilation"]) != 2:
        raise ShapeError(f"MaxPool2d: dilation must have 2 values, got {attrs['dilation']}")
    return _infer_pool("MaxPool2d", shapes[0], attrs, attrs["dilation"]), same_float_dtype(dtypes)


def _numpy_max_pool(x: np.ndarray, *, kernel, stride, padding, dilation, ceil_mode: int = 0) -> np.ndarray:
    if ceil_mode:
        return _ceil_pool(x, kernel, stride, padding, dilation)
    return _windows(x, kernel, stride, padding, dilation, -np.inf).max(axis=(4, 5))


def _ceil_pool(x: np.ndarray, kernel, stride, padding, dilation, count_include_pad: int | None = None):
    """Ceil-mode pooling, one output position at a time over the window's taps inside the input (a window
    may reach past the padded input): their max, or, ``count_include_pad`` given, their average, divided as torch does:
    by the taps inside the padded input, or with ``count_include_pad=0`` inside the input."""
    counts = [ceil_window_count(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation,
                                                                         strict=True)]
    out = np.empty((*x.shape[:2], *counts), np.float64 if count_include_pad is not None else x.dtype)

    def taps(i: int, axis: int) -> tuple[slice, int]:
        size, k, s, p, d = x.shape[2 + axis], kernel[axis], stride[axis], padding[axis], dilation[axis]
        first = i * s - p
        padded_end = min(first + d * (k - 1) + 1, size + p)  # torch's window end, clipped to the padded input
        lo = first if first >= 0 else first + ((d - 1 - first) // d) * d  # the first tap at or after 0
        hi = min(padded_end, size)
        return slice(lo, max(lo, hi), d), (padded_end - first + d - 1) // d

    for i in range(counts[0]):
        rows, nh = taps(i, 0)
        for j in range(counts[1]):
            cols, nw = taps(j, 1)
            win = x[:, :, rows, cols]
            if count_include_pad is None:
                out[:, :, i, j] = win.max(axis=(2, 3))
            else:
                div = nh * nw if count_include_pad else win.shape[2] * win.shape[3]
                out[:, :, i, j] = win.astype(np.float64).sum(axis=(2, 3)) / div
    return out


def _onnx_ceil(node: ComputationNode) -> dict[str, int]:
    """``ceil_mode=1`` where ceil mode pools a dynamic H or W (:func:`_ceil_native` windows); nothing where the lowering
    writes ceil mode as floor mode over extra right padding (static sizes) or the node pools in floor mode."""
    return {"ceil_mode": 1} if node.attrs.get("ceil_mode", 0) and _dynamic_hw(node.inputs[0].shape) else {}


def _onnx_max_pool(ctx: Any, node: ComputationNode, out: str) -> None:
    (ph, pw), a = node.attrs["padding"], node.attrs
    eh, ew = _ceil_extra(node.inputs[0].shape, a, a["dilation"])
    ctx.emit("MaxPool", ctx.args(node), [out], kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
             pads=[ph, pw, ph + eh, pw + ew], dilations=list(a["dilation"]), **_onnx_ceil(node))


def _torch_ceil_pad(node: ComputationNode, x: str, dilation=(1, 1)) -> str | None:
    """Where ceil mode pools a dynamic H or W: ``F.pad``'s right padding of ``x`` that makes floor mode count its
    windows (``-(size - span) % stride`` per axis, which torch.export keeps symbolic; its ceil mode guards the window
    that would start past the input, and fixes the size); else ``None``."""
    a = node.attrs
    if not a.get("ceil_mode", 0) or not _dynamic_hw(node.inputs[0].shape):
        return None
    (sh, sw), (kh, kw), (dh, dw) = a["stride"], a["kernel"], dilation
    return (f"[0, (-({x}.shape[3] - {dw * (kw - 1) + 1})) % {sw}, "
            f"0, (-({x}.shape[2] - {dh * (kh - 1) + 1})) % {sh}]")


def _torch_max_pool(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    if (pad := _torch_ceil_pad(node, args[0], a["dilation"])) is not None:  # no padding of its own (_ceil_native)
        return (f"F.max_pool2d(F.pad({args[0]}, {pad}, value=float('-inf')), {ints(a['kernel'])}, "
                f"{ints(a['stride'])}, 0, {ints(a['dilation'])})")
    return (f"F.max_pool2d({args[0]}, {ints(a['kernel'])}, {ints(a['stride'])}, {ints(a['padding'])}, "
            f"{ints(a['dilation'])}, {bool(a['ceil_mode'])})")


define(
    "MAX_POOL2D", "MaxPool2d", (1, 1), {**_POOL_ATTRS, "dilation": AttrSpec("ints", (1, 1))},
    infer=_infer_max_pool, doc="NCHW max pooling (floor or ceil mode), padding with -inf (torch max_pool2d, ONNX MaxPool).",
    numpy=_numpy_max_pool, onnx=_onnx_max_pool, torch=_torch_max_pool,
)


# --------------------------------------------------------------------------- AvgPool2d
def ceil_adds_counted_window(x_shape, attrs) -> bool:
    """Whether an ``AvgPool2d`` of ``attrs`` over ``x_shape`` counts its padding and ceil mode gives it a window
    floor mode would not: the one form its ONNX lowering cannot write (ONNX divides that window by padding torch
    leaves out)."""
    return bool(attrs.get("count_include_pad", 1) and any(attrs["padding"]) and any(_ceil_extra(x_shape, attrs)))


def _infer_avg_pool(shapes, dtypes, attrs):
    out = _infer_pool("AvgPool2d", shapes[0], attrs)
    if ceil_adds_counted_window(shapes[0], attrs):
        raise ShapeError("AvgPool2d: ceil mode with count_include_pad=1 and padding gains a window that ONNX's "
                         "AveragePool divides otherwise than torch")
    return out, same_float_dtype(dtypes)


def _numpy_avg_pool(x: np.ndarray, *, kernel, stride, padding, count_include_pad: int, ceil_mode: int = 0) -> np.ndarray:
    if ceil_mode:
        return _ceil_pool(x, kernel, stride, padding, (1, 1), int(count_include_pad))
    x64 = x.astype(np.float64)
    total = _windows(x64, kernel, stride, padding, (1, 1), 0.0).sum(axis=(4, 5))
    if count_include_pad or not any(padding):
        return total / (kernel[0] * kernel[1])
    ones = np.ones((1, 1, *x.shape[2:]))
    count = _windows(ones, kernel, stride, padding, (1, 1), 0.0).sum(axis=(4, 5))
    return total / count


def _onnx_avg_pool(ctx: Any, node: ComputationNode, out: str) -> None:
    (ph, pw), a = node.attrs["padding"], node.attrs
    eh, ew = _ceil_extra(node.inputs[0].shape, a)
    ceil = _onnx_ceil(node)
    # the extra padding of ceil mode is never counted: with no other padding, count_include_pad changes nothing;
    # ONNX's own ceil mode (no padding) divides a window by its taps inside the input, as torch does, only without it
    cip = int(a["count_include_pad"]) if not (eh or ew or ceil) else 0
    ctx.emit("AveragePool", ctx.args(node), [out], kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
             pads=[ph, pw, ph + eh, pw + ew], count_include_pad=cip, **ceil)


def _torch_avg_pool(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    if (pad := _torch_ceil_pad(node, args[0])) is not None:  # no padding of its own: each window's taps inside x
        k, st, x = ints(a["kernel"]), ints(a["stride"]), args[0]
        ones = f"F.pad(torch.ones_like({x}), {pad})"
        return f"(F.avg_pool2d(F.pad({x}, {pad}), {k}, {st}) / F.avg_pool2d({ones}, {k}, {st}))"
    return (f"F.avg_pool2d({args[0]}, {ints(a['kernel'])}, {ints(a['stride'])}, {ints(a['padding'])}, "
            f"{bool(a['ceil_mode'])}, {bool(a['count_include_pad'])})")


define(
    "AVG_POOL2D", "AvgPool2d", (1, 1), {**_POOL_ATTRS, "count_include_pad": AttrSpec("int", 1)},
    infer=_infer_avg_pool,
    doc="NCHW average pooling (floor or ceil mode); count_include_pad=0 divides by the unpadded count "
        "(ONNX AveragePool).",
    numpy=_numpy_avg_pool, onnx=_onnx_avg_pool, torch=_torch_avg_pool,
)


# --------------------------------------------------------------------------- Resize
def _infer_resize(shapes, dtypes, attrs):
    _check_nchw("Resize", shapes[0])
    size = attrs["size"]
    if len(size) != 2 or min(size) < 1:
        raise ShapeError(f"Resize: size must be 2 positive ints, got {size}")
    if attrs["mode"] == "nearest" and attrs["align_corners"]:
        raise ShapeError("Resize: align_corners needs mode 'linear'")
    if attrs.get("antialias") and (attrs["mode"] == "nearest" or attrs["align_corners"]):
        raise ShapeError("Resize: antialias needs mode 'linear' or 'cubic' without align_corners")
    if attrs["mode"] == "cubic" and not attrs.get("antialias"):
        raise ShapeError("Resize: mode 'cubic' is antialiased (torch's plain bicubic decomposes before capture)")
    return (*shapes[0][:2], *size), same_float_dtype(dtypes)


_AA_CUBIC_A = -0.5
"""The bicubic constant of torch's antialiased bicubic (PIL's), where its plain bicubic uses -0.75."""


def _triangle(t: np.ndarray) -> np.ndarray:
    return np.clip(1 - np.abs(t), 0, None)


def _keys_cubic(t: np.ndarray, a: float = _AA_CUBIC_A) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t < 1, near, np.where(t < 2, far, 0.0))


def _antialias_weights(out: int, size: int, mode: str = "linear") -> np.ndarray:
    """torch's antialiased weights ``[out, size]`` along one axis (``_upsample_bilinear2d_aa``,
    ``_upsample_bicubic2d_aa``): a triangle (``linear``) or Keys cubic filter (``cubic``, ``a = -0.5``) centred on
    ``scale * (i + 0.5)``, its support (1 or 2 input positions) widened by the scale when shrinking, over the
    input positions whose centres it reaches, normalized to sum 1."""
    scale = size / out
    filt, reach = (_triangle, 1.0) if mode == "linear" else (_keys_cubic, 2.0)
    support = reach * scale if scale >= 1 else reach
    inv = 1 / scale if scale >= 1 else 1.0
    w = np.zeros((out, size))
    for i in range(out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # C++'s truncation toward zero, as torch computes it
        hi = min(int(center + support + 0.5), size)
        taps = filt((np.arange(lo, hi) - center + 0.5) * inv)
        if taps.sum():
            w[i, lo:hi] = taps / taps.sum()
    return w


def _source(out: int, size: int, mode: str, align_corners: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's source indices ``i0``, ``i1`` and weight of ``i1`` for ``out`` outputs along one axis of ``size``."""
    dst = np.arange(out, dtype=np.float64)
    if mode == "nearest":
        i0 = np.minimum(np.floor(dst * (size / out)).astype(np.int64), size - 1)
        return i0, i0, np.zeros(out)
    if align_corners:
        src = dst * ((size - 1) / (out - 1)) if out > 1 else np.zeros(out)
    else:
        src = np.maximum((dst + 0.5) * (size / out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size - 1)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, src - i0


def _numpy_resize(x: np.ndarray, *, size, mode: str, align_corners: int, antialias: int = 0) -> np.ndarray:
    y = x.astype(np.float64)
    if antialias:  # separable: H then W, each a matrix of weights
        y = np.einsum("oh,nchw->ncow", _antialias_weights(int(size[0]), x.shape[2], mode), y)
        return np.einsum("ow,nchw->ncho", _antialias_weights(int(size[1]), x.shape[3], mode), y)
    for axis, (out, n) in enumerate(zip(size, x.shape[2:], strict=True), start=2):
        i0, i1, lam = _source(int(out), n, mode, align_corners)
        shape = [1] * 4
        shape[axis] = -1
        lam = lam.reshape(shape)
        y = np.take(y, i0, axis=axis) * (1 - lam) + np.take(y, i1, axis=axis) * lam
    return y


def _onnx_resize(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Resize`` to ``sizes``: nearest as asymmetric + floor, linear as pytorch_half_pixel or align_corners."""
    a = node.attrs
    x = node.inputs[0]
    sizes = dims_tensor(ctx, [*x.shape[:2], *a["size"]], node, "sizes")
    if a["mode"] == "nearest":
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        ctm = "align_corners" if a["align_corners"] else "pytorch_half_pixel"
        attrs = {"mode": a["mode"], "coordinate_transformation_mode": ctm}
        if a.get("antialias"):  # opset 18 (the lowering's least); torch's filter drops the taps outside the input
            attrs.update(antialias=1, coordinate_transformation_mode="half_pixel", exclude_outside=1)
            if a["mode"] == "cubic":
                attrs.update(cubic_coeff_a=_AA_CUBIC_A)
    ctx.emit("Resize", [ctx.arg(node, 0), "", "", sizes], [out], **attrs)


def _torch_resize(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    if a["mode"] == "nearest":
        return f"F.interpolate({args[0]}, {ints(a['size'])}, mode='nearest')"
    aa = ", antialias=True" if a.get("antialias") else ""
    mode = "bicubic" if a["mode"] == "cubic" else "bilinear"
    return f"F.interpolate({args[0]}, {ints(a['size'])}, mode='{mode}', align_corners={bool(a['align_corners'])}{aa})"


define(
    "RESIZE", "Resize", (1, 1),
    {
        "size": AttrSpec("ints", required=True),
        "mode": AttrSpec("str", "nearest", choices=("nearest", "linear", "cubic")),
        "align_corners": AttrSpec("int", 0),
        "antialias": AttrSpec("int", 0),
    },
    infer=_infer_resize,
    doc="NCHW resize of H, W to size: torch's nearest (floor of dst * in / out) or bilinear (ONNX Resize); "
        "antialias: torch's antialiased bilinear or bicubic (mode 'cubic', antialiased only: a triangle or Keys "
        "a = -0.5 filter widened when shrinking).",
    numpy=_numpy_resize, onnx=_onnx_resize, torch=_torch_resize,
)


# --------------------------------------------------------------------------- GridSample
_CUBIC_A = -0.75  # torch's and ONNX's bicubic convolution constant


def _infer_grid_sample(shapes, dtypes, attrs):
    x, grid = shapes
    if len(x) != 4 or len(grid) != 4 or grid[3] != 2 or canonical_dim(x[0]) != canonical_dim(grid[0]):
        raise ShapeError(f"GridSample needs x [N, C, H, W] and grid [N, Ho, Wo, 2], got {format_shape(x)} and "
                         f"{format_shape(grid)}")
    return (x[0], x[1], grid[1], grid[2]), same_float_dtype(dtypes)


def _unnormalize(coord: np.ndarray, size: int, align_corners: int) -> np.ndarray:
    """A grid coordinate in [-1, 1] as a pixel coordinate (torch's ``grid_sampler_unnormalize``)."""
    return (coord + 1) / 2 * (size - 1) if align_corners else ((coord + 1) * size - 1) / 2


def _reflect(coord: np.ndarray, twice_low: int, twice_high: int) -> np.ndarray:
    """``coord`` reflected into ``[twice_low / 2, twice_high / 2]`` (torch's ``reflect_coordinates``)."""
    if twice_low == twice_high:
        return np.zeros_like(coord)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    coord = np.abs(coord - low)
    extra, flips = np.fmod(coord, span), np.floor(coord / span)
    return np.where(flips % 2 == 0, extra + low, span - extra + low)


def _padded(coord: np.ndarray, size: int, padding_mode: str, align_corners: int) -> np.ndarray:
    """A pixel coordinate after the padding mode (torch's ``compute_coordinates``): zeros leaves it."""
    if padding_mode == "zeros":
        return coord
    if padding_mode == "reflection":
        coord = _reflect(coord, 0, 2 * (size - 1)) if align_corners else _reflect(coord, -1, 2 * size - 1)
    return np.clip(coord, 0, size - 1)


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    """The 4 bicubic weights of the taps at -1, 0, 1, 2 from the floor, for the fraction ``t``."""
    a = _CUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _numpy_grid_sample(x: np.ndarray, grid: np.ndarray, *, mode: str, padding_mode: str,
                       align_corners: int) -> np.ndarray:
    """torch's ``grid_sampler_2d``: ``out[n, c, i, j]`` is ``x[n, c]`` read at ``grid[n, i, j] = (x, y)``."""
    n, _, h, w = x.shape
    data = x.astype(np.float64)
    batch = np.arange(n).reshape(n, 1, 1)

    def read(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:  # [N, Ho, Wo] int pixels -> [N, C, Ho, Wo], 0 outside
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = data[batch, :, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]  # [N, Ho, Wo, C]
        return np.moveaxis(vals, -1, 1) * inside[:, None]

    gx = _unnormalize(grid[..., 0].astype(np.float64), w, align_corners)
    gy = _unnormalize(grid[..., 1].astype(np.float64), h, align_corners)
    if mode == "cubic":  # taps around the unpadded point, each tap's pixel padded on its own
        x0, y0 = np.floor(gx), np.floor(gy)
        wx, wy = _cubic_weights(gx - x0), _cubic_weights(gy - y0)
        out = np.zeros((n, x.shape[1], *grid.shape[1:3]))
        for j in range(4):
            ty = _padded(y0 - 1 + j, h, padding_mode, align_corners).astype(np.int64)
            for i in range(4):
                tx = _padded(x0 - 1 + i, w, padding_mode, align_corners).astype(np.int64)
                out += read(ty, tx) * (wx[i] * wy[j])[:, None]
        return out
    gx, gy = _padded(gx, w, padding_mode, align_corners), _padded(gy, h, padding_mode, align_corners)
    if mode == "nearest":  # round half to even, as torch's nearbyint
        return read(np.rint(gy).astype(np.int64), np.rint(gx).astype(np.int64))
    x0, y0 = np.floor(gx), np.floor(gy)
    tx, ty = (gx - x0)[:, None], (gy - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    return (read(y0, x0) * (1 - tx) * (1 - ty) + read(y0, x0 + 1) * tx * (1 - ty)
            + read(y0 + 1, x0) * (1 - tx) * ty + read(y0 + 1, x0 + 1) * tx * ty)


_ONNX_OLD_MODES = {"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}  # GridSample before opset 20


def _onnx_grid_sample(ctx: Any, node: ComputationNode, out: str) -> None:
    a = node.attrs
    mode = a["mode"] if ctx.opset >= 20 else _ONNX_OLD_MODES[a["mode"]]
    ctx.emit("GridSample", ctx.args(node), [out], mode=mode, padding_mode=a["padding_mode"],
             align_corners=int(a["align_corners"]))


def _torch_grid_sample(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    return (f"F.grid_sample({args[0]}, {args[1]}, mode={_ONNX_OLD_MODES[a['mode']]!r}, "
            f"padding_mode={a['padding_mode']!r}, align_corners={bool(a['align_corners'])})")


define(
    "GRID_SAMPLE", "GridSample", (2, 2),
    {
        "mode": AttrSpec("str", "linear", choices=("linear", "nearest", "cubic")),
        "padding_mode": AttrSpec("str", "zeros", choices=("zeros", "border", "reflection")),
        "align_corners": AttrSpec("int", 0),
    },
    infer=_infer_grid_sample,
    doc="x [N, C, H, W] read at grid [N, Ho, Wo, 2] ((x, y) in [-1, 1]): bilinear, nearest or bicubic, outside "
        "points padded with zeros, the border or a reflection (torch grid_sample, ONNX GridSample).",
    numpy=_numpy_grid_sample, onnx=_onnx_grid_sample, torch=_torch_grid_sample,
)
