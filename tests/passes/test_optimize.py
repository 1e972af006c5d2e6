"""optimize and its presets on the demo model and on tagged/untagged graphs."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.errors import GraphError
from flora_graph.ir import Graph, Op
from flora_graph.passes import PASSES, PRESETS, PassResult, optimize, optimize_with_report, register_pass
from flora_graph.runtimes.reference import run

from .helpers import assert_same_numbers, demo_graph, exported, inputs_for, lora_linear

MODULES = ("conv1", "conv2", "fc_in", "fc_mid", "head")


@pytest.fixture
def spy():
    calls: list[str] = []

    @register_pass("spy")
    def spy_pass(graph):
        calls.append(graph.name)
        return PassResult(graph, False, {})

    yield calls
    PASSES.pop("spy")


def test_never_mutates_its_argument():
    g = demo_graph()
    text, params = g.format(), {k: v.copy() for k, v in g.params.items()}
    for preset in PRESETS:
        out = optimize(g, preset, verify_each=True)
        assert out is not g
    assert g.format() == text and all(np.array_equal(g.params[k], v) for k, v in params.items())


def test_invalid_graph_raises_before_any_pass(spy, monkeypatch):
    g = lora_linear()
    g.node("add").shape = (9,)  # declared shape disagrees with the inputs
    with pytest.raises(GraphError, match="node 'add'"):
        optimize(g, ["spy", "dce"])
    monkeypatch.setitem(PRESETS, "fused", ("spy", *PRESETS["fused"]))
    with pytest.raises(GraphError, match="node 'add'"):
        optimize(g, "fused", verify_each=True)
    assert spy == []
    optimize(lora_linear(), "fused")
    assert spy and set(spy) == {"lora_linear"}  # the spy does run on a valid graph


def test_unfused_is_the_graph_as_exported():
    g = demo_graph()
    out, report = optimize_with_report(g, "unfused", verify_each=True)
    assert out.format() == g.format() and report.records == []


def test_fused_keeps_adapters_separate_and_swappable():
    before = demo_graph()
    fused = optimize(before, "fused", verify_each=True)
    for m in MODULES:
        for w in ("lora_A", "lora_B"):
            name = f"{m}.{w}"
            assert any(n.op is Op.CONST and n.attrs["param"] == name for n in fused.nodes), name
            np.testing.assert_array_equal(fused.params[name], before.params[name])
    assert "Mul" in fused.ops() and fused.ops().count("Add") == 6  # the scale moved onto B; every branch still added
    assert_same_numbers(before, fused, atol=1e-5, rtol=1e-5)
    # swapping an adapter = writing new A/B into both graphs gives equal outputs again
    rng = np.random.default_rng(7)
    for m in MODULES:
        for w in ("lora_A", "lora_B"):
            new = rng.standard_normal(before.params[f"{m}.{w}"].shape).astype(np.float32) * 0.1
            before.params[f"{m}.{w}"] = new
            fused.params[f"{m}.{w}"] = new.copy()
    assert_same_numbers(before, fused, atol=1e-5, rtol=1e-5)


def test_merged_has_no_lora_nodes_left():
    before = demo_graph()
    merged, report = optimize_with_report(before, "merged", verify_each=True)
    assert merged.ops().count("Linear") == 3 and merged.ops().count("Conv2d") == 2  # one per base layer
    assert not any(str(n.meta.get("role", "")).startswith("lora") for n in merged.nodes)
    assert not any("lora" in p for p in merged.params) and "Mul" not in merged.ops()
    assert report.converged and report.fired()["merge-lora"] == 5
    assert_same_numbers(before, merged, atol=1e-5, rtol=1e-5)
    for seed in (1, 2):
        feeds = inputs_for(before, seed, {"batch": 5})
        np.testing.assert_allclose(run(merged, feeds)["output"], run(before, feeds)["output"], atol=1e-5, rtol=1e-5)


def test_fused_on_qkv_siblings_and_base_and_down_option():
    before = exported("linear", 3)
    fused = optimize(before, "fused", verify_each=True)
    assert fused.ops().count("Split") == 3
    assert_same_numbers(before, fused)
    both, report = optimize_with_report(before, "fused", verify_each=True, fuse_base_and_down=True)
    assert "fuse-base-and-down" in report.fired() and both.ops().count("Split") == 6
    assert_same_numbers(before, both)


def test_untagged_graph_presets():
    before = lora_linear()
    assert optimize(before, "merged").ops() == ["Linear"]
    assert_same_numbers(before, optimize(before, "fused"))
    kept = optimize(lora_linear(zero="B"), "fused")  # swappable: a zero B stays, to be swapped later
    assert kept.ops().count("Linear") == 3
    dropped = optimize(lora_linear(zero="B"), "fused", drop_zero_lora=True)
    assert dropped.ops() == ["Linear"]
    assert optimize(lora_linear(zero="B"), "merged").ops() == ["Linear"]


def test_bad_presets_and_options():
    with pytest.raises(ValueError, match="unknown preset"):
        optimize(lora_linear(), "fastest")
    with pytest.raises(TypeError, match=r"\['swapable'\]"):
        optimize(lora_linear(), "fused", swapable=True)
    out = optimize(lora_linear(), "fused", swappable=False, dynamic_dim_size=8, max_iterations=3)
    assert "Mul" not in out.ops()  # not swappable: s·B is a new param


def test_deep_graphs_optimize_without_recursion():
    """300 stacked adapters (2,100+ nodes): copying, matching and scheduling are iterative."""
    rng = np.random.default_rng(0)
    g = Graph("deep")
    v = g.input("x", ("batch", 8))
    for i in range(300):
        base = g.add(Op.LINEAR, [v, g.const(f"W{i}", (rng.standard_normal((8, 8)) * 0.3).astype(np.float32))])
        h = g.add(Op.LINEAR, [v, g.const(f"A{i}", rng.standard_normal((2, 8)).astype(np.float32))])
        up = g.add(Op.LINEAR, [h, g.const(f"B{i}", (rng.standard_normal((8, 2)) * 0.1).astype(np.float32))])
        v = g.add(Op.TANH, [g.add(Op.ADD, [base, g.add(Op.MUL, [up, g.const(f"s{i}", np.float32(0.5))])])])
    g.set_output("y", v)
    merged = optimize(g, "merged")
    assert merged.ops() == ["Linear", "Tanh"] * 300
    assert_same_numbers(g, merged, atol=1e-5, rtol=1e-4)


def test_copy_keeps_the_input_order_and_tags():
    g = Graph("two")
    a, b = g.input("a", (2, 3)), g.input("b", (2, 3), module="m")
    g.set_output("y", g.add(Op.ADD, [a, b], meta={"role": "sum"}))
    g.inputs.reverse()  # the signature order need not follow the node order
    out = optimize(g, "fused")
    assert [n.name for n in out.inputs] == ["b", "a"] and out.inputs[0].meta == {"module": "m"}
    assert out.outputs["y"].meta == {"role": "sum"}


def test_backend_defaults_add_measured_fusions_and_explicit_options_win():
    from flora_graph.passes import BACKEND_DEFAULTS

    before = demo_graph()
    _, ort = optimize_with_report(before, "fused", backend="onnxruntime", verify_each=True)
    assert BACKEND_DEFAULTS["onnxruntime"]["fused"] == {"fuse_base_and_down": "Conv2d"}
    assert "fuse-base-and-down" in {r.name for r in ort.records}
    stacked = {n.name for n in optimize(before, "fused", backend="onnxruntime").nodes if n.name.endswith(".base_and_down")}
    assert stacked == {"conv1.base_and_down", "conv2.base_and_down"}  # Linear sites measured slower stacked on ORT
    everything = optimize(before, "fused", backend="onnxruntime", fuse_base_and_down=True)
    assert {n.name for n in everything.nodes if n.name.endswith(".base_and_down")} == {f"{m}.base_and_down" for m in MODULES}
    _, plain = optimize_with_report(before, "fused", backend="torch-export")
    assert "fuse-base-and-down" not in {r.name for r in plain.records}
    _, off = optimize_with_report(before, "fused", backend="onnxruntime", fuse_base_and_down=False)
    assert "fuse-base-and-down" not in {r.name for r in off.records}
    assert_same_numbers(before, optimize(before, "fused", backend="onnxruntime"))


def test_result_shares_unchanged_weights_read_only_and_never_writes_them():
    """optimize copies no weight: unchanged ones are read-only views of the input's arrays (writing
    one raises instead of changing the input), and a changed one is a new array."""
    g = lora_linear()
    before = {k: v.copy() for k, v in g.params.items()}
    out = optimize(g, "merged")
    merged = [n.attrs["param"] for n in out.nodes if n.op is Op.CONST and n.attrs["param"] not in g.params]
    assert merged and not any(np.shares_memory(out.params[p], v) for p in merged for v in g.params.values())
    shared = [p for p in out.params if p in g.params]
    assert shared and all(np.shares_memory(out.params[p], g.params[p]) for p in shared)
    with pytest.raises(ValueError, match="read-only"):
        out.params[shared[0]][...] = 0
    fused = optimize(g, "fused")
    for arr in fused.params.values():
        with pytest.raises(ValueError, match="read-only"):
            arr[...] = 0
    assert all(np.array_equal(g.params[k], v) for k, v in before.items())
    assert all(v.flags.writeable for v in g.params.values())  # the input's own arrays stay writable
