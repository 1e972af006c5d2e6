"""capture() of the Core ATen ops whose converters compose existing IR ops, against eager torch.

Each row is a tiny module over one op (the Core ATen overload called directly, or the torch
function that torch.export keeps whole); it is captured once (a dynamic ``batch`` where the row
names one), its converters' runs are recorded, and the graph is run on the numpy reference and on
every backend at two other sizes, against eager torch. Ops that only appear in graphs that are not
functionalized (``atan2.out``, ``_native_batch_norm_legit``) and the size reads are converted from
``make_fx`` graphs through :func:`convert_fx_graph`. New IR ops have rows in ``tests/ops`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from flora_graph.errors import RuntimeInputError, UnsupportedOpError
from flora_graph.frontend import ATEN_TABLE, capture
from flora_graph.frontend.capture import convert_fx_graph
from flora_graph.ir import Graph
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile

from ..ops.harness import aten_overload

aten = torch.ops.aten
_BIAS = torch.arange(32, dtype=torch.float32).reshape(4, 8)
_ROW = torch.tensor([1.0, -2.0, 3.0, -4.0])


def _put_inner(x: torch.Tensor) -> torch.Tensor:
    """``y[:, mask] = row`` over a mask of the middle axis (T5Gemma 2's end-of-image embedding is the leading form)."""
    y = x.clone()
    y[:, x[0, :, 0] > 0] = _ROW
    return y
BACKENDS = ("onnxruntime", "torchscript", "torch-export")
EXAMPLE, RUNS = 3, (2, 5)  # the batch size captured, and the two it runs at


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int) -> Callable[[int, int], torch.Tensor]:
    """Standard-normal values; ``-1`` in ``shape`` is the batch."""
    return lambda b, seed: torch.randn(*(b if d == -1 else d for d in shape), generator=_gen(seed))


def randint(high: int, *shape: int, low: int = 0) -> Callable[[int, int], torch.Tensor]:
    return lambda b, seed: torch.randint(low, high, tuple(b if d == -1 else d for d in shape), generator=_gen(seed))


