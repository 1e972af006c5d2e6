"""The normalisation family (:mod:`flora_graph.ops.normalization`): ``Softmax``, ``LayerNorm``, ``RMSNorm``.

Numpy reference against torch (``torch.softmax``, ``F.layer_norm``, ``F.rms_norm``), then
every backend against the reference; see :mod:`tests.ops.harness`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from flora_graph.ir import Op

from .harness import Case, In, const, f64, family_tests, op

X = In(("batch", "seq", 6))
X8 = In(("batch", "seq", 8))

TORCH = ("torchscript", "torch-export")  # F.layer_norm takes a static normalized shape

_W = np.random.default_rng(7).uniform(0.5, 1.5, 6).astype(np.float32)
_S8, _B8 = const(21, 8), const(22, 8)
_S38, _B38 = const(23, 3, 8), const(24, 3, 8)

CASES = [
    # ------------------------------------------------------------------ Softmax
    Case("softmax_last", {"x": In(("batch", "seq", 7))}, op(Op.SOFTMAX, "x"), lambda x: torch.softmax(x.double(), -1).float()),
    Case("softmax_axis1", {"x": In(("batch", "seq", 7))}, op(Op.SOFTMAX, "x", axis=1),
         lambda x: torch.softmax(x.double(), 1).float()),
    Case("softmax_batch_axis", {"x": In(("batch", 3))}, op(Op.SOFTMAX, "x", axis=0), lambda x: torch.softmax(x.double(), 0).float()),
    # ------------------------------------------------------------------ LayerNorm
    Case("layer_norm_scale_bias", {"x": X8}, op(Op.LAYER_NORM, "x", _S8, _B8),
         lambda x: F.layer_norm(x.double(), (8,), f64(_S8), f64(_B8)).float()),
    Case("layer_norm_scale", {"x": X8}, op(Op.LAYER_NORM, "x", _S8, epsilon=1e-3),
         lambda x: F.layer_norm(x.double(), (8,), f64(_S8), None, 1e-3).float()),
    Case("layer_norm_plain", {"x": X8}, op(Op.LAYER_NORM, "x"), lambda x: F.layer_norm(x.double(), (8,)).float()),
    Case("layer_norm_2dims", {"x": In(("batch", 3, 8))}, op(Op.LAYER_NORM, "x", _S38, _B38, axis=-2),
         lambda x: F.layer_norm(x.double(), (3, 8), f64(_S38), f64(_B38)).float()),
    Case("layer_norm_2dims_plain", {"x": In(("batch", 3, 8))}, op(Op.LAYER_NORM, "x", axis=1),
         lambda x: F.layer_norm(x.double(), (3, 8)).float()),
    Case("layer_norm_dynamic_dims", {"x": X8}, op(Op.LAYER_NORM, "x", axis=1),
         lambda x: F.layer_norm(x.double(), x.shape[1:]).float(), unsupported=TORCH),
    Case("layer_norm_dynamic_plain", {"x": In(("batch", 3))}, op(Op.LAYER_NORM, "x", axis=0),
         lambda x: F.layer_norm(x.double(), x.shape).float(), unsupported=TORCH),
    # ------------------------------------------------------------------ RMSNorm
    Case("rms_norm_scale", {"x": X}, lambda g, x, rng: g.add(Op.RMS_NORM, [x["x"], g.const("w", _W)], {"epsilon": 1e-5}),
         lambda x: F.rms_norm(x, (6,), torch.from_numpy(_W), 1e-5)),
    Case("rms_norm_plain_2dims", {"x": In(("batch", 3, 6))}, op(Op.RMS_NORM, "x", axis=-2, epsilon=1e-2),
         lambda x: F.rms_norm(x, (3, 6), None, 1e-2)),
    Case("rms_norm_dynamic_dims", {"x": X}, op(Op.RMS_NORM, "x", axis=1), lambda x: F.rms_norm(x, x.shape[1:], None, 1e-6)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
