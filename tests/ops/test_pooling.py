"""The pooling family (:mod:`flora_graph.ops.pooling`): ``MaxPool2d``, ``AvgPool2d``, ``Resize``, ``GridSample``.

Numpy reference against torch (``F.max_pool2d``, ``F.avg_pool2d``, ``F.adaptive_avg_pool2d``,
``F.interpolate``, ``F.grid_sample``), then every backend against the reference; see :mod:`tests.ops.harness`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flora_graph.errors import UnsupportedOpError
from flora_graph.ir import Op

from .harness import Case, In, family_tests, op

aten = torch.ops.aten
X = In(("batch", 3, 8, 9))
GRID = In(("batch", 5, "seq", 2))  # (x, y) sampling points, standard normal


def _pool_then_global(g, x, rng):
    """``MaxPool2d`` then the global average (``ReduceMean`` over H, W) adaptive pooling to 1x1 becomes."""
    pooled = g.add(Op.MAX_POOL2D, [x["x"]], {"kernel": (2, 2), "stride": (2, 2)})
    return g.add(Op.REDUCE_MEAN, [pooled], {"axes": (2, 3), "keepdims": 1})


def _resize_1d(size: int, mode: str, align_corners: int = 0):
    """``Resize`` of ``[N, C, L]`` as ``[N, C, 1, L]``, the 1-D upsampling's lowering."""
    def build(g, x, rng):
        plane = g.add(Op.UNSQUEEZE, [x["x"]], {"axes": (2,)})
        out = g.add(Op.RESIZE, [plane], {"size": (1, size), "mode": mode, "align_corners": align_corners})
        return g.add(Op.SQUEEZE, [out], {"axes": (2,)})
    return build