def fixed(t: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return lambda b, seed: t


@dataclass
class Row:
    name: str
    fn: Callable[..., Any]
    inputs: list[Callable[[int, int], torch.Tensor]]  # (batch, seed) -> an input
    targets: tuple[str, ...]  # the overloads ("avg_pool3d.default") whose converters must run
    batch: dict[int, int] = field(default_factory=dict)  # input index -> its axis named "batch"
    tol: float = 1e-5


_W = torch.randn(10, 3, generator=_gen(11))
_FLOAT8_VALUES = torch.cat([torch.tensor([0.0, -0.0, 2**-9, 2**-10, 3 * 2**-10, 1.0, 1.0625, 1.1875, 2.0, 240.0, 448.0,
                                          460.0, 1e4, -3.3, 2**-6, 0.0151, 1e-12, 61440.0 / 128, 70000.0 / 128]),
                            torch.randn(45, generator=_gen(12)) * 40]).reshape(4, 16)
_FLOAT8_SCALE = torch.linspace(0.5, 2.0, 16)
_OFFSETS = torch.tensor([0, 2, 2])  # bags [0, 2), [] and [2, end)

ROWS = [
    # ------------------------------------------------------------------ norms (DoRA's column norms), x.T
    Row("linalg_vector_norm", lambda x: torch.linalg.vector_norm(x, 3.0, dim=(1, 2)), [randn(-1, 4, 5)],
        ("linalg_vector_norm.default",), {0: 0}),
    Row("linalg_vector_norm_inf", lambda x: torch.linalg.vector_norm(x, float("-inf"), dim=-1, keepdim=True),
        [randn(-1, 4, 5)], ("linalg_vector_norm.default",), {0: 0}),
    Row("linalg_norm_rows", lambda x: torch.linalg.norm(x, dim=1), [randn(-1, 6)], ("linalg_norm.default",), {0: 0}),
    Row("linalg_norm_frobenius", lambda x: torch.linalg.norm(x, dim=(1, 2)), [randn(-1, 3, 4)],
        ("linalg_norm.default",), {0: 0}),
    Row("norm_p1", lambda x: aten.norm.ScalarOpt_dim(x, 1, [1], True), [randn(-1, 6)], ("norm.ScalarOpt_dim",), {0: 0}),
    Row("norm_all", lambda x: x * aten.norm.Scalar(x, 2), [randn(-1, 6)], ("norm.Scalar",), {0: 0}),
    Row("numpy_T", lambda x: aten.numpy_T(x), [randn(-1, 3, 4)], ("numpy_T.default",), {0: 0}),
    # ------------------------------------------------------------------ pooling: 1-D as 2-D, 3-D as two 2-D
    Row("avg_pool1d", lambda x: aten.avg_pool1d(x, [3], [2], [1], False, False), [randn(-1, 4, 9)],
        ("avg_pool1d.default",), {0: 0}),
    Row("avg_pool1d_unbatched", lambda x: aten.avg_pool1d(x, [2]), [randn(4, 9)], ("avg_pool1d.default",)),
    Row("adaptive_avg_pool1d", lambda x: aten.adaptive_avg_pool1d(x, [3]), [randn(-1, 4, 9)],
        ("adaptive_avg_pool1d.default",), {0: 0}),
    Row("adaptive_avg_pool1d_global", lambda x: aten.adaptive_avg_pool1d(x, [1]), [randn(-1, 4, 9)],
        ("adaptive_avg_pool1d.default",), {0: 0}),
    Row("avg_pool3d", lambda x: F.avg_pool3d(x, 3, (2, 1, 2), 1, count_include_pad=False), [randn(-1, 2, 5, 6, 7)],
        ("avg_pool3d.default",), {0: 0}),
    Row("avg_pool3d_unbatched", lambda x: F.avg_pool3d(x, (3, 2, 3), (2, 1, 2), (1, 1, 0)), [randn(2, 5, 6, 7)],
        ("avg_pool3d.default",)),
    Row("max_pool3d", lambda x: F.max_pool3d(x, (2, 3, 2), (1, 2, 2), (1, 1, 0), (2, 1, 1)), [randn(-1, 2, 5, 6, 7)],
        ("max_pool3d.default",), {0: 0}),
    Row("max_pool3d_with_indices", lambda x: aten.max_pool3d_with_indices(x, [2, 2, 2])[0], [randn(-1, 2, 4, 6, 5)],
        ("max_pool3d_with_indices.default",), {0: 0}),
    Row("adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, (5, 3, 7)), [randn(-1, 2, 5, 6, 7)],
        ("adaptive_avg_pool3d.default",), {0: 0}),
    Row("_adaptive_avg_pool3d_global", lambda x: aten._adaptive_avg_pool3d(x, [1, 1, 1]), [randn(-1, 2, 5, 6, 7)],
        ("_adaptive_avg_pool3d.default",), {0: 0}),
    # adaptive windows that do not tile the input: torch's overlapping windows, one axis after the other
    Row("adaptive_avg_pool3d_windows", lambda x: F.adaptive_avg_pool3d(x, (2, 4, 3)), [randn(-1, 2, 5, 6, 7)],
        ("adaptive_avg_pool3d.default",), {0: 0}),
    Row("adaptive_avg_pool2d_windows", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), [randn(-1, 3, 7, 5)],
        ("adaptive_avg_pool2d.default",), {0: 0}),
    Row("adaptive_avg_pool1d_windows", lambda x: aten.adaptive_avg_pool1d(x, [4]), [randn(-1, 4, 9)],
        ("adaptive_avg_pool1d.default",), {0: 0}),
    Row("adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (3, 4)), [randn(-1, 3, 6, 8)],
        ("adaptive_max_pool2d.default",), {0: 0}),
    Row("adaptive_max_pool2d_windows", lambda x: F.adaptive_max_pool2d(x, (4, 3)), [randn(-1, 3, 7, 5)],
        ("adaptive_max_pool2d.default",), {0: 0}),
    Row("adaptive_max_pool2d_global", lambda x: F.adaptive_max_pool2d(x, 1), [randn(-1, 3, 7, 5)],
        ("adaptive_max_pool2d.default",), {0: 0}),
    Row("adaptive_max_pool1d_windows", lambda x: F.adaptive_max_pool1d(x, 4), [randn(-1, 3, 10)],
        ("adaptive_max_pool2d.default",), {0: 0}),
    # ------------------------------------------------------------------ one-sided clamps, square, log-sigmoid (RWKV, xLSTM)
    Row("clamp_min", lambda x: aten.clamp_min(x, 0.25), [randn(-1, 6)], ("clamp_min.default",), {0: 0}),
    Row("clamp_max_tensor", lambda x, m: aten.clamp_max.Tensor(x, m), [randn(-1, 6), randn(6)],
        ("clamp_max.Tensor",), {0: 0}),
    Row("clamp_max", lambda x: aten.clamp_max(x, -0.25), [randn(-1, 6)], ("clamp_max.default",), {0: 0}),
    Row("clamp_min_tensor", lambda x, m: aten.clamp_min.Tensor(x, m), [randn(-1, 6), randn(6)],
        ("clamp_min.Tensor",), {0: 0}),
    Row("square", lambda x: torch.square(x * 3), [randn(-1, 6)], ("square.default",), {0: 0}, tol=0),
    Row("log_sigmoid", lambda x: F.logsigmoid(x * 40), [randn(-1, 7)], ("log_sigmoid.default",), {0: 0}),
    # ------------------------------------------------------------------ ops torch.export would otherwise decompose by a retrace
    Row("softplus", lambda x: F.softplus(x * 8, beta=2.0, threshold=5.0), [randn(-1, 7)], ("softplus.default",), {0: 0}),
    Row("logsumexp", lambda x: torch.logsumexp(torch.where(x > 1.2, float("-inf"), x * 50), 1), [randn(-1, 6, 3)],
        ("logsumexp.default",), {0: 0}),
    Row("logsumexp_keepdim", lambda x: torch.logsumexp(x, (0, 2), keepdim=True), [randn(-1, 6, 3)],
        ("logsumexp.default",), {0: 0}),
    Row("floor_divide", lambda x, n: torch.floor_divide(x * 7, 2.5) + torch.floor_divide(n, 3), [randn(-1, 6),
                                                                                                randint(20, 6, low=-20)],
        ("floor_divide.default",), {0: 0}),
    Row("floor_divide_scalar", lambda x: aten.floor_divide.Scalar(x * 7, -2.5), [randn(-1, 6)],
        ("floor_divide.Scalar",), {0: 0}),
    Row("new_empty_filled", lambda x: aten.new_empty(x, [2, 3]).fill_(2.5) + x[:2, :3], [randn(-1, 6)],
        ("new_empty.default",), {0: 0}),
    Row("concat", lambda x: torch.concat([x, x * 2], 1) + torch.concatenate([x, x], 1), [randn(-1, 4)],
        ("concat.default", "concatenate.default"), {0: 0}),
    Row("movedim", lambda x: x.movedim(1, -1) * 2, [randn(-1, 3, 4, 5)], ("movedim.int",), {0: 0}),
    # complex values through to.dtype_layout / to.device (the complex table's converters: the real ones must not run)
    Row("complex_to_dtype_layout", lambda x: torch.view_as_real(
        (c := aten.to.dtype_layout(torch.view_as_complex(x), dtype=torch.complex64)) * c), [randn(-1, 3, 2)],
        ("view_as_complex.default",), {0: 0}),
    Row("complex_to_device", lambda x: torch.view_as_real(
        torch.view_as_complex(x).to(device=x.device, dtype=torch.complex64) * 3), [randn(-1, 3, 2)],
        ("view_as_complex.default",), {0: 0}),
    # ------------------------------------------------------------------ scans and statistics
    Row("logcumsumexp", lambda x: torch.logcumsumexp(x, 1), [randn(-1, 7)], ("logcumsumexp.default",), {0: 0}),
    Row("logcumsumexp_wide", lambda x: torch.logcumsumexp(torch.where(x > 0.8, float("-inf"), x * 200), -1),
        [randn(-1, 3, 9)], ("logcumsumexp.default",), {0: 0}, tol=1e-4),  # exp(200) overflows float32 unshifted
    # cummax / cummin: ties (whole numbers) go to the later index, as torch's loop keeps them
    Row("cummax", lambda x: torch.cat([t.float() for t in torch.cummax(x.round(), 1)], 1), [randn(-1, 7)],
        ("cummax.default",), {0: 0}),
    Row("cummin_inner", lambda x: torch.cat([t.float() for t in torch.cummin(x.round(), 1)], 1), [randn(-1, 9, 2)],
        ("cummin.default",), {0: 0}),
    Row("cummax_values_int", lambda x: torch.cummax(x, -1).values.float(), [randint(5, -1, 6, low=-3)],
        ("cummax.default",), {0: 0}),
    Row("var_mean", lambda x: torch.cat(torch.var_mean(x, 1, keepdim=True), 1), [randn(-1, 7)],
        ("var_mean.correction",), {0: 0}),
    Row("std_mean", lambda x: torch.stack(torch.std_mean(x, (1, 2), correction=0)), [randn(-1, 3, 4)],
        ("std_mean.correction",), {0: 0}),
    # ------------------------------------------------------------------ buckets, sliding windows
    Row("bucketize", lambda x, b: torch.bucketize(x, b).float(), [randn(-1, 7), fixed(torch.linspace(-2, 2, 9))],
        ("bucketize.Tensor",), {0: 0}),
    Row("bucketize_right_int32", lambda x, b: torch.bucketize(x.round(), b, out_int32=True, right=True).float(),
        [randn(-1, 7), fixed(torch.arange(-2.0, 3.0))], ("bucketize.Tensor",), {0: 0}),
    Row("isin", lambda x, v: torch.isin(x, v).float(), [randint(9, -1, 6), fixed(torch.tensor([[1, 4], [7, 4]]))],
        ("isin.Tensor_Tensor",), {0: 0}),
    Row("isin_invert", lambda x, v: torch.isin(x, v, invert=True).float(), [randint(9, -1, 6), fixed(torch.tensor([0, 3]))],
        ("isin.Tensor_Tensor",), {0: 0}),
    Row("isin_scalar", lambda x: torch.isin(x, 4).float(), [randint(9, -1, 6)], ("isin.Tensor_Scalar",), {0: 0}),
    Row("logit_eps", lambda x: torch.logit(torch.sigmoid(3 * x), eps=1e-2), [randn(-1, 7)], ("logit.default",), {0: 0}),
    Row("special_logit", lambda x: torch.special.logit(torch.sigmoid(x)), [randn(-1, 7)], ("special_logit.default",),
        {0: 0}, tol=1e-4),
    Row("true_divide", lambda x, y: torch.true_divide(x, y.abs() + 1), [randn(-1, 7), randn(-1, 7)],
        ("true_divide.Tensor",), {0: 0, 1: 0}),
    Row("index_put_mask_row", lambda x: x.index_put((x[..., 0] > 0,), _ROW), [randn(-1, 5, 4)],
        ("index_put.default",), {0: 0}),
    Row("index_put_mask_scalar_accumulate", lambda x: x.index_put((x[..., 1] > 0,), torch.tensor(2.0), accumulate=True),
        [randn(-1, 5, 4)], ("index_put.default",), {0: 0}),
    Row("index_put_mask_inner_axis", _put_inner, [randn(-1, 5, 4)], ("index_put.default",), {0: 0}),
    Row("one_hot", lambda x: F.one_hot(x, 6).float() * 2, [randint(6, -1, 5)], ("one_hot.default",), {0: 0}),
    Row("unfold_windows", lambda x: x.unfold(1, 3, 2), [randn(-1, 9, 2)], ("unfold.default",), {0: 0}),
    Row("unfold_last", lambda x: x.unfold(-1, 4, 1), [randn(-1, 3, 6)], ("unfold.default",), {0: 0}),
    # windows along the dynamic axis itself (Inkling 2's short convolutions over a sequence padded by k - 1)
    # 8-bit floats (Kolibri 1.1's NVFP4 scales): subnormals, ties to even, e4m3fn saturating, e5m2 past its range
    Row("to_float8_e4m3fn", lambda x: (x * _FLOAT8_SCALE).to(torch.float8_e4m3fn).float(), [fixed(_FLOAT8_VALUES)],
        ("to.dtype",)),
    Row("to_float8_e5m2", lambda x: (x * _FLOAT8_SCALE * 128).to(torch.float8_e5m2).float(), [fixed(_FLOAT8_VALUES)],
        ("to.dtype",)),
    Row("copysign", lambda a, b: torch.copysign(a, b), [randn(-1, 6), fixed(torch.tensor([1.0, -2.0, 0.0, -0.0, 3.0, -1.0]))],
        ("copysign.Tensor",), {0: 0}),
    Row("copysign_scalar", lambda x: torch.copysign(x, -0.0), [randn(-1, 6)], ("copysign.Scalar",), {0: 0}),
    Row("unfold_dynamic", lambda x: F.pad(x, (0, 0, 2, 0)).unfold(0, 3, 1), [randn(-1, 4)],
        ("unfold.default",), {0: 0}),
    # grids (Deformable DETR's reference points): over the dynamic batch, ij and xy, a 0-D input among them
    Row("meshgrid_ij", lambda a, b: sum(g * (k + 1) for k, g in enumerate(torch.meshgrid(a, b, indexing="ij"))),
        [randn(-1), randn(5)], ("meshgrid.indexing",), {0: 0}),
    Row("meshgrid_default", lambda a, b: torch.stack(aten.meshgrid.default([a, b])).prod(0), [randn(3), randn(-1)],
        ("meshgrid.default",), {1: 0}),
    Row("meshgrid_xy", lambda a, b, c: torch.stack(torch.meshgrid(a, b, c, indexing="xy")).sum(0) * 2,
        [randn(4), randn(-1), fixed(torch.tensor(1.5))], ("meshgrid.indexing",), {1: 0}),
    # bool masks multiplied and added (Mask2Former's): ONNX's Mul and Add take no bool, And and Or do
    Row("mul_bool", lambda x: ((x > 0) * (x < 1)).float(), [randn(-1, 6)], ("mul.Tensor",), {0: 0}),
    Row("add_bool", lambda x: ((x > 1) + (x < -1)).float(), [randn(-1, 6)], ("add.Tensor",), {0: 0}),
    # an axis rounded down to whole windows, cut back to the input's length (DAC's decoded audio): the whole axis
    Row("slice_rounded_down", lambda x, w: F.conv_transpose1d(F.conv1d(torch.cat([x] * 4, -1), w, stride=3), w,
                                                             stride=3)[..., : 4 * x.shape[-1]],
        [randn(2, 1, -1), randn(1, 1, 3)], ("slice.Tensor",), {0: 2}),
    # ------------------------------------------------------------------ 3-D transposed convolution (a video decoder's)
    Row("conv_transpose3d", lambda x, w: F.conv_transpose3d(x, w, stride=(2, 1, 2), padding=1), [randn(-1, 3, 3, 4, 4),
        randn(3, 2, 3, 3, 3)], ("conv_transpose3d.input",), {0: 0}, tol=1e-4),
    # ------------------------------------------------------------------ circular padding (padding_mode="circular")
    Row("pad_circular", lambda x: F.pad(x, (1, 2, 2, 0), mode="circular"), [randn(-1, 3, 4, 5)], ("pad.default",), {0: 0}),
    Row("conv2d_circular", lambda x, w: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w),
        [randn(-1, 3, 5, 6), randn(4, 3, 3, 3)], ("pad.default",), {0: 0}, tol=1e-4),
    # ------------------------------------------------------------------ normalization with batch statistics
    Row("batch_norm_no_stats", lambda x, w, b: aten._native_batch_norm_legit.no_stats(x, w, b, True, 0.1, 1e-3),
        [randn(-1, 3, 4, 5), randn(3), randn(3)], ("_native_batch_norm_legit.no_stats",), {0: 0}, tol=1e-4),
    Row("batch_norm_functional", lambda x, rm, rv: aten._native_batch_norm_legit_functional(x, None, None, rm, rv, True, 0.2, 1e-5),
        [randn(-1, 3, 7), randn(3), lambda b, seed: torch.rand(3, generator=_gen(seed)) + 0.5],
        ("_native_batch_norm_legit_functional.default",), {0: 0}, tol=1e-4),
    Row("batch_norm_training_without_stats", lambda x: F.batch_norm(x, None, None, training=True),
        [randn(-1, 3, 4, 5)], ("batch_norm.default",), {0: 0}, tol=1e-4),
    Row("instance_norm", lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-3),
        [randn(-1, 3, 4, 5), randn(3), randn(3)], ("instance_norm.default",), {0: 0}, tol=1e-4),
    # ------------------------------------------------------------------ distances
    *(Row(f"cdist_p{p}", lambda a, b, p=p: torch.cdist(a, b, p=p), [randn(-1, 5, 3), randn(-1, 4, 3)], ("cdist.default",),
          {0: 0, 1: 0}, tol=1e-4) for p in (0.0, 1.0, 2.0, 3.0, float("inf"))),
    Row("_cdist_forward", lambda a, b: aten._cdist_forward(a, b, 2.0, None), [randn(-1, 3), randn(4, 3)],
        ("_cdist_forward.default",), {0: 0}, tol=1e-4),
    Row("pdist", lambda a: F.pdist(a, 1.5), [randn(6, 3)], ("pdist.default",), tol=1e-4),
    Row("_pdist_forward", lambda a: aten._pdist_forward(a, 2.0), [randn(6, 3)], ("_pdist_forward.default",), tol=1e-4),
    # ------------------------------------------------------------------ narrow: a static window (PE-Audio's rotary tables
    # halved), and the first rows of a dynamic length
    Row("narrow_static", lambda x: x.narrow(-1, 1, 3) * 2, [randn(-1, 6)], ("narrow.default",), {0: 0}),
    Row("narrow_dynamic", lambda x: torch.cat([2 * x, x]).narrow(0, 0, x.shape[0]), [randn(-1, 4)],
        ("narrow.default",), {0: 0}),
    # ------------------------------------------------------------------ tensor_split: at a dynamic index (Bailing's
    # [seq - kept], whose last piece may be empty), and into sections
    Row("tensor_split_indices", lambda x: torch.cat(torch.tensor_split(torch.cat([x, 2 * x]), [x.shape[0], 2 * x.shape[0]])
                                                    [::-1]), [randn(-1, 4)], ("tensor_split.indices",), {0: 0}),
    Row("tensor_split_sections", lambda x: torch.cat(torch.tensor_split(x, 3, dim=1)[::-1], dim=1), [randn(-1, 7)],
        ("tensor_split.sections",), {0: 0}),
    # ------------------------------------------------------------------ indexing
    Row("masked_scatter", lambda x, m, s: x.masked_scatter(m, s),
        [randn(-1, 6), lambda b, seed: torch.rand(6, generator=_gen(seed)) > 0.4, randn(-1, 6)],
        ("masked_scatter.default",), {0: 0, 2: 0}),
    Row("scatter_reduce_amax_without_self", lambda x, i, s: x.scatter_reduce(1, i, s, "amax", include_self=False),
        [randn(-1, 5), randint(5, -1, 4), randn(-1, 4)], ("scatter_reduce.two",), {0: 0, 1: 0, 2: 0}),
    Row("index_add_repeated_positions", lambda x, s: x.index_add(1, torch.tensor([3, 0, 3, 1]), s, alpha=0.5),
        [randn(-1, 5, 2), randn(-1, 4, 2)], ("index_add.default",), {0: 0, 1: 0}),
    Row("index_add_dynamic_rows", lambda x, i, s: x.index_add(0, i, s), [randn(4, 3), randint(4, -1), randn(-1, 3)],
        ("index_add.default",), {1: 0, 2: 0}),
    Row("scatter_reduce_mean", lambda x, i, s: x.scatter_reduce(0, i, s, "mean"),
        [randn(-1, 3), randint(2, 4, 3), randn(4, 3)], ("scatter_reduce.two",), {0: 0}),
    Row("scatter_reduce_mean_int_without_self", lambda x, i, s: x.scatter_reduce(1, i, s, "mean", include_self=False),
        [randint(9, -1, 5, low=-9), randint(5, -1, 6), randint(9, -1, 6, low=-9)], ("scatter_reduce.two",), {0: 0, 1: 0, 2: 0}),
    Row("scatter_reduce_sum_without_self", lambda x, i, s: x.scatter_reduce(1, i, s, "sum", include_self=False),
        [randn(-1, 5), randint(5, -1, 4), randn(-1, 4)], ("scatter_reduce.two",), {0: 0, 1: 0, 2: 0}),
    Row("embedding_bag_mean_padding", lambda i, o: F.embedding_bag(i, _W, o, mode="mean", padding_idx=-1),
        [randint(10, -1), fixed(_OFFSETS)], ("embedding_bag.padding_idx",), {0: 0}),
    Row("embedding_bag_sum_weighted", lambda i, o, p: F.embedding_bag(i, _W, o, mode="sum", per_sample_weights=p),
        [randint(10, -1), fixed(_OFFSETS), randn(-1)], ("embedding_bag.padding_idx",), {0: 0, 2: 0}),
    Row("embedding_bag_2d", lambda i: F.embedding_bag(i, _W, mode="max"), [randint(10, -1, 3)],
        ("embedding_bag.padding_idx",), {0: 0}),
    Row("_embedding_bag_max_last_offset", lambda i, o: aten._embedding_bag(_W, i, o, False, 2, False, None, True, 3)[0],
        [randint(10, 7), fixed(torch.tensor([0, 3, 3, 7]))], ("_embedding_bag.default",)),
    Row("col2im", lambda x: F.fold(x, (6, 7), (2, 3), dilation=(2, 1), padding=(1, 2), stride=(2, 3)),
        [randn(-1, 12, 9)], ("col2im.default",), {0: 0}),
    Row("col2im_unbatched", lambda x: F.fold(x, (4, 5), 2), [randn(8, 12)], ("col2im.default",)),
    # ------------------------------------------------------------------ movement
    Row("as_strided_windows", lambda x: x.as_strided((3, 4, 3), (6, 1, 2), 1), [randn(4, 6)], ("as_strided.default",)),
    Row("as_strided_of_a_transpose", lambda x: x.t().as_strided((2, 3), (1, 6)) * 2, [randn(4, 6)],
        ("as_strided.default",)),
    Row("as_strided_reshape", lambda x: x.as_strided((x.shape[0], 3, 2), (6, 2, 1)), [randn(-1, 6)],
        ("as_strided.default",), {0: 0}),
    Row("view_as", lambda x, y: x.view_as(y) * y, [randn(-1, 6), randn(-1, 2, 3)], ("view_as.default",), {0: 0, 1: 0}),
    Row("reshape_as_of_a_transpose", lambda x, y: x.transpose(1, 2).reshape_as(y) + y, [randn(-1, 3, 2), randn(-1, 6)],
        ("reshape_as.default",), {0: 0, 1: 0}),
    # a start counted back from the end by a dynamic size (LFM2's mask[:, -seq:]): batch - batch of 2*batch
    Row("slice_back_by_a_dim", lambda x: torch.cat([x, x * 2])[-x.shape[0]:], [randn(-1, 3)], ("slice.Tensor",), {0: 0}),
    # a start whose expression has one value over the dim's range (MPT's max(0, 1 - seq))
    Row("slice_start_of_one_value", lambda x: x[torch.sym_max(0, 1 - x.shape[0]):] * 3, [randn(-1, 3)],
        ("mul.Tensor",), {0: 0}),
    # ------------------------------------------------------------------ complex values (as real pairs): the rotary of
    # DeepSeek-V2 and Llama 4, a complex x real tensor, a slice and an unsqueeze counted from the complex tensor's end
    Row("polar_rotary", lambda x, t: torch.view_as_real(
        torch.view_as_complex(x.reshape(x.shape[0], 3, 4, 2)) * (torch.polar(torch.ones_like(t), t) * 0.5)[None]).flatten(2),
        [randn(-1, 3, 8), randn(3, 4)], ("polar.default", "view_as_complex.default", "view_as_real.default"), {0: 0}),
    # ------------------------------------------------------------------ FFTs (frontend/aten/spectral.py): FNet's token
    # mixing, one-sided spectra and their inverses, every normalization, a transform over the dynamic batch axis
    Row("fftn_real_part", lambda x: torch.fft.fftn(x, dim=(1, 2)).real, [randn(-1, 5, 6)], ("_fft_c2c.default",),
        {0: 0}, tol=1e-4),
    Row("rfft_ortho", lambda x: torch.view_as_real(torch.fft.rfft(x, norm="ortho")), [randn(-1, 3, 8)],
        ("_fft_r2c.default",), {0: 0}, tol=1e-4),
    Row("rfft2_then_irfft2_odd", lambda x, w: torch.fft.irfft2(torch.fft.rfft2(x) * w, s=(4, 7)),
        [randn(-1, 4, 7), randn(4, 4)], ("_fft_r2c.default", "_fft_c2r.default"), {0: 0}, tol=1e-4),
    Row("irfft_forward_norm", lambda x: torch.fft.irfft(torch.view_as_complex(x), n=6, norm="forward"),
        [randn(-1, 4, 2)], ("_fft_c2r.default",), {0: 0}, tol=1e-4),
    Row("ifftn_over_the_batch", lambda x: torch.view_as_real(torch.fft.ifftn(torch.view_as_complex(x), dim=(0, 1))),
        [randn(-1, 3, 2)], ("_fft_c2c.default",), {0: 0}, tol=1e-4),
    Row("fftn_ortho_over_the_batch", lambda x: torch.view_as_real(torch.fft.fftn(x, dim=(0, 1), norm="ortho")),
        [randn(-1, 3)], ("_fft_c2c.default",), {0: 0}, tol=1e-4),
    Row("hfft_of_a_conjugate", lambda x: torch.fft.hfft(torch.view_as_complex(x)), [randn(-1, 5, 2)],
        ("_fft_c2r.default",), {0: 0}, tol=1e-4),
    Row("rfft_magnitudes", lambda x: torch.fft.rfft(x).abs(), [randn(-1, 9)], ("_fft_r2c.default",),
        {0: 0}, tol=1e-4),
    Row("complex_times_real_sliced", lambda x, r: torch.view_as_real(
        (torch.view_as_complex(x) * r)[..., 1:].unsqueeze(-1)), [randn(-1, 3, 4, 2), randn(3, 4)],
        ("view_as_complex.default", "view_as_real.default"), {0: 0}),
    # ------------------------------------------------------------------ creation and aliases
    Row("empty", lambda x: torch.empty(x.shape).fill_(1.5) + x, [randn(-1, 3)], ("empty.memory_format",), {0: 0}),
    Row("empty_strided", lambda x: torch.empty_strided(x.shape, (1, x.shape[0])).fill_(2.0) + x, [randn(-1, 3)],
        ("empty_strided.default",), {0: 0}),
    Row("empty_like", lambda x: torch.empty_like(x).fill_(0.5) * x, [randn(-1, 3)], ("empty_like.default",), {0: 0}),
    Row("native_dropout_eval", lambda x: aten.native_dropout(x, 0.3, False), [randn(-1, 3)],
        ("native_dropout.default",), {0: 0}),
    # XLNet's -torch.eye(qlen) over a dynamic length; a rectangular one; Flux's torch.outer(positions, omega)
    Row("eye_of_a_dynamic_size", lambda x: -torch.eye(x.shape[0], dtype=x.dtype) + x[:, :1], [randn(-1, 3)],
        ("eye.default",), {0: 0}),
    Row("eye_rectangular", lambda x: torch.eye(x.shape[0], 3) * x, [randn(-1, 3)], ("eye.m",), {0: 0}),
    Row("outer", lambda x, y: torch.outer(x[:, 1], y), [randn(-1, 3), randn(4)], ("outer.default",), {0: 0}),
    Row("ger", lambda x, y: aten.ger(y, x[:, 0]), [randn(-1, 3), randn(4)], ("ger.default",), {0: 0}),
    # a fill by a 0-d tensor (BART writes its decoder's start token so, ids[:, 0] = start)
    Row("fill_by_a_tensor", lambda x: aten.fill.Tensor(x, x[1, 2]) - x, [randn(-1, 3)], ("fill.Tensor",), {0: 0}),
]
"""The rows; ``CORE_TARGETS`` are the converters they run."""

