"""``group_rows``: the mixed model's ``Linear`` slots run per adapter on the rows that use it, giving the outputs of
the gathering model (and of eager torch per row) whatever rows share an adapter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from flora_graph.serving import INDEX_INPUT, MixedAdapterSession, ServingError
from flora_graph.serving.export import stack_names
from flora_graph.serving.grouped import GROUPS_SUFFIX, PLACES_INPUT, ROWS_INPUT, group_rows, row_groups
from flora_graph.serving.mixed import ROWS_SUFFIX, per_row_inputs
from flora_graph.serving.slots import slots_from_metadata

from .conftest import ATOL
from .test_mixed import per_row_reference


def _slots(model: onnx.ModelProto):
    return slots_from_metadata({p.key: p.value for p in model.metadata_props}, "model")[1]


@pytest.fixture(scope="module")
def sessions(served):
    adapters = {k: str(p) for k, p in served.files.items()}
    return {"gathering": MixedAdapterSession(served.mixed, adapters, intra_op_threads=1),
            "grouped": MixedAdapterSession(served.mixed, adapters, intra_op_threads=1, group_rows=True),
            "grouped+per-row": MixedAdapterSession(served.mixed, adapters, intra_op_threads=1, group_rows=True,
                                                   per_row_weights=True),
            "grouped+distinct": MixedAdapterSession(served.mixed, adapters, intra_op_threads=1, group_rows=True,
                                                    per_row_weights=True, distinct_rows_per_row=True)}


def test_the_rewrite_groups_the_linear_slots_and_leaves_the_others(served):
    model = onnx.load(str(served.mixed))
    slots = _slots(model)
    linear = [s for s in slots if s.kind == "linear"]
    assert linear and any(s.kind == "conv" for s in slots)
    groups = group_rows(model, slots)
    assert sorted(groups.values()) == sorted(n for s in linear for n in stack_names(s))
    assert all(name == stack + GROUPS_SUFFIX for name, stack in groups.items())
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1:] == [INDEX_INPUT]}
    assert gathered == {n for s in slots if s.kind == "conv" for n in stack_names(s)}  # conv slots still gather
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["fc_in.lora_A.stack" + GROUPS_SUFFIX] == ["adapter_groups", 1, 1024, "fc_in.rank"]
    assert inputs[ROWS_INPUT] == ["adapter_groups", "group_rows"] and inputs[PLACES_INPUT] == ["batch", 2]
    assert INDEX_INPUT in inputs and not set(groups.values()) & set(inputs)  # the conv slots read the index
    assert [n.op_type for n in model.graph.node].count("GatherND") == len(linear)
    onnx.checker.check_model(model)


@pytest.mark.parametrize("names", [["a", "b", "c", None, "c", "a"], [None] * 6, ["c"] * 6, ["b", "a", "a", "a", "a", "b"],
                                   ["a", "b", "c", "a", "b", "c"]])
def test_same_outputs_as_the_gathering_model(served, sessions, images, names):
    want = sessions["gathering"].run({"image": images}, names)["output"]
    for kind in ("grouped", "grouped+per-row", "grouped+distinct"):
        assert sessions[kind].input_names == ["image"]
        out = sessions[kind].run({"image": images}, names)["output"]
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(out, per_row_reference(served, names, images), atol=ATOL)


@pytest.mark.parametrize(("names", "per_row"), [(["a", "b", "c", None], True), (["c", None, "a"], True),
                                             (["a", "b", "a"], False), ([None, "c", None], False), (["b"], True)])
def test_rows_that_share_no_adapter_run_on_the_per_row_session(served, sessions, images, names, per_row):
    """``distinct_rows_per_row``: rows that each use another adapter (or none) run on the per-row session, which reads
    each row's own weights and no groups; rows that share one run grouped; both give the gathering model's outputs."""
    s = sessions["grouped+distinct"]
    model = s.model_for(names)
    assert (model is not s.model) == per_row
    _, inputs = s.adapter_inputs(names)
    assert (ROWS_INPUT in inputs) == (not per_row)
    assert ("fc_in.lora_A.stack" + ROWS_SUFFIX in inputs) == per_row
    assert set(inputs) <= set(model.inputs)
    x = images[:len(names)]
    want = sessions["gathering"].run({"image": x}, names)["output"]
    np.testing.assert_allclose(s.run({"image": x}, names)["output"], want, rtol=0, atol=1e-6)
    idx = s.indices(names, len(names))
    np.testing.assert_allclose(s.run({"image": x}, adapter_index=idx)["output"], want, rtol=0, atol=1e-6)


def test_each_adapter_is_fed_once_cut_to_the_calls_largest_rank(served, sessions):
    s = sessions["grouped+per-row"]
    _, inputs = s.adapter_inputs(["b", "a", None, "a", "b", "b"])
    a_groups = inputs["fc_in.lora_A.stack" + GROUPS_SUFFIX]
    assert a_groups.shape == (3, 1, 1024, 4)  # b, a, none: [groups, 1, in, R], R the largest of a (2) and b (4)
    np.testing.assert_array_equal(a_groups[0, 0], served.params["b"]["fc_in.lora_A"].T)
    np.testing.assert_array_equal(a_groups[1, 0, :, :2], served.params["a"]["fc_in.lora_A"].T)
    assert not a_groups[1, 0, :, 2:].any() and not a_groups[2].any()  # padding, and the zero slot of no adapter
    np.testing.assert_array_equal(inputs[ROWS_INPUT], [[0, 4, 5], [1, 3, 1], [2, 2, 2]])
    np.testing.assert_array_equal(inputs[PLACES_INPUT], [[0, 0], [1, 0], [2, 0], [1, 1], [0, 1], [0, 2]])
    assert inputs["conv1.lora_A.stack" + ROWS_SUFFIX].shape[0] == 6  # the conv slots: each row's own weights


def test_row_groups_in_order_of_first_use():
    slots, rows, places = row_groups(np.array([2, -1, 0, 2, 2]))
    np.testing.assert_array_equal(slots, [2, -1, 0])
    np.testing.assert_array_equal(rows, [[0, 3, 4], [1, 1, 1], [2, 2, 2]])  # shorter groups repeat their first row
    np.testing.assert_array_equal(places, [[0, 0], [1, 0], [2, 0], [0, 1], [0, 2]])
    slots, rows, places = row_groups(np.array([1]))
    assert slots.tolist() == [1] and rows.tolist() == [[0]] and places.tolist() == [[0, 0]]


def test_a_model_without_gathered_linear_slots_stays_as_it_is_and_taken_names_are_refused(served):
    model = onnx.load(str(served.mixed))
    per_row_inputs(model, {i.name for i in model.graph.input if i.name.endswith(".stack")})  # no gather left
    before = model.SerializeToString()
    assert group_rows(model, _slots(model)) == {}
    assert model.SerializeToString() == before
    model = onnx.load(str(served.mixed))
    model.graph.input.append(onnx.helper.make_tensor_value_info(ROWS_INPUT, onnx.TensorProto.INT64, [1]))
    before = model.SerializeToString()
    with pytest.raises(ServingError, match=f"already has values named \\['{ROWS_INPUT}'\\]"):
        group_rows(model, _slots(model))
    assert model.SerializeToString() == before


def test_a_shared_input_is_gathered_once_before_every_slot_that_reads_it(package):
    """The Llama package's q/k/v (and gate/up) slots read one input: one ``Gather`` of it, placed before the first
    of them in the graph whatever order the slots come in, so the graph stays topologically sorted."""
    model = onnx.load(str(package / "mixed.onnx"), load_external_data=False)
    slots = _slots(model)
    assert group_rows(model, slots[::-1])
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and list(n.input[1:]) == [ROWS_INPUT]]
    layers = len({s.module.split(".self_attn")[0].split(".mlp")[0] for s in slots})
    assert len(gathers) == len({n.input[0] for n in gathers}) == 4 * layers  # q/k/v, o, gate/up, down
    defined = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for n in model.graph.node:
        assert set(n.input) <= defined, n.name
        defined.update(n.output)