CASES = [
    # ------------------------------------------------------------------ MaxPool2d
    Case("max_pool", {"x": X}, op(Op.MAX_POOL2D, "x", kernel=(2, 2), stride=(2, 2)),
         lambda x: F.max_pool2d(x, 2), capture=("max_pool2d.default",)),
    Case("max_pool_resnet", {"x": X}, op(Op.MAX_POOL2D, "x", kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
         lambda x: aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])[0],
         capture=("max_pool2d_with_indices.default",)),
    Case("max_pool_dilation", {"x": X}, op(Op.MAX_POOL2D, "x", kernel=(2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1)),
         lambda x: F.max_pool2d(x, (2, 3), (1, 2), (1, 1), (2, 1))),
    Case("max_pool_dynamic_height", {"x": In(("batch", 3, "seq", 9))},
         op(Op.MAX_POOL2D, "x", kernel=(3, 2), stride=(2, 2), padding=(1, 0)),
         lambda x: F.max_pool2d(x, (3, 2), 2, (1, 0)), dim_min={"seq": 3}, capture=("max_pool2d.default",)),
    Case("max_pool_ceil", {"x": X}, op(Op.MAX_POOL2D, "x", kernel=(2, 2), stride=(1, 1), ceil_mode=1),
         lambda x: F.max_pool2d(x, 2, 1, ceil_mode=True), capture=("max_pool2d.default",)),
    # W 9, kernel 2, stride 2, padding 1: ceil's sixth window would start in the right padding, so torch drops it
    Case("max_pool_ceil_pad_last_window_dropped", {"x": X},
         op(Op.MAX_POOL2D, "x", kernel=(3, 2), stride=(2, 2), padding=(1, 1), ceil_mode=1),
         lambda x: F.max_pool2d(x, (3, 2), 2, 1, ceil_mode=True), capture=("max_pool2d.default",)),
    Case("max_pool_ceil_dilation", {"x": X},
         op(Op.MAX_POOL2D, "x", kernel=(2, 2), stride=(3, 2), dilation=(2, 1), ceil_mode=1),
         lambda x: F.max_pool2d(x, 2, (3, 2), 0, (2, 1), ceil_mode=True)),
    # ------------------------------------------------------------------ AvgPool2d
    Case("avg_pool", {"x": X}, op(Op.AVG_POOL2D, "x", kernel=(2, 3), stride=(2, 3)),
         lambda x: F.avg_pool2d(x, (2, 3)), capture=("avg_pool2d.default",)),
    Case("avg_pool_pad", {"x": X}, op(Op.AVG_POOL2D, "x", kernel=(3, 3), stride=(2, 1), padding=(1, 1)),
         lambda x: F.avg_pool2d(x, 3, (2, 1), 1)),
    Case("avg_pool_dynamic_height", {"x": In(("batch", 3, "seq", 9))},
         op(Op.AVG_POOL2D, "x", kernel=(2, 3), stride=(2, 3), padding=(1, 0)),
         lambda x: F.avg_pool2d(x, (2, 3), (2, 3), (1, 0)), dim_min={"seq": 3}, capture=("avg_pool2d.default",)),
    Case("avg_pool_pad_exclude", {"x": X}, op(Op.AVG_POOL2D, "x", kernel=(3, 2), stride=(2, 2), padding=(1, 1), count_include_pad=0),
         lambda x: F.avg_pool2d(x, (3, 2), 2, 1, count_include_pad=False), capture=("avg_pool2d.default",)),
    Case("avg_pool_ceil", {"x": X}, op(Op.AVG_POOL2D, "x", kernel=(3, 2), stride=(2, 2), ceil_mode=1),
         lambda x: F.avg_pool2d(x, (3, 2), 2, ceil_mode=True), capture=("avg_pool2d.default",)),
    Case("avg_pool_ceil_pad_exclude", {"x": X},
         op(Op.AVG_POOL2D, "x", kernel=(3, 2), stride=(2, 2), padding=(1, 1), count_include_pad=0, ceil_mode=1),
         lambda x: F.avg_pool2d(x, (3, 2), 2, 1, ceil_mode=True, count_include_pad=False), capture=("avg_pool2d.default",)),
    # ceil mode over a dynamic height (windows no shorter than their stride, no padding: ONNX's own ceil mode), at
    # odd heights (a last window cut short) and even ones; Funnel pools its sequence so, x[:, None, :, :] by (2, 1)
    Case("max_pool_ceil_dynamic_height", {"x": In(("batch", 3, "seq+2", 9))},
         op(Op.MAX_POOL2D, "x", kernel=(3, 2), stride=(2, 2), ceil_mode=1),
         lambda x: F.max_pool2d(x, (3, 2), 2, ceil_mode=True), capture=("max_pool2d.default",)),
    Case("avg_pool_ceil_dynamic_height", {"x": In(("batch", 1, "seq+2", 5))},
         op(Op.AVG_POOL2D, "x", kernel=(2, 1), stride=(2, 1), ceil_mode=1),
         lambda x: F.avg_pool2d(x, (2, 1), (2, 1), ceil_mode=True), capture=("avg_pool2d.default",)),
    Case("avg_pool_ceil_dynamic_even_height", {"x": In(("batch", 2, "seq+1", 9))},
         op(Op.AVG_POOL2D, "x", kernel=(3, 3), stride=(2, 2), ceil_mode=1),
         lambda x: F.avg_pool2d(x, 3, 2, ceil_mode=True), capture=("avg_pool2d.default",)),
    # EfficientNet's pooler: a kernel wider than the feature map, one window in ceil mode, the input's mean
    Case("avg_pool_ceil_kernel_past_input", {"x": X}, op(Op.AVG_POOL2D, "x", kernel=(64, 64), stride=(64, 64), ceil_mode=1),
         lambda x: F.avg_pool2d(x, 64, ceil_mode=True), capture=("avg_pool2d.default",)),
    Case("adaptive_avg_pool_divisible", {"x": X}, op(Op.AVG_POOL2D, "x", kernel=(4, 3), stride=(4, 3)),
         lambda x: F.adaptive_avg_pool2d(x, (2, 3)), capture=("adaptive_avg_pool2d.default",)),
    Case("adaptive_avg_pool_global", {"x": X}, _pool_then_global,
         lambda x: aten._adaptive_avg_pool2d(F.max_pool2d(x, 2), [1, 1]),
         capture=("max_pool2d.default", "_adaptive_avg_pool2d.default")),
    # ------------------------------------------------------------------ Resize
    Case("upsample_nearest", {"x": X}, op(Op.RESIZE, "x", size=(16, 27)),
         lambda x: F.interpolate(x, scale_factor=(2, 3), mode="nearest"), capture=("upsample_nearest2d.vec",)),
    Case("upsample_nearest_down", {"x": X}, op(Op.RESIZE, "x", size=(5, 4)),
         lambda x: F.interpolate(x, size=(5, 4), mode="nearest"), capture=("upsample_nearest2d.vec",)),
    Case("upsample_bilinear", {"x": X}, op(Op.RESIZE, "x", size=(11, 18), mode="linear"),
         lambda x: F.interpolate(x, size=(11, 18), mode="bilinear"), capture=("upsample_bilinear2d.vec",)),
    # SAM's relative-position tables resized along their one axis
    Case("upsample_linear_1d", {"x": In(("batch", 3, 9))}, _resize_1d(13, "linear"),
         lambda x: F.interpolate(x, size=13, mode="linear"), capture=("upsample_linear1d.vec",)),
    Case("upsample_linear_1d_corners", {"x": In(("batch", 3, 9))}, _resize_1d(5, "linear", 1),
         lambda x: F.interpolate(x, size=5, mode="linear", align_corners=True), capture=("upsample_linear1d.vec",)),
    Case("upsample_nearest_1d", {"x": In(("batch", 3, 9))}, _resize_1d(18, "nearest"),
         lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), capture=("upsample_nearest1d.vec",)),
    # ------------------------------------------------------------------ GridSample (grid points up to ~3 outside [-1, 1])
    Case("grid_sample_bilinear", {"x": X, "g": GRID}, op(Op.GRID_SAMPLE, "x", "g"),
         lambda x, g: F.grid_sample(x, g, align_corners=False), tol=1e-4, capture=("grid_sampler.default",)),
    Case("grid_sample_bilinear_reflection_corners", {"x": X, "g": GRID},
         op(Op.GRID_SAMPLE, "x", "g", padding_mode="reflection", align_corners=1),
         lambda x, g: F.grid_sample(x, g, padding_mode="reflection", align_corners=True), tol=1e-4),
    Case("grid_sample_nearest_border", {"x": X, "g": GRID}, op(Op.GRID_SAMPLE, "x", "g", mode="nearest", padding_mode="border"),
         lambda x, g: aten.grid_sampler_2d(x, g, 1, 1, False), capture=("grid_sampler_2d.default",)),
    Case("grid_sample_bicubic_reflection", {"x": X, "g": GRID},
         op(Op.GRID_SAMPLE, "x", "g", mode="cubic", padding_mode="reflection"),
         lambda x, g: F.grid_sample(x, g, mode="bicubic", padding_mode="reflection", align_corners=False), tol=1e-4),
    Case("grid_sample_bicubic_zeros_corners", {"x": X, "g": GRID}, op(Op.GRID_SAMPLE, "x", "g", mode="cubic", align_corners=1),
         lambda x, g: aten.grid_sampler_2d(x, g, 2, 0, True), tol=1e-4, capture=("grid_sampler_2d.default",)),
    Case("upsample_bilinear_corners", {"x": X}, op(Op.RESIZE, "x", size=(16, 7), mode="linear", align_corners=1),
         lambda x: F.interpolate(x, size=(16, 7), mode="bilinear", align_corners=True),
         capture=("upsample_bilinear2d.vec",)),
    # antialiased bilinear (a vision tower's position table resized): shrinking by uneven factors, and growing
    Case("resize_bilinear_antialias_down", {"x": X}, op(Op.RESIZE, "x", size=(3, 5), mode="linear", antialias=1),
         lambda x: F.interpolate(x, size=(3, 5), mode="bilinear", antialias=True), tol=1e-5,
         capture=("_upsample_bilinear2d_aa.vec",)),
    Case("resize_bilinear_antialias_up", {"x": X}, op(Op.RESIZE, "x", size=(13, 4), mode="linear", antialias=1),
         lambda x: aten._upsample_bilinear2d_aa(x, [13, 4], False), tol=1e-5,
         capture=("_upsample_bilinear2d_aa.default",)),
    # antialiased bicubic (DINOv2 with registers): Keys a = -0.5 taps, shrinking unevenly and growing
    Case("resize_bicubic_antialias_down", {"x": X}, op(Op.RESIZE, "x", size=(3, 5), mode="cubic", antialias=1),
         lambda x: F.interpolate(x, size=(3, 5), mode="bicubic", antialias=True), tol=1e-5,
         capture=("_upsample_bicubic2d_aa.vec",)),
    Case("resize_bicubic_antialias_up", {"x": X}, op(Op.RESIZE, "x", size=(13, 11), mode="cubic", antialias=1),
         lambda x: aten._upsample_bicubic2d_aa(x, [13, 11], False), tol=1e-5,
         capture=("_upsample_bicubic2d_aa.default",)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)


