"""SharedData: several lowered models in one folder, one data file holding each distinct weight once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from flora_graph.runtimes.onnx_writer import SharedData


def two_matmuls(names: tuple[str, str], width: int = 8) -> onnx.ModelProto:
    """``y = x @ W0 + x @ W1`` (``x`` ``[2, 8]``, ``y`` ``[2, width]``) reading its weights by ``names``
    (initializers added by the writer)."""
    nodes = [helper.make_node("MatMul", ["x", names[0]], ["a"]), helper.make_node("MatMul", ["x", names[1]], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external(path: Path) -> dict[str, tuple[str, int, int]]:
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        assert t.data_location == TensorProto.EXTERNAL
        e = {x.key: x.value for x in t.external_data}
        out[t.name] = (e["location"], int(e["offset"]), int(e["length"]))
    return out


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weights_equal_byte_for_byte_are_stored_once_and_both_models_read_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    base = rng.standard_normal((8, 8)).astype(np.float32)
    base[0, 0] = 0.0
    signed = base.copy()
    signed[0, 0] = -0.0  # equal as numbers, not as bytes: stored apart
    t = np.ascontiguousarray(a.T)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    with SharedData(tmp_path, "w.data") as data:
        data.write(two_matmuls(("W0", "W1")), {"W0": a, "W1": t.T}, "one.onnx")  # t.T: a transposed view equal to a
        data.write(two_matmuls(("V0", "V1")), {"V0": a.copy(), "V1": signed}, "two.onnx")
        data.write(two_matmuls(("U0", "U1")), {"U0": base, "U1": a}, "three.onnx")
    one, two, three = (external(tmp_path / f) for f in ("one.onnx", "two.onnx", "three.onnx"))
    assert one["W0"] == one["W1"] == two["V0"] == three["U1"]  # a, its transposed copy's view, a copy, a itself
    assert len({two["V1"], three["U0"], one["W0"]}) == 3  # 0.0 and -0.0 differ in a byte
    assert data.stored == (tmp_path / "w.data").stat().st_size == 3 * a.nbytes  # 256 bytes each: no padding
    assert data.shared == 3 * a.nbytes  # W1, V0, U1
    np.testing.assert_allclose(run(tmp_path / "one.onnx", x), x @ a + x @ a, rtol=1e-6)
    np.testing.assert_allclose(run(tmp_path / "two.onnx", x), x @ a + x @ signed, rtol=1e-6)
    np.testing.assert_allclose(run(tmp_path / "three.onnx", x), x @ base + x @ a, rtol=1e-6)


def test_weights_are_64_byte_aligned_in_the_data_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = [rng.standard_normal((8, 3)).astype(np.float32) for _ in range(3)]  # 96 bytes each
    x = rng.standard_normal((2, 8)).astype(np.float32)
    with SharedData(tmp_path, "w.data") as data:
        data.write(two_matmuls(("P", "Q"), width=3), {"P": w[0], "Q": w[1]}, "m.onnx")
        data.write(two_matmuls(("R", "S"), width=3), {"R": w[1], "S": w[2]}, "n.onnx")
    offsets = {o for _, o, _ in [*external(tmp_path / "m.onnx").values(), *external(tmp_path / "n.onnx").values()]}
    assert offsets == {0, 128, 256} and data.stored == 256 + 96
    np.testing.assert_allclose(run(tmp_path / "n.onnx", x), x @ w[1] + x @ w[2], rtol=1e-6)