CORE_TARGETS = {aten_overload(t) for row in ROWS for t in row.targets} | {
    aten.atan2.out, aten._native_batch_norm_legit.default}
"""The overloads the rows and the ``make_fx`` tests exercise (``test_capture.py`` counts them as exercised)."""


def _module(fn: Callable[..., Any], n: int) -> nn.Module:
    names = [f"x{i}" for i in range(n)]
    namespace: dict[str, Any] = {"fn": fn}
    exec(f"def forward(self, {', '.join(names)}):\n    return fn({', '.join(names)})\n", namespace)
    return type("Core", (nn.Module,), {"forward": namespace["forward"]})()


def _eager(fn: Callable[..., Any], inputs: list[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = fn(*inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _assert_close(got: dict[str, np.ndarray], want: list[np.ndarray], tol: float, what: str) -> None:
    assert len(got) == len(want), what
    for (name, g), w in zip(got.items(), want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, name, g.dtype, w.dtype, g.shape, w.shape)
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=f"{what} {name}")


def _recorded(targets: set[Any]) -> tuple[set[Any], dict[Any, Any]]:
    """``targets``' converters wrapped to record their runs: (the hits, the saved converters to restore)."""
    hits: set[Any] = set()
    saved = {t: ATEN_TABLE[t] for t in targets}

    def wrap(target: Any, conv: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            hits.add(target)
            return conv(*args, **kwargs)

        return recorded

    ATEN_TABLE.update({t: wrap(t, c) for t, c in saved.items()})
    return hits, saved


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_captured_core_op_matches_eager_on_every_backend(row: Row) -> None:
    example = [make(EXAMPLE, 0) for make in row.inputs]
    dims = {f"x{i}": {axis: "batch"} for i, axis in row.batch.items()}
    targets = {aten_overload(t) for t in row.targets}
    hits, saved = _recorded(targets)
    try:
        graph = capture(_module(row.fn, len(example)), tuple(example), dims or None)
    finally:
        ATEN_TABLE.update(saved)
    assert hits == targets, f"{row.name}: converters of {sorted(map(str, targets - hits))} did not run"
    exes = {backend: compile(graph, backend) for backend in BACKENDS}
    for k, b in enumerate(RUNS if row.batch else (EXAMPLE,)):
        inputs = [make(b, k + 1) for make in row.inputs]
        feeds = {f"x{i}": t.numpy() for i, t in enumerate(inputs) if f"x{i}" in {n.name for n in graph.inputs}}
        want = _eager(row.fn, inputs)
        _assert_close(run(graph, feeds), want, row.tol, f"{row.name} reference at batch {b}")
        for backend, exe in exes.items():
            _assert_close(exe(feeds), want, row.tol, f"{row.name} {backend} at batch {b}")


# --------------------------------------------------------------------------- graphs that are not functionalized
def _converted(fn: Callable[..., Any], inputs: list[torch.Tensor], mode: str = "fake", dims: Any = None) -> Graph:
    gm = make_fx(fn, tracing_mode=mode)(*inputs)
    return convert_fx_graph(gm.graph, {}, dynamic_dims=dims)


def test_out_variant_and_in_place_batch_norm_of_unfunctionalized_graphs() -> None:
    """``atan2.out`` and ``_native_batch_norm_legit`` (eval) only reach conversion from graphs that keep
    mutations (capture functionalizes them); ``_native_batch_norm_legit`` in training is refused by name."""
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    hits, saved = _recorded({aten.atan2.out, aten._native_batch_norm_legit.default})
    try:
        g = _converted(lambda a, b: aten.atan2.out(a, b, out=torch.empty_like(a)), [a, b])
        _assert_close(run(g, {"a_1": a.numpy(), "b_1": b.numpy()}), [torch.atan2(a, b).numpy()], 1e-6, "atan2.out")
        ins = [torch.randn(2, 3, 4), torch.randn(3), torch.randn(3), torch.randn(3), torch.rand(3) + 0.5]

        def bn(x, w, b, rm, rv):
            return aten._native_batch_norm_legit(x, w, b, rm, rv, False, 0.1, 1e-5)[0]

        def bn_training(x, w, b, rm, rv):
            return aten._native_batch_norm_legit(x, w, b, rm, rv, True, 0.1, 1e-5)[0]

        g = _converted(bn, ins)
        _assert_close(run(g, {n.name: t.numpy() for n, t in zip(g.inputs, ins, strict=True)}), _eager(bn, ins), 1e-5,
                      "_native_batch_norm_legit")
        with pytest.raises(UnsupportedOpError, match="running statistics"):
            _converted(bn_training, [t.clone() for t in ins])
    finally:
        ATEN_TABLE.update(saved)
    assert hits == {aten.atan2.out, aten._native_batch_norm_legit.default}


def test_size_reads_become_dims() -> None:
    """``sym_numel`` and ``sym_stride`` (Core ATen size reads) need no converter: capture makes their values dims."""

    def fn(x):
        return x.reshape(aten.sym_numel(x)), x[0] + torch.ones(aten.sym_stride(x, 0))

    g = _converted(fn, [torch.randn(4, 3)], "symbolic", {"x_1": {0: "rows", 1: "batch"}})
    assert g.inputs[0].shape == ("rows", "batch")
    x = torch.randn(5, 7)
    _assert_close(run(g, {"x_1": x.numpy()}), _eager(fn, [x]), 1e-6, "size reads")


@pytest.mark.parametrize(("fn", "what"), [
    (lambda x: aten.max_pool3d_with_indices(x, [2, 2, 2])[1].float(), "indices"),
    (lambda x: F.avg_pool3d(x, 2, ceil_mode=True), "ceil_mode"),
    (lambda x: x[..., :2].as_strided((4, 4), (6, 1)), "outside its input"),
    (lambda x: aten.native_dropout(x, 0.5, True)[0], "training mode"),
    (lambda x: aten.embedding_bag.padding_idx(_W, torch.tensor([1, 2]), torch.tensor([0]), False, 2, False, None, False,
                                              None)[3].float().sum() + x.sum(), "max_indices"),
    (lambda x: torch.view_as_real(torch.view_as_complex(x[..., :4].contiguous().reshape(2, 3, 4, 6, 2, 2)).exp()),
     r"exp.default on complex values"),
    # a count read from the data (a graph whose sizes name no input's dim), and JetMoE's expert sizes (.tolist())
    (lambda x: x.new_ones(4) * (x > 0).long().sum().item() + x.sum(), r"^1 unsupported op\(s\): aten.item.default "
     r"\(refused, tensor as a Python number"),
    (lambda x: torch.cat([(p := x.flatten().sort().values.split(
        torch.stack([(x > 0).sum(), (x <= 0).sum()]).tolist()))[0] * 2, p[1]]).sum(),
     r"^1 unsupported op\(s\): aten.item.default \(refused"),
], ids=["pool3d_indices", "pool3d_ceil_mode", "as_strided_outside", "dropout_training",
        "embedding_bag_indices", "complex_exp", "item_count", "split_by_sizes_from_data"])
def test_unsupported_forms_are_refused_by_name(fn: Callable[..., Any], what: str) -> None:
    with pytest.raises(UnsupportedOpError, match=what):
        capture(_module(fn, 1), (torch.randn(2, 3, 4, 6, 5),))


@pytest.mark.parametrize("fn", [lambda x: F.adaptive_avg_pool3d(x, (2, 4, 3)), lambda x: F.adaptive_max_pool2d(x[:, 0], (4, 3))],
                         ids=["avg3d", "max2d"])
def test_adaptive_windows_over_a_dynamic_axis_are_refused_by_name(fn: Callable[..., Any]) -> None:
    with pytest.raises(UnsupportedOpError, match=r"dynamic|static H and W"):
        capture(_module(fn, 1), (torch.randn(2, 3, 4, 6, 5),), {"x0": {0: "batch", 4: "width"}})


def test_logcumsumexp_over_a_dynamic_axis() -> None:
    """Over a dynamic axis, ``logcumsumexp`` shifts by the axis' maximum (the exact per-prefix form needs a static
    one): within float32 tolerance where the prefixes are within ``exp``'s range of it."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.logcumsumexp(x * 5, 1)

    g = capture(_module(fn, 1), (torch.randn(2, 6),), {"x0": {0: "batch", 1: "seq"}})
    for shape in ((3, 11), (1, 2)):
        x = torch.randn(*shape, generator=_gen(shape[1]))
        _assert_close(run(g, {"x0": x.numpy()}), _eager(fn, [x]), 1e-5, "logcumsumexp dynamic")


def test_cummax_over_a_dynamic_axis() -> None:
    """Over a dynamic axis the doubling scan runs its full count of steps: each prefix's last end-of-text position
    (Qwen4-Exp's n-gram context), and the values and indices of a float prefix maximum with ties, at lengths 1 to 40."""
    def fn(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])
        last = torch.cummax(torch.where(ids == 2, positions, -1), dim=1).values
        values, indices = torch.cummax(x.round(), dim=1)
        return torch.cat([last.float(), values, indices.float()], 1)

    g = capture(_module(fn, 2), (torch.randint(0, 4, (2, 6)), torch.randn(2, 6)),
                {"x0": {0: "batch", 1: "seq"}, "x1": {0: "batch", 1: "seq"}})
    exes = {backend: compile(g, backend) for backend in BACKENDS}
    for n in (1, 2, 5, 40):
        ids, x = torch.randint(0, 4, (3, n), generator=_gen(n)), torch.randn(3, n, generator=_gen(n + 1)) * 2
        feeds, want = {"x0": ids.numpy(), "x1": x.numpy()}, _eager(fn, [ids, x])
        _assert_close(run(g, feeds), want, 0, f"cummax over {n}")
        for backend, exe in exes.items():
            _assert_close(exe(feeds), want, 0, f"cummax over {n} on {backend}")


def test_a_value_check_is_no_part_of_the_graph() -> None:
    """``torch._assert_async`` (``one_hot``'s index range, as decomposed): torch checks at trace time; no node."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        torch._assert_async((x.abs() < 1e9).all(), "values out of range")
        return x * 2

    g = capture(_module(fn, 1), (torch.randn(2, 3),), {"x0": {0: "batch"}})
    x = torch.randn(4, 3)
    _assert_close(run(g, {"x0": x.numpy()}), _eager(fn, [x]), 1e-6, "assert_async")


class _LengthsChecked(nn.Module):
    """XLM's and Flaubert's ``assert lengths.max().item() <= slen`` (a runtime assertion in the exported program): a
    value read as a number for a check alone."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(dim=1)
        torch._check(lengths.max().item() <= ids.shape[1])
        return (torch.arange(ids.shape[1])[None] < lengths[:, None]).float() * ids


def test_a_number_read_for_an_assertion_alone_is_no_part_of_the_graph() -> None:
    g = capture(_LengthsChecked(), (torch.randint(0, 4, (2, 6)),), {"ids": {0: "batch", 1: "seq"}})
    assert not any("item" in n.name for n in g.nodes)
    for backend in ("numpy", *BACKENDS[:2]):
        ids = torch.randint(0, 4, (3, 9), generator=_gen(1))
        _assert_close(compile(g, backend)({"ids": ids.numpy()}), _eager(_LengthsChecked(), [ids]), 1e-6, backend)


class _TensorChecked(nn.Module):
    """transformers' ``torch_compilable_check`` on a tensor condition while tracing (RT-DETR v2's, D-FINE's: the
    levels' sizes add up to the encoder's length): ``torch._check_tensor_all``, which torch.export records as
    ``_is_all_true``, ``item``, ``sym_ite`` and runtime assertions."""

    def forward(self, x: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        torch._check_tensor_all((shapes[:, 0] * shapes[:, 1]).sum() == x.shape[1])
        return x * shapes.sum().to(x.dtype)


def test_a_tensor_truth_read_for_an_assertion_alone_is_no_part_of_the_graph() -> None:
    shapes = torch.tensor([[2, 3], [1, 2]])
    g = capture(_TensorChecked(), (torch.randn(2, 8, 4), shapes), {"x": {0: "batch"}})
    assert not any(t in n.name for n in g.nodes for t in ("item", "is_all_true", "sym_ite"))
    x = torch.randn(3, 8, 4, generator=_gen(2))
    for backend in ("numpy", *BACKENDS[:2]):
        _assert_close(compile(g, backend)({"x": x.numpy(), "shapes": shapes.numpy()}),
                      _eager(_TensorChecked(), [x, shapes]), 1e-6, backend)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_by_a_vector_drops_the_last_axis(bias: bool) -> None:
    """``F.linear(x, w)`` with a 1-D ``w`` (D-FINE's integral of each box side's distribution over its bins): ``x @ w``,
    of shape ``x.shape[:-1]``; a 0-d bias is added."""
    w, b = torch.randn(5, generator=_gen(3)), torch.tensor(0.25)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, b if bias else None)

    g = capture(_module(fn, 1), (torch.randn(2, 3, 5),), {"x0": {0: "batch"}})
    x = torch.randn(4, 3, 5, generator=_gen(4))
    for backend in ("numpy", *BACKENDS[:2]):
        _assert_close(compile(g, backend)({"x0": x.numpy()}), _eager(fn, [x]), 1e-5, backend)


class _Chunked(nn.Module):
    """Mamba-2's chunked scan over a dynamic length: padded up to a multiple of 3, cumulated per chunk, scaled by
    the chunk count and the chunk size torch computes back from the padded length, and cut back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        y = F.pad(x, (0, 0, 0, (3 - s % 3) % 3))
        chunks = y.reshape(b, -1, 3, c)
        z = chunks.cumsum(2) * chunks.shape[1] + chunks.shape[2]
        return z.reshape(b, -1, c)[:, :s]


def test_a_length_padded_to_whole_chunks_and_cut_back() -> None:
    g = capture(_Chunked(), (torch.randn(2, 8, 4),), {"x": {0: "batch", 1: "seq"}})
    pads = [n for n in g.nodes if n.op.value == "Slice" and "//3" in str(n.attrs["ends"])]
    assert len(pads) == 1 and g.outputs["output"].shape == ("batch", "seq", 4)
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for seq in (2, 3, 7, 11):  # one chunk, exactly one, and more, with and without padding
            x = torch.randn(3, seq, 4, generator=_gen(seq))
            _assert_close(exe(x=x.numpy()), _eager(_Chunked(), [x]), 1e-5, f"{backend} seq {seq}")


class _Blocks(nn.Module):
    """PegasusX's local attention: where the length is no multiple of the block size (a branch torch.export takes
    for the example), states and mask padded by ``4 - s % 4`` (a full block more at a multiple, as the exported
    program does; the extra block is masked out), attention within each block, cut back."""

    def __init__(self, block: int = 4) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        k = self.block
        if s % k != 0:
            x = F.pad(x, (0, 0, 0, k - s % k))
            mask = F.pad(mask, (0, k - s % k), value=-1e9)
        blocks = x.view(b, x.shape[1] // k, k, c)
        scores = blocks @ blocks.transpose(-1, -2) + mask.view(b, mask.shape[1] // k, 1, k)
        return (scores.softmax(-1) @ blocks).reshape(b, x.shape[1], c)[:, :s]


def test_a_length_padded_by_a_periodic_size_and_cut_back() -> None:
    example = (torch.randn(2, 10, 4), torch.zeros(2, 10))
    g = capture(_Blocks(), example, {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}})
    assert g.dim_max == {} and g.outputs["output"].shape == ("batch", "seq", 4)
    assert any(n.op.value == "Slice" and n.attrs["ends"] == ("4*((seq)//4)+4",) for n in g.nodes)
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for seq in (3, 4, 9, 12):  # one block, whole blocks (padded by one more), and more
            x, mask = torch.randn(3, seq, 4, generator=_gen(seq)), torch.zeros(3, seq)
            mask[0, :2] = -1e9
            _assert_close(exe(x=x.numpy(), mask=mask.numpy()), _eager(_Blocks(), [x, mask]), 1e-5,
                          f"{backend} seq {seq}")


def test_a_length_padded_up_to_one_block_larger_than_its_bound() -> None:
    """Every length up to ``dim_max`` (12) is padded to one block of 16 (PegasusX's blocks of 512 in a model of 256
    positions): torch.export makes the padded size 16 and the pad ``16 - seq``."""
    example = (torch.randn(2, 10, 4), torch.zeros(2, 10))
    g = capture(_Blocks(16), example, {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}},
                dim_max={"seq": 12})
    assert g.outputs["output"].shape == ("batch", "seq", 4)
    assert any(n.op.value == "Slice" and n.attrs["ends"] == (16,) for n in g.nodes)
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for seq in (2, 7, 12):
            x, mask = torch.randn(3, seq, 4, generator=_gen(seq)), torch.zeros(3, seq)
            mask[0, :1] = -1e9
            _assert_close(exe(x=x.numpy(), mask=mask.numpy()), _eager(_Blocks(16), [x, mask]), 1e-5,
                          f"{backend} seq {seq}")


class _PooledAndBack(nn.Module):
    """SEW's encoder: frames pooled by 2, upsampled back to ``2*(n//2)``, padded to ``n`` where shorter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        y = F.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2).repeat_interleave(2, dim=1)
        if y.shape[1] < n:
            y = F.pad(y, (0, 0, 0, n - y.shape[1]))
        return y + x


def test_a_length_padded_back_by_its_parity() -> None:
    g = capture(_PooledAndBack(), (torch.randn(2, 9, 4),), {"x": {0: "batch", 1: "seq"}})
    assert g.outputs["output"].shape == ("batch", "seq", 4)
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for seq in (3, 8, 11):  # odd lengths padded by one, an even one not padded
            x = torch.randn(3, seq, 4, generator=_gen(seq))
            _assert_close(exe(x=x.numpy()), _eager(_PooledAndBack(), [x]), 1e-5, f"{backend} seq {seq}")


class _PaddedToOther(nn.Module):
    """GIT's block ids (``[batch, seq]``) padded at the end to the keys' length ``past + seq`` with -1, as
    transformers' ``maybe_pad_block_sequence_ids`` does, and a float state padded at the start by ``past`` and at
    the end by 2: pads of sizes that no bounded range holds."""

    def forward(self, ids: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = past.shape[1]
        groups = F.pad(ids, (0, p + ids.shape[1] - ids.shape[1]), value=-1)
        state = F.pad(ids.float()[:, None], (p, 2, 1, 0), value=0.5)
        return groups, state


def test_a_constant_pad_by_another_inputs_length() -> None:
    example = (torch.randint(0, 4, (2, 5)), torch.zeros(2, 3))
    g = capture(_PaddedToOther(), example, {"ids": {0: "batch", 1: "seq"}, "past": {0: "batch", 1: "past_seq"}})
    assert [o.shape for o in g.outputs.values()] == [("batch", "past_seq+seq"), ("batch", 2, "past_seq+seq+2")]
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for seq, past in ((4, 0), (1, 6), (7, 2)):  # no cache yet, a decode step, a longer call
            ids, pst = torch.randint(0, 4, (3, seq), generator=_gen(seq)), torch.zeros(3, past)
            _assert_close(exe(ids=ids.numpy(), past=pst.numpy()), _eager(_PaddedToOther(), [ids, pst]), 0,
                          f"{backend} seq {seq} past {past}")


def test_a_constant_pad_that_may_be_negative_is_refused() -> None:
    """``seq - past`` pads where ``seq >= past`` and crops where not, which one graph cannot do by a fill."""

    class Diff(nn.Module):
        def forward(self, ids: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
            return F.pad(ids, (0, ids.shape[1] - past.shape[1]))

    with pytest.raises(UnsupportedOpError, match="may be negative"):
        capture(Diff(), (torch.randint(0, 4, (2, 5)), torch.zeros(2, 3)),
                {"ids": {0: "batch", 1: "seq"}, "past": {0: "batch", 1: "past_seq"}})


class _AtEachRowsMarks(nn.Module):
    """BART's classification head: the states at each row's end-of-sequence marks (``ids == 2``), as many in every
    row (a size check alone, on ``unique_consecutive`` of the counts), grouped per row by a view; the last mark's
    and the first mark's state of each row."""

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        marks = ids.eq(2)
        torch._check(torch.unique_consecutive(marks.sum(1)).numel() == 1)
        grouped = x[marks, :].view(x.size(0), -1, x.size(-1))
        return grouped[:, -1, :] * 2, grouped[:, 0, :]


def _marked_ids(rows: int, seq: int, marks: int, seed: int) -> torch.Tensor:
    """Token ids without a 2 but at ``marks`` places of each row, the last one of them last or, in odd rows, two
    places before the end (right padding after it)."""
    gen = _gen(seed)
    ids = torch.randint(3, 9, (rows, seq), generator=gen)
    for r in range(rows):
        end = seq - 1 - 2 * (r % 2)
        ids[r, torch.randperm(end, generator=gen)[:marks - 1]] = 2
        ids[r, end] = 2
    return ids


def test_rows_a_mask_picks_grouped_per_row_by_a_view() -> None:
    example = (_marked_ids(2, 7, 2, 0), torch.randn(2, 7, 4))
    g = capture(_AtEachRowsMarks(), example, {"ids": {0: "batch", 1: "seq"}, "x": {0: "batch", 1: "seq"}})
    assert not any("unique" in n.name for n in g.nodes)  # read by a check alone
    assert [o.shape for o in g.outputs.values()] == [("batch", 4), ("batch", 4)]
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for rows, seq, marks in ((3, 9, 3), (1, 4, 1), (4, 12, 2)):  # other counts of marks than the example's
            ids, x = _marked_ids(rows, seq, marks, seq), torch.randn(rows, seq, 4, generator=_gen(rows))
            _assert_close(exe(ids=ids.numpy(), x=x.numpy()), _eager(_AtEachRowsMarks(), [ids, x]), 0,
                          f"{backend} {rows}x{seq}, {marks} marks a row")


@pytest.mark.parametrize(("read", "what"), [(lambda g: g.sum(1), "sum"), (lambda g: g[..., :2][:, -1], "slice")])
def test_rows_a_mask_picks_grouped_per_row_and_then_mixed_are_refused(read, what) -> None:
    """A sum over each row's picks, and a slice of their features (only a slice of every leading row is taken)."""

    class Read(nn.Module):
        def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            marks = ids.eq(2)
            torch._check(torch.unique_consecutive(marks.sum(1)).numel() == 1)
            return read(x[marks, :].view(x.size(0), -1, x.size(-1)))

    with pytest.raises(UnsupportedOpError, match=f"regrouped per leading row and then read by {what}"):
        capture(Read(), (_marked_ids(2, 7, 2, 0), torch.randn(2, 7, 4)),
                {"ids": {0: "batch", 1: "seq"}, "x": {0: "batch", 1: "seq"}})


class _CountedRows(nn.Module):
    """RT-DETR's ``batch_size = len(source_flatten)``: a tensor's first size read with Python's ``len``, which would
    make the dynamic batch the example's number."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = len(x)
        anchors = torch.arange(x.shape[1], dtype=x.dtype).repeat(rows, 1)
        return x.reshape(rows, -1).cumsum(-1) + anchors


def test_len_of_a_tensor_keeps_its_dynamic_size() -> None:
    g = capture(_CountedRows(), (torch.randn(2, 6),), {"x": {0: "batch", 1: "seq"}})
    assert g.outputs["output"].shape == ("batch", "seq")
    assert "len" not in globals()  # this module's len is Python's again
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for rows, seq in ((1, 3), (5, 9)):
            x = torch.randn(rows, seq, generator=_gen(rows))
            _assert_close(exe(x=x.numpy()), _eager(_CountedRows(), [x]), 1e-5, f"{backend} {rows}x{seq}")


def test_a_scan_traced_over_one_chunk_is_bounded_to_one_chunk() -> None:
    """An example of one chunk lets torch.export fix the chunk count to 1: the graph holds up to one chunk, says
    so (``dim_max``), and matches eager there (a longer example keeps every length: above)."""
    g = capture(_Chunked(), (torch.randn(2, 2, 4),), {"x": {0: "batch", 1: "seq"}})
    assert g.dim_max == {"seq": 3}
    exe = compile(g, "onnxruntime")
    for seq in (1, 2, 3):
        x = torch.randn(3, seq, 4, generator=_gen(seq))
        _assert_close(exe(x=x.numpy()), _eager(_Chunked(), [x]), 1e-5, f"seq {seq}")


class _LoopedChunks(nn.Module):
    """Qwen3.5's gated delta rule's way: padded to whole chunks of 3, then a Python loop over the chunks, each
    reading the state the one before left (torch.export unrolls it for the example's count)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        chunks = F.pad(x, (0, 0, 0, (3 - s % 3) % 3)).reshape(b, -1, 3, c)
        state, out = torch.zeros(b, c), []
        for i in range(chunks.shape[1]):
            y = chunks[:, i].cumsum(1) + state[:, None]
            state = y[:, -1]
            out.append(y)
        return torch.stack(out, 1).reshape(b, -1, c)[:, :s]


def test_a_python_loop_over_chunks_is_bounded_to_the_chunks_it_ran() -> None:
    """torch.export unrolls the loop for the example's one chunk and keeps no check of it: capture reads the
    count it fixed off its guards and bounds the dim to one chunk (what a cache graph takes a call; before, the
    graph silently dropped every chunk past the first), and every backend refuses more."""
    g = capture(_LoopedChunks(), (torch.randn(2, 2, 4),), {"x": {0: "batch", 1: "seq"}})
    assert g.dim_max == {"seq": 3}
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for seq in (1, 2, 3):
            x = torch.randn(2, seq, 4, generator=_gen(seq))
            _assert_close(exe(x=x.numpy()), _eager(_LoopedChunks(), [x]), 1e-5, f"{backend} seq {seq}")
        with pytest.raises(RuntimeInputError, match=r"'seq' is 4, past its maximum 3"):
            exe(x=np.zeros((2, 4, 4), np.float32))


def test_a_slice_kept_from_the_end_of_a_static_axis() -> None:
    """MPT's ``bias[..., max(0, n - seq):]`` (its ALiBi bias built for ``n`` positions): the last ``seq``
    columns of a static axis, up to the ``n`` torch.export bounds ``seq`` by."""

    class Bias(nn.Module):
        def forward(self, x):
            return _BIAS[:, torch.sym_max(0, 8 - x.shape[0]):] * x

    graph = capture(Bias(), (torch.randn(3),), {"x": {0: "batch"}}, dim_max={"batch": 8})
    exes = {backend: compile(graph, backend) for backend in BACKENDS}
    for b in (2, 5, 8):
        x = torch.randn(b, generator=_gen(b))
        want = _eager(Bias(), [x])
        _assert_close(run(graph, {"x": x.numpy()}), want, 1e-6, f"reference at {b}")
        for backend, exe in exes.items():
            _assert_close(exe({"x": x.numpy()}), want, 1e-6, f"{backend} at {b}")


def test_a_min_of_lengths_is_the_argument_it_always_equals() -> None:
    """SEW's ``min(pooled, upsampled)`` of two spellings of one length after its feature extractor
    (``((b-1)//2)+1`` and ``(b+1)//2``): :func:`_dominant_arg` picks an argument the minimum equals at
    every size (checked here far past the period it tests), and none where neither always wins."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv, Max, Min

    from flora_graph.frontend.capture import _dominant_arg

    s = sympy.Symbol("s0", integer=True, positive=True)
    b = FloorDiv(FloorDiv(FloorDiv(s, 80) - 3, 2) - 1, 2)

    class Range:
        lower, upper = sympy.Integer(720), sympy.oo

    env = type("Env", (), {"var_to_range": {s: Range()}})()

    def value(e, n):
        return int(e.xreplace({s: sympy.Integer(n)}))

    for expr in (Min(FloorDiv(b - 1, 2) + 1, FloorDiv(b + 1, 2)), Min(FloorDiv(b, 2), FloorDiv(b + 1, 2)),
                 Max(FloorDiv(b, 2), FloorDiv(b + 1, 2))):
        arg = _dominant_arg(env, expr)
        assert arg is not None and arg in expr.args, expr
        assert all(value(arg, n) == value(expr, n) for n in range(720, 20_000, 37)), (expr, arg)
    assert _dominant_arg(env, Min(FloorDiv(s, 2), sympy.Integer(5000))) is None  # each wins somewhere
    assert _dominant_arg(env, Min(FloorDiv(s, 2), FloorDiv(s, 3) + 100)) is None  # other slopes: no period
    assert _dominant_arg(env, Min(FloorDiv(s, 2), Max(s, 5000))) is None  # a nested Max: not affine


def test_a_min_of_affine_lengths_over_a_bounded_range() -> None:
    """DeBERTa's ``min(seq, max_positions)`` where ``seq`` is bounded by that maximum: an affine argument that wins at
    both ends of the range wins everywhere between; none where each wins at one end."""
    import sympy
    from torch.utils._sympy.functions import Max, Min

    from flora_graph.frontend.capture import _dominant_arg

    s = sympy.Symbol("s0", integer=True, positive=True)

    def env(lo, hi):
        rng = type("Range", (), {"lower": sympy.Integer(lo), "upper": sympy.Integer(hi)})()
        return type("Env", (), {"var_to_range": {s: rng}})()

    assert _dominant_arg(env(2, 64), Min(s, sympy.Integer(64))) == s
    assert _dominant_arg(env(4, 64), Max(2 * s - 3, s + 1)) == 2 * s - 3
    assert _dominant_arg(env(2, 65), Min(s, sympy.Integer(64))) is None  # 65 > 64: each wins somewhere


class _Span(nn.Module):
    """DeBERTa's relative embeddings cut by its attention span: ``span = torch.tensor(min(seq, 8))``, then
    ``table[8 - span : 8 + span]`` (the bounds read back from the tensor as numbers) and arithmetic on ``span``."""

    def forward(self, x):
        span = torch.tensor(min(x.shape[1], 8))
        rel = _TABLE[8 - span: 8 + span]  # [2 * seq, 4]
        return (x @ rel.T[:, : x.shape[1]]).sum(-1, keepdim=True) + torch.clamp(x, 0, span * 2 - 1)


_TABLE = torch.arange(64, dtype=torch.float32).reshape(16, 4) / 10


def test_a_size_held_in_a_tensor_and_read_back_as_a_number_is_the_size() -> None:
    """``item`` of a tensor made from sizes alone is that size (torch.export keeps a new symbol for it, and for the
    slice it bounds): the graph follows the sequence at every length up to the bound, on every backend."""
    graph = capture(_Span(), (torch.randn(2, 5, 4),), {"x": {0: "batch", 1: "seq"}}, dim_max={"seq": 8})
    exes = {backend: compile(graph, backend) for backend in BACKENDS}
    for seq in (3, 6, 8):
        x = torch.randn(2, seq, 4, generator=_gen(seq)) * 4
        want = _eager(_Span(), [x])
        _assert_close(run(graph, {"x": x.numpy()}), want, 1e-5, f"reference at {seq}")
        for backend, exe in exes.items():
            _assert_close(exe({"x": x.numpy()}), want, 1e-5, f"{backend} at {seq}")


def test_a_one_sided_fft_over_a_dynamic_axis_is_refused_by_name() -> None:
    """A one-sided spectrum keeps ``n // 2 + 1`` bins of its last axis, a length no dim names where ``n`` is dynamic."""
    with pytest.raises(UnsupportedOpError, match=r"one-sided real FFT over the dynamic dim 'batch'"):
        capture(_module(lambda x: torch.view_as_real(torch.fft.rfftn(x, dim=(1, 0))), 1), (torch.randn(3, 4),),
                {"x0": {0: "batch"}})


def test_a_dynamic_size_as_a_fill_value() -> None:
    """``full_like(indices, keys)`` (a sentinel one past the last key, as sparse attention masks invalid picks) and a
    size as a scalar tensor: the value follows the size at every run."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        picks = x.argsort(-1)
        sentinel = torch.full_like(picks, x.shape[1])
        return torch.where(x > 0, picks, sentinel) + x.new_full((3,), x.shape[0]).long().sum() + \
            torch.scalar_tensor(x.shape[1], dtype=torch.long)

    g = capture(_module(fn, 1), (torch.randn(2, 6),), {"x0": {0: "batch", 1: "seq"}})
    for shape in ((3, 11), (1, 2)):
        x = torch.randn(*shape, generator=_gen(shape[1]))
        for backend in BACKENDS:
            got = compile(g, backend)(x0=x.numpy())
            np.testing.assert_array_equal(next(iter(got.values())), fn(x).numpy(), err_msg=backend)


class _Capacity(nn.Module):
    """NLLB-MoE's expert capacity: ``math.ceil(fraction * tokens)`` (or ``floor``) of the batch's token count, a
    float product of a size rounded back to one, compared with each token's position."""

    def __init__(self, fraction: float, rounding: Callable[[float], int] = math.ceil) -> None:
        super().__init__()
        self.fraction, self.rounding = fraction, rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0] * x.shape[1]
        capacity = self.rounding(self.fraction * tokens)
        return x * torch.lt(torch.arange(x.shape[1]), capacity).to(x.dtype)[None, :, None]


@pytest.mark.parametrize("fraction, rounding", [(1.0, math.ceil), (0.5, math.ceil), (0.375, math.ceil),
                                                (0.25, math.floor)])
def test_a_size_times_a_fraction_rounded_back_is_integer_arithmetic(fraction: float, rounding) -> None:
    """``ceil(c * n)`` / ``floor(c * n)`` of a size ``n`` and a float ``c = p / 2**k`` as ``(p*n + 2**k - 1) // 2**k``
    / ``p*n // 2**k``: the eager values at every length, odd and even, on every backend."""
    g = capture(_Capacity(fraction, rounding), (torch.randn(2, 5, 3),), {"x": {0: "batch", 1: "seq"}})
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for batch, seq in ((1, 1), (1, 3), (2, 5), (3, 7), (4, 9)):
            x = torch.randn(batch, seq, 3, generator=_gen(seq))
            _assert_close(exe(x=x.numpy()), _eager(_Capacity(fraction, rounding), [x]), 0.0,
                          f"{backend} {batch}x{seq}")


def test_a_size_times_another_fraction_is_refused_by_name() -> None:
    """``ceil(0.3 * n)``: the float product rounds, so no integer arithmetic is its value: refused, naming it."""
    with pytest.raises(UnsupportedOpError, match=r"CeilToInt\(0\.3"):
        capture(_Capacity(0.3), (torch.randn(2, 5, 3),), {"x": {0: "batch", 1: "seq"}})


class _PaddedToMax(nn.Module):
    """Grounding DINO's logits over its texts: ``[batch, seq]`` written into a ``[batch, 12]`` of ``-inf`` at
    ``[:, :seq]`` (a slice_scatter whose end is the dynamic length, over a static axis), and once more from 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], 12), float("-inf"))
        out[..., : x.shape[-1]] = x
        shifted = torch.zeros(x.shape[0], 12)
        shifted[:, 2: x.shape[-1] + 2] = x.exp()
        return out + shifted


def test_a_dynamic_length_written_into_a_static_axis_keeps_the_rest() -> None:
    g = capture(_PaddedToMax(), (torch.randn(2, 8),), {"x": {0: "batch", 1: "seq"}})
    assert g.outputs["output"].shape == ("batch", 12)
    for backend in ("numpy", *BACKENDS[:2]):
        exe = compile(g, backend)
        for seq in (1, 5, 10):
            x = torch.randn(3, seq, generator=_gen(seq))
            got, want = exe(x=x.numpy())["output"], _PaddedToMax()(x).numpy()
            np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"{backend} seq {seq}")
            np.testing.assert_allclose(got[~np.isinf(want)], want[~np.isinf(want)], rtol=1e-5, err_msg=backend)
