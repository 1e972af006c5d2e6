"""The normalisation family (:mod:`flora_graph.ops.normalization`): ``Softmax``, ``LayerNorm``, ``RMSNorm``.

Numpy reference against torch (``torch.softmax``, ``F.layer_norm``, ``F.rms_norm``), then
every backend against the reference; see :mod:`tests.ops.harness`. At opset 23 the RMSNorm
cases run through ONNX Runtime again, as one ``RMSNormalization`` where the normalised dims
are static (with a scale of ones where the norm has none).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from flora_graph.ir import Op
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.reference import run

from .harness import SIZES, Case, In, assert_close, build, case_id, const, f64, family_tests, feeds, op

X = In(("batch", "seq", 6))
X8 = In(("batch", "seq", 8))

TORCH = ("torchscript", "torch-export")  # F.layer_norm takes a static normalized shape

_W = np.random.default_rng(7).uniform(0.5, 1.5, 6).astype(np.float32)
_S8, _B8 = const(21, 8), const(22, 8)
_S38, _B38 = const(23, 3, 8), const(24, 3, 8)
_C4, _C6 = const(25, 3, 4), const(26, 2, 6)
_VAR4 = np.random.default_rng(27).uniform(0.5, 2.0, 4).astype(np.float32)
aten = torch.ops.aten

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
    # ------------------------------------------------------------------ captured ATen forms
    Case("softmax_dtype_same", {"x": In(("batch", "seq", 7))}, op(Op.SOFTMAX, "x"),
         lambda x: torch.softmax(x, -1, dtype=torch.float32), capture=("softmax.int",)),
    Case("softmax_dtype_change", {"x": In(("batch", "seq", 7), "float16")},
         lambda g, x, rng: g.add(Op.SOFTMAX, [g.add(Op.CAST, [x["x"]], {"to": "float32"})], {"axis": 1}),
         lambda x: torch.softmax(x, 1, dtype=torch.float32), capture=("softmax.int",)),
    Case("native_layer_norm", {"x": X8}, op(Op.LAYER_NORM, "x", _S8, _B8, epsilon=1e-4),
         lambda x: aten.native_layer_norm(x, [8], torch.from_numpy(_S8), torch.from_numpy(_B8), 1e-4)[0],
         tol=1e-4, capture=("native_layer_norm.default",)),
    # ------------------------------------------------------------------ LogSoftmax
    Case("log_softmax", {"x": In(("batch", "seq", 7))}, op(Op.LOG_SOFTMAX, "x"),
         lambda x: torch.log_softmax(x.double(), -1).float(), capture=("log_softmax.int",)),
    Case("log_softmax_axis1", {"x": In(("batch", "seq", 7))}, op(Op.LOG_SOFTMAX, "x", axis=1),
         lambda x: aten._log_softmax(x, 1, False), tol=1e-4, capture=("_log_softmax.default",)),
    # ------------------------------------------------------------------ BatchNorm
    Case("batch_norm", {"x": In(("batch", 4, 3, 5))}, op(Op.BATCH_NORM, "x", _C4[0], _C4[1], _C4[2], _VAR4, epsilon=1e-3),
         lambda x: F.batch_norm(x.double(), f64(_C4[2]), f64(_VAR4), f64(_C4[0]), f64(_C4[1]), False, 0.1, 1e-3).float(),
         capture=("batch_norm.default",)),
    Case("batch_norm_1d", {"x": In(("batch", 4, "seq"))}, op(Op.BATCH_NORM, "x", _C4[0], _C4[1], _C4[2], _VAR4),
         lambda x: aten._native_batch_norm_legit_no_training(
             x, *(torch.from_numpy(a) for a in (_C4[0], _C4[1], _C4[2], _VAR4)), 0.1, 1e-5)[0],
         tol=1e-4, capture=("_native_batch_norm_legit_no_training.default",)),
    # ------------------------------------------------------------------ GroupNorm
    Case("group_norm", {"x": In(("batch", 6, 3, 4))}, op(Op.GROUP_NORM, "x", _C6[0], _C6[1], groups=3),
         lambda x: F.group_norm(x.double(), 3, f64(_C6[0]), f64(_C6[1])).float(), capture=("group_norm.default",)),
    Case("group_norm_plain", {"x": In(("batch", 6, "seq"))}, op(Op.GROUP_NORM, "x", groups=2, epsilon=1e-3),
         lambda x: F.group_norm(x.double(), 2, eps=1e-3).float()),
    Case("native_group_norm", {"x": In(("batch", 6, 2, 5))}, op(Op.GROUP_NORM, "x", _C6[0], _C6[1], groups=6),
         lambda x: aten.native_group_norm(x, torch.from_numpy(_C6[0]), torch.from_numpy(_C6[1]), x.shape[0], 6, 10, 6,
                                          1e-5)[0], tol=1e-4, capture=("native_group_norm.default",)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith("rms_norm")], ids=case_id)
def test_rms_norm_at_opset_23_matches_reference(case: Case) -> None:
    g = build(case)
    proto = to_onnx(g, 23)
    ops = [n.op_type for n in proto.graph.node]
    static = all(isinstance(d, int) for d in g.nodes[-1].inputs[0].shape[g.nodes[-1].attrs["axis"]:])
    assert (ops.count("RMSNormalization") == 1) == static and ("ReduceMean" in ops) != static, ops
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for k, sizes in enumerate(SIZES):
        x = feeds(case, sizes, k)
        (got,) = sess.run(None, x)
        assert_close(got, run(g, x)["out"], case.tol, f"{case.id} at opset 23 at {sizes}")