@pytest.mark.parametrize(("fn", "what"), [
    (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), "ceil_mode=True with count_include_pad"),
    (lambda x: aten.max_pool2d_with_indices(x, [2, 2])[1].float(), "indices"),
    (lambda x: F.avg_pool2d(x, 2, divisor_override=3), "divisor_override"),
    (lambda x: aten.adaptive_max_pool2d(x, [3, 2])[1].float(), "indices"),
    (lambda x: F.interpolate(x, scale_factor=1.5), "whole output sizes"),
    (lambda x: aten.native_layer_norm(x, [9], None, None, 1e-5)[1], "mean/rstd"),
], ids=["ceil_mode", "indices", "divisor_override", "adaptive_max_indices", "scale_not_whole", "layer_norm_mean"])
def test_unsupported_forms_are_refused_by_name(fn, what):
    from flora_graph.frontend import capture

    class M(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    with pytest.raises(UnsupportedOpError, match=what):
        capture(M(), torch.randn(2, 3, 8, 9))


@pytest.mark.parametrize(("fn", "what"), [
    (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False), "padding 0"),
    (lambda x: F.max_pool2d(x, 2, 3, ceil_mode=True), "at least as long as"),
], ids=["padding", "stride_past_window"])
def test_ceil_mode_over_a_dynamic_height_is_refused_where_a_window_could_start_past_the_input(fn, what):
    """torch drops a ceil-mode window that would start in the right padding (or past the input), which a dynamic size
    leaves open: refused by name, where the same pooling over a static size converts."""
    from flora_graph.errors import ShapeError
    from flora_graph.frontend import capture

    class M(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    capture(M(), torch.randn(2, 3, 8, 9))
    with pytest.raises(ShapeError, match=what):
        capture(M(), torch.randn(2, 3, 8, 9), {"x": {2: "h"}})
