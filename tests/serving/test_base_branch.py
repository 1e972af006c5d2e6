"""The base model's own branch (``serving.base_branch``): no adapter runs no slot, an adapter runs them all.

References: eager torch (the demo decoder without adapters, and merged with each adapter) and the
same swappable export without the branch, in ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from flora_graph.passes import optimize
from flora_graph.serving import (
    AdapterSession,
    MixedAdapterSession,
    ServingError,
    adapter_params,
    export_mixed,
    export_swappable,
    graph_adapter_params,
    write_adapter,
)
from flora_graph.serving.adapter_file import read_adapter, spec_of
from flora_graph.serving.base_branch import branch_on_adapter, has_adapter_flag
from flora_graph.serving.errors import AdapterFileError
from flora_graph.serving.slots import ADAPTER_FLAG, check_params, graph_slots
from tests.serving.test_slots_in_ir import Demo, _serves_base_and_both_adapters


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return Demo(tmp_path_factory.mktemp("branch"))


@pytest.fixture(scope="module")
def models(demo: Demo) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The demo's swappable export (sibling slots packed) and the same model branching on the adapter flag."""
    model = export_swappable(optimize(demo.graph, "fused", slots="swappable", pack_slots=True))
    branched = onnx.ModelProto()
    branched.CopyFrom(model)
    assert branch_on_adapter(branched) is branched  # in place: a large model's weights are not copied
    return model, branched


def _weights(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input if ".lora_" in i.name}


def test_the_else_branch_is_the_graph_without_its_slots(models) -> None:
    model, branched = models
    assert has_adapter_flag(branched) and not has_adapter_flag(model)
    assert [n.op_type for n in branched.graph.node] == ["Cast", "If"]
    assert [o.name for o in branched.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in branched.graph.input] == [*(i.name for i in model.graph.input), ADAPTER_FLAG]
    assert len(branched.graph.initializer) == len(model.graph.initializer) + 1  # weights stay outside, once
    branches = {a.name: a.g for a in branched.graph.node[1].attribute}
    with_adapter, base = branches["then_branch"], branches["else_branch"]
    weights = _weights(model)
    assert len(weights) == 2 * 8  # 4 packed slots per layer, 2 layers
    assert len(with_adapter.node) == len(model.graph.node)
    assert not [n.name for n in base.node if set(n.input) & weights]
    read = [n for n in model.graph.node if set(n.input) & weights]
    assert len(base.node) <= len(model.graph.node) - len(read) - len(weights) // 2  # each slot's Add is gone too
    onnx.checker.check_model(branched, full_check=True)


def test_base_and_adapters_through_the_branch_are_eager_torch(demo: Demo, models) -> None:
    model, branched = models
    own = write_adapter(demo.root / "own.onnx_adapter", graph_adapter_params(demo.graph), model=branched)
    flag = read_adapter(own, require_checksum=True).params[ADAPTER_FLAG]
    assert flag.dtype == np.float32 and flag.tolist() == [1.0]  # files for the branched model switch it on
    _serves_base_and_both_adapters(demo, branched, own)
    # and every run is the unbranched model's run (the rank-3 adapter given per module, its flag added on load)
    plain, branch = AdapterSession(model, intra_op_threads=1), AdapterSession(branched, intra_op_threads=1)
    for session in (plain, branch):
        session.load_adapter("other", adapter_params(demo.other))
    ids = {"input_ids": demo.ids.numpy()}
    for adapter in (None, "other"):
        np.testing.assert_allclose(branch.run(ids, adapter)["output"], plain.run(ids, adapter)["output"], atol=1e-5)


def test_a_file_for_either_model_serves_the_other(demo: Demo, models, tmp_path: Path) -> None:
    """A file without the flag (written for the unbranched model) on the branched model, and one with it on the
    unbranched model: ONNX Runtime gets the validated params (flag added or dropped), in a plain run through
    RunOptions and through an IOBinding alike."""
    model, branched = models
    params = graph_adapter_params(demo.graph)
    files = {"plain": write_adapter(tmp_path / "plain.onnx_adapter", params, model=model),
             "branched": write_adapter(tmp_path / "branched.onnx_adapter", params, model=branched)}
    assert ADAPTER_FLAG not in read_adapter(files["plain"]).params
    want = demo.eager(demo.merged)
    ids = demo.ids.numpy()
    for target, file in ((branched, files["plain"]), (model, files["branched"])):
        session = AdapterSession(target, intra_op_threads=1)
        session.load_adapter("own", file)
        np.testing.assert_allclose(session.run({"input_ids": ids}, "own")["output"], want, atol=2e-5)
        _, inputs = session.adapter_inputs("own")
        io = session.model.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        for name, value in inputs.items():
            io.bind_ortvalue_input(name, value)
        io.bind_output("output")
        session.model.session.run_with_iobinding(io)
        np.testing.assert_allclose(io.copy_outputs_to_cpu()[0], want, atol=2e-5)


def test_the_flag_is_added_dropped_and_checked(demo: Demo, models, tmp_path: Path) -> None:
    model, branched = models
    params = graph_adapter_params(demo.graph)
    assert ADAPTER_FLAG in check_params(params, spec_of(branched), "own")
    assert ADAPTER_FLAG not in check_params(params, spec_of(model), "own")
    with_flag = {**params, ADAPTER_FLAG: np.ones(1, np.float32)}
    assert ADAPTER_FLAG not in check_params(with_flag, spec_of(model), "own")  # a file for the branched model
    for bad in (np.zeros(1, np.float32), np.full(1, 2, np.float32), np.ones(2, np.float32)):
        with pytest.raises(AdapterFileError, match=f"adapter 'own': parameter '{ADAPTER_FLAG}' must be"):
            check_params({**params, ADAPTER_FLAG: bad}, spec_of(branched), "own")
    # the mixed model reads the branched model's files: it has no flag and takes the weights only
    packed = [s for s in graph_slots(optimize(demo.graph, "fused", slots="swappable", pack_slots=True)) if s.members]
    mixed = MixedAdapterSession(export_mixed(optimize(demo.graph, "fused", slots="mixed"), packed=packed),
                                {"own": write_adapter(tmp_path / "own.onnx_adapter", params, model=branched)},
                                intra_op_threads=1)
    ids = demo.ids.numpy()
    np.testing.assert_allclose(mixed.run({"input_ids": ids}, "own")["output"], demo.eager(demo.merged), atol=2e-5)


def test_what_cannot_branch_is_refused(demo: Demo, models) -> None:
    model, branched = models
    with pytest.raises(ServingError, match="already branches"):
        branch_on_adapter(branched)
    with pytest.raises(ServingError, match="only a swappable export"):
        branch_on_adapter(export_mixed(optimize(demo.graph, "fused", slots="mixed")))
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.metadata_props[:]
    with pytest.raises(ServingError, match="not a swappable export"):
        branch_on_adapter(bare)
    leaky = onnx.ModelProto()
    leaky.CopyFrom(model)  # a weight read straight into an output: not a slot the base model can skip
    weight = sorted(_weights(model))[0]
    leaky.graph.node.append(onnx.helper.make_node("Identity", [weight], ["leak"]))
    leaky.graph.output.append(onnx.helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))
    with pytest.raises(ServingError, match=r"output\(s\) \['leak'\]"):
        branch_on_adapter(leaky)
