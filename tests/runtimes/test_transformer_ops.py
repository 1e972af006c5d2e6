"""Transformer ops beyond one case per op: fully-masked attention rows, native RMSNormalization
at opset 23, every case at the other supported opsets, and named dims without a carrying input.

The per-op cases (numpy reference against torch, each backend against the reference) are the
family tables of ``tests/ops/test_<family>.py``, run with the harness of :mod:`tests.ops.harness`.
"""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.ir import Graph, Op
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile

from ..ops.harness import BACKENDS, SIZES, all_cases, assert_close, build, feeds, find


def test_fully_masked_rows_are_zero_on_every_backend() -> None:
    case = find("sdpa_bool_mask")
    g = build(case)
    x = feeds(case, SIZES[0], 3)
    x["m"][:, :, 1, :] = False  # query 1 may attend to nothing
    want = run(g, x)["out"]
    assert np.all(want[:, :, 1] == 0) and np.isfinite(want).all()
    for backend in BACKENDS:
        np.testing.assert_allclose(compile(g, backend)(x)["out"], want, atol=1e-5, rtol=1e-5, err_msg=backend)


def test_rms_norm_native_at_opset_23() -> None:
    import onnxruntime as ort

    from flora_graph.runtimes.onnx_lowering import to_onnx

    case = find("rms_norm_scale")
    g = build(case)
    model = to_onnx(g, 23)
    assert [n.op_type for n in model.graph.node] == ["RMSNormalization"]
    x = feeds(case, SIZES[1], 0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # ORT >= 1.22 loads opset 23
    np.testing.assert_allclose(sess.run(None, x)[0], run(g, x)["out"], atol=1e-5, rtol=1e-5)


def test_named_dim_without_a_carrying_input_is_refused() -> None:
    from flora_graph.errors import GraphError
    from flora_graph.runtimes.onnx_lowering import to_onnx
    from flora_graph.runtimes.torch_lowering import generate_forward

    g = Graph("orphan")
    x = g.input("x", ("batch", 3))
    g.set_output("y", g.add(Op.ARANGE, [], {"end": "seq"}, name="positions"))
    g.set_output("z", g.add(Op.NEG, [x]))
    with pytest.raises(GraphError, match=r"'positions'.*'seq'"):
        run(g, {"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(GraphError, match=r"'positions'.*'seq'"):
        to_onnx(g)
    with pytest.raises(GraphError, match=r"'positions'.*'seq'"):
        generate_forward(g)


@pytest.mark.parametrize("opset", [18, 23])
def test_every_case_at_other_opsets(opset: int) -> None:
    """Opset 18 (the oldest supported) and 23 (native RMSNormalization) give the reference's numbers too."""
    for case in all_cases():
        g = build(case)
        exe = compile(g, "onnxruntime", opset=opset)
        x = feeds(case, SIZES[1], 7)
        want, got = run(g, x), exe(x)
        for name in want:
            assert_close(got[name], want[name], case.tol, f"{case.id} {name} at opset {opset}")
