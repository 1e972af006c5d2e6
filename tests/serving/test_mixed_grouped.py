"""``group_rows``: the mixed model's ``Linear`` slots run per group of adapters (packed side by side along the rank) on
the rows that use them, giving the outputs of the gathering model (and of eager torch per row) whatever rows share an
adapter, whatever their ranks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from flora_graph.serving import INDEX_INPUT, MixedAdapterSession, ServingError
from flora_graph.serving.export import stack_names
from flora_graph.serving.grouped import (
    GROUPS_SUFFIX,
    LANES_SUFFIX,
    PLACES_INPUT,
    ROWS_INPUT,
    group_rows,
    grouped_inputs,
    pack_rows,
)
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
                                                   per_row_weights=True)}


def test_the_rewrite_groups_the_linear_slots_and_leaves_the_others(served):
    model = onnx.load(str(served.mixed))
    slots = _slots(model)
    linear = [s for s in slots if s.kind == "linear"]
    assert linear and any(s.kind == "conv" for s in slots)
    groups = group_rows(model, slots)
    assert sorted(set(groups.values())) == sorted(n for s in linear for n in stack_names(s))
    assert {name for name, stack in groups.items() if name in (stack + GROUPS_SUFFIX, stack + LANES_SUFFIX)} \
        == set(groups)
    assert sorted(n for n in groups if n.endswith(LANES_SUFFIX)) == sorted(stack_names(s)[0] + LANES_SUFFIX
                                                                          for s in linear)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1:] == [INDEX_INPUT]}
    assert gathered == {n for s in slots if s.kind == "conv" for n in stack_names(s)}  # conv slots still gather
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["fc_in.lora_A.stack" + GROUPS_SUFFIX] == ["adapter_groups", 1, 1024, "fc_in.rank"]
    assert inputs["fc_in.lora_A.stack" + LANES_SUFFIX] == ["adapter_groups", "group_rows", 1, "fc_in.rank"]
    assert inputs[ROWS_INPUT] == ["adapter_groups", "group_rows"] and inputs[PLACES_INPUT] == ["batch", 2]
    assert INDEX_INPUT in inputs and not set(groups.values()) & set(inputs)  # the conv slots read the index
    nodes = model.graph.node
    assert [n.op_type for n in nodes].count("GatherND") == len(linear)
    assert sum(n.op_type == "Mul" and n.name.endswith(".lora_lanes") for n in nodes) == len(linear)
    onnx.checker.check_model(model)


@pytest.mark.parametrize("names", [["a", "b", "c", None, "c", "a"], [None] * 6, ["c"] * 6, ["b", "a", "a", "a", "a", "b"],
                                   ["a", "b", "c", "a", "b", "c"]])
def test_same_outputs_as_the_gathering_model(served, sessions, images, names):
    want = sessions["gathering"].run({"image": images}, names)["output"]
    for kind in ("grouped", "grouped+per-row"):
        assert sessions[kind].input_names == ["image"]
        out = sessions[kind].run({"image": images}, names)["output"]
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(out, per_row_reference(served, names, images), atol=ATOL)


def test_each_adapter_is_fed_once_packed_beside_others_by_rank(served, sessions):
    """a (rank 2) and b (rank 4) in one call: b fills a bin of 4 lanes, a takes another, the row without an adapter
    joins b's bin with no lanes; each row's lanes are its adapter's ranks."""
    s = sessions["grouped+per-row"]
    assert [served.params[n]["fc_in.lora_A"].shape[0] for n in ("a", "b")] == [2, 4]
    _, inputs = s.adapter_inputs(["b", "a", None, "a", "b", "b"])
    a_groups, b_groups = inputs["fc_in.lora_A.stack" + GROUPS_SUFFIX], inputs["fc_in.lora_B.stack" + GROUPS_SUFFIX]
    assert a_groups.shape == (2, 1, 1024, 4) and b_groups.shape[:3] == (2, 1, 4)  # [groups, 1, in, R]: bins of 4
    np.testing.assert_array_equal(a_groups[0, 0], served.params["b"]["fc_in.lora_A"].T)
    np.testing.assert_array_equal(a_groups[1, 0, :, :2], served.params["a"]["fc_in.lora_A"].T)
    assert not a_groups[1, 0, :, 2:].any() and not b_groups[1, 0, 2:].any()  # the bin's lanes a leaves free
    np.testing.assert_array_equal(inputs[ROWS_INPUT], [[0, 2, 4, 5], [1, 3, 1, 1]])
    np.testing.assert_array_equal(inputs[PLACES_INPUT], [[0, 0], [1, 0], [0, 1], [1, 1], [0, 2], [0, 3]])
    lanes = inputs["fc_in.lora_A.stack" + LANES_SUFFIX][..., 0, :]  # [groups, rows in a group, R]
    np.testing.assert_array_equal(lanes[0], [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])  # b, none, b, b
    np.testing.assert_array_equal(lanes[1, :2], [[1, 1, 0, 0], [1, 1, 0, 0]])  # a, a
    assert inputs["conv1.lora_A.stack" + ROWS_SUFFIX].shape[0] == 6  # the conv slots: each row's own weights


