"""ONNX Runtime contrib lowering (``to_onnx(..., contrib=True)``): residual ``Add`` + ``RMSNormalization``
becomes ``SkipSimplifiedLayerNormalization``; values equal the standard lowering's and the numpy
reference's, and what the kernel cannot take stays standard."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import run
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.ort_contrib import CONTRIB_DOMAIN

RNG = np.random.default_rng(0)
H = 8


def _linear(g: Graph, x, name: str):
    return g.add(Op.LINEAR, [x, g.const(f"{name}.weight", RNG.standard_normal((H, H)).astype(np.float32) / 3)], name=name)


def _decoder(broadcast_add: bool = False) -> Graph:
    """Two pre-norm residual blocks (as a decoder's layers), the residual stream also an output;
    ``broadcast_add``: the second residual adds a ``[1, seq, H]`` value, which the kernel cannot take."""
    g = Graph("blocks")
    x = g.input("x", ("batch", "seq", H))
    side = g.input("side", (1, "seq", H))
    eps = {"axis": -1, "epsilon": 1e-6}
    n0 = g.add(Op.RMS_NORM, [x, g.const("n0.scale", RNG.uniform(0.5, 1.5, H).astype(np.float32))], eps, name="n0")
    r1 = g.add(Op.ADD, [x, _linear(g, n0, "l1")], name="r1")
    n1 = g.add(Op.RMS_NORM, [r1, g.const("n1.scale", RNG.uniform(0.5, 1.5, H).astype(np.float32))], eps, name="n1")
    r2 = g.add(Op.ADD, [side if broadcast_add else r1, _linear(g, n1, "l2")], name="r2")
    n2 = g.add(Op.RMS_NORM, [r2, g.const("n2.scale", RNG.uniform(0.5, 1.5, H).astype(np.float32))], eps, name="n2")
    g.set_output("y", _linear(g, n2, "head"))
    g.set_output("residual", r2)
    return verify(g)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


@pytest.mark.parametrize("broadcast_add", [False, True])
def test_residual_add_and_rms_norm_become_one_skip_norm(broadcast_add) -> None:
    g = _decoder(broadcast_add)
    plain, fused = to_onnx(g, 23), to_onnx(g, 23, contrib=True)
    assert _ops(plain)[f"{CONTRIB_DOMAIN}:SkipSimplifiedLayerNormalization"] == 0
    want_fused = 1 if broadcast_add else 2  # the first norm reads an input, not an Add
    ops = _ops(fused)
    assert ops[f"{CONTRIB_DOMAIN}:SkipSimplifiedLayerNormalization"] == want_fused
    assert ops["RMSNormalization"] == 3 - want_fused and ops["Add"] == 2 - want_fused
    assert any(o.domain == CONTRIB_DOMAIN for o in fused.opset_import)
    feeds = {"x": RNG.standard_normal((3, 5, H)).astype(np.float32), "side": RNG.standard_normal((1, 5, H)).astype(np.float32)}
    want = run(g, feeds)
    for got in (_ort(plain, feeds), _ort(fused, feeds)):
        for name in ("y", "residual"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(_ort(fused, feeds)["residual"], _ort(plain, feeds)["residual"])


def test_without_contrib_nothing_changes_and_no_domain_is_imported() -> None:
    model = to_onnx(_decoder(), 23)
    assert [o.domain for o in model.opset_import] == [""]
