"""``per_row_weights``: the mixed model rewritten to take each row's weights gives the same outputs, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from flora_graph.serving import INDEX_INPUT, MixedAdapterSession, ServingError
from flora_graph.serving.mixed import ROWS_SUFFIX, per_row_inputs

from .conftest import ATOL
from .test_mixed import per_row_reference

NAMES = ["a", "b", "c", None, "c", "a"]


@pytest.fixture(scope="module")
def pair(served):
    adapters = {k: str(p) for k, p in served.files.items()}
    return (MixedAdapterSession(served.mixed, adapters, intra_op_threads=1),
            MixedAdapterSession(served.mixed, adapters, intra_op_threads=1, per_row_weights=True))


def test_the_rewrite_drops_every_gather_of_a_stack(served):
    model = onnx.load(str(served.mixed))
    stacks = {i.name for i in model.graph.input if i.name.endswith(".stack")}
    rows = per_row_inputs(model, stacks)
    assert sorted(rows.values()) == sorted(stacks)  # A and B of the five sites, conv and linear
    assert all(name == stack + ROWS_SUFFIX for name, stack in rows.items())
    assert [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in stacks] == []
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert INDEX_INPUT not in inputs and not stacks & set(inputs)  # nothing reads them any more
    assert not stacks & {t.name for t in model.graph.initializer}
    assert inputs["fc_in.lora_A.stack" + ROWS_SUFFIX] == ["batch", 1024, "fc_in.rank"]
    assert inputs["conv1.lora_A.stack" + ROWS_SUFFIX] == ["batch", "conv1.rank", 27]
    onnx.checker.check_model(model)


@pytest.mark.parametrize("names", [NAMES, [None] * 6, ["c"] * 6])
def test_same_outputs_as_the_gathering_model(served, pair, images, names):
    gathering, per_row = pair
    assert per_row.input_names == gathering.input_names == ["image"]
    out = per_row.run({"image": images}, names)["output"]
    np.testing.assert_array_equal(out, gathering.run({"image": images}, names)["output"])
    np.testing.assert_allclose(out, per_row_reference(served, names, images), atol=ATOL)


def test_raw_index_out_of_range_is_refused_before_the_gather(pair, images):
    _, per_row = pair
    idx = np.array([2, -1, 0, 1, 1, 2])
    names = [per_row.adapter_names[i] if i >= 0 else None for i in idx]
    np.testing.assert_array_equal(per_row.run({"image": images}, adapter_index=idx)["output"],
                                  per_row.run({"image": images}, names)["output"])
    with pytest.raises(ServingError, match="row 1: adapter index 3 is out of range"):
        per_row.run({"image": images}, adapter_index=[0, 3, 0, 0, 0, 0])


def test_adapter_inputs_are_kept_for_the_same_rows_and_the_same_set(served, images):
    s = MixedAdapterSession(served.mixed, {"a": served.params["a"], "b": served.params["b"]}, per_row_weights=True)
    token, inputs = s.adapter_inputs(["a", "b", None])
    assert set(inputs) == {n for n in s.model.inputs if n.endswith(ROWS_SUFFIX)}
    a_rows = inputs["fc_in.lora_A.stack" + ROWS_SUFFIX]
    assert a_rows.shape[0] == 3 and not a_rows[2].any()  # the row without an adapter reads the zero slot
    np.testing.assert_array_equal(a_rows[1], served.params["b"]["fc_in.lora_A"].T)
    again = s.adapter_inputs(["a", "b", None])
    assert again[0] is token and again[1] is inputs  # gathered once for these rows
    assert s.adapter_inputs(["b", "a", None])[1] is not inputs
    s.set_adapters({"b": served.params["b"], "a": served.params["a"]})  # another set, other indices
    new_token, new_inputs = s.adapter_inputs(["a", "b", None])
    assert new_token is not token
    np.testing.assert_array_equal(new_inputs["fc_in.lora_A.stack" + ROWS_SUFFIX], a_rows)


def test_external_weights_stay_beside_the_model(served, tmp_path, images):
    path = tmp_path / "mixed.onnx"
    onnx.save(onnx.load(str(served.mixed)), str(path), save_as_external_data=True, location="mixed.onnx.data")
    assert path.stat().st_size < (tmp_path / "mixed.onnx.data").stat().st_size
    s = MixedAdapterSession(path, {"c": served.params["c"]}, per_row_weights=True, intra_op_threads=1)
    names = ["c", None, "c", "c", None, "c"]
    np.testing.assert_allclose(s.run({"image": images}, names)["output"], per_row_reference(served, names, images),
                               atol=ATOL)
    assert s.model.where == str(path)


def test_not_a_mixed_export(served, tmp_path):
    with pytest.raises(ServingError, match="not a mixed one"):
        MixedAdapterSession(served.swappable, per_row_weights=True)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ServingError, match=r"bad\.onnx as an ONNX model"):
        MixedAdapterSession(bad, per_row_weights=True)
    model = onnx.load(str(served.mixed))
    with pytest.raises(ServingError, match="gathers no adapter stack"):
        per_row_inputs(model, {"no.such.stack"})
    taken = "fc_in.lora_A.stack" + ROWS_SUFFIX
    model.graph.input.append(onnx.helper.make_tensor_value_info(taken, onnx.TensorProto.FLOAT, [1]))
    before = model.SerializeToString()
    with pytest.raises(ServingError, match=f"already has values named \\['{taken}'\\]"):
        per_row_inputs(model, {i.name for i in model.graph.input if i.name.endswith(".stack")})
    assert model.SerializeToString() == before  # refused before anything changed


def test_rows_read_only_their_own_largest_rank(served, pair, images):
    """The stacks are padded to the largest rank of the set (c: 8); rows using a and b only get weights of rank
    4, the padding beyond it exact zeros, so the outputs stay those of the gathering model, bit for bit."""
    gathering, per_row = pair
    names = ["a", "b", None, "a", "b", "b"]
    _, inputs = per_row.adapter_inputs(names)
    assert inputs["fc_in.lora_A.stack" + ROWS_SUFFIX].shape == (6, 1024, 4)  # [rows, in, R]
    assert inputs["fc_in.lora_B.stack" + ROWS_SUFFIX].shape[1] == 4  # [rows, R, out]
    assert inputs["conv1.lora_A.stack" + ROWS_SUFFIX].shape[1] == 4  # conv: [rows, R, taps]
    assert per_row.adapter_inputs(["c", None])[1]["fc_in.lora_A.stack" + ROWS_SUFFIX].shape[-1] == 8
    assert per_row.adapter_inputs([None, None])[1]["fc_in.lora_A.stack" + ROWS_SUFFIX].shape[-1] == 1
    out = per_row.run({"image": images}, names)["output"]
    np.testing.assert_array_equal(out, gathering.run({"image": images}, names)["output"])
    np.testing.assert_allclose(out, per_row_reference(served, names, images), atol=ATOL)