def test_two_small_adapters_share_a_bin_and_read_their_own_ranks_alone():
    """Ranks 2, 1 and 1 in bins of 2: the two rank-1 adapters side by side, each row's lanes its adapter's alone, and
    each row's product through the packed weights equal to its adapter's own."""
    gen = np.random.default_rng(0)
    ranks = np.array([2, 1, 1, 0])  # three adapters and the zero slot
    a = np.zeros((4, 5, 2), np.float32)
    b = np.zeros((4, 2, 3), np.float32)
    for slot, r in enumerate(ranks[:3]):
        a[slot, :, :r], b[slot, :r] = gen.normal(size=(5, r)), gen.normal(size=(r, 3))
    index = np.array([1, 2, -1, 0, 2])
    out = grouped_inputs({"A.groups": "A", "B.groups": "B", "A.lanes": "A"}, {"A": a, "B": b},
                         {"A": (ranks, 2), "B": (ranks, 1)}, index)
    assert out["A.groups"].shape == (2, 1, 5, 2)  # adapter 0 (and the no-adapter row, no lanes); 1 and 2 side by side
    np.testing.assert_array_equal(out[ROWS_INPUT], [[2, 3, 2], [0, 1, 4]])
    x = gen.normal(size=(5, 5)).astype(np.float32)
    for row, (g, p) in enumerate(out[PLACES_INPUT].tolist()):
        got = (x[row] @ out["A.groups"][g, 0]) * out["A.lanes"][g, p, 0] @ out["B.groups"][g, 0]
        np.testing.assert_allclose(got, x[row] @ a[index[row]] @ b[index[row]], rtol=1e-6, atol=1e-6)


def test_pack_rows_fills_the_first_bin_with_room_widest_first():
    packing = pack_rows(np.array([2, -1, 0, 2, 2, 1]), np.array([8, 16, 8, 0]))  # slots 0..2 and the zero slot
    assert packing.bins == [[1, 3], [2, 0]]  # 16 and the zero slot (no lanes); 8 + 8 in order of first use
    np.testing.assert_array_equal(packing.rows, [[1, 5, 1, 1], [0, 2, 3, 4]])
    np.testing.assert_array_equal(packing.places, [[1, 0], [0, 0], [1, 1], [1, 2], [1, 3], [0, 1]])
    np.testing.assert_array_equal(packing.slots, [2, 3, 0, 2, 2, 1])
    one = pack_rows(np.array([-1, -1]), np.array([4, 0]))  # no adapter at all: one bin, lanes of none
    assert one.bins == [[1]] and one.rows.tolist() == [[0, 1]]
    wide = pack_rows(np.array([0, 1, 2, 3, 4, 5, 6, 7]), np.array([64, *[8] * 7, 0]))  # one wide, seven narrow
    assert [len(b) for b in wide.bins] == [1, 7]


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
