"""cse: structurally equal nodes and byte-identical params merge."""

from __future__ import annotations

import numpy as np

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes.cse import cse

from .helpers import assert_same_numbers, assert_structural_equal, exported


def _dupes() -> Graph:
    g = Graph("dupes")
    x = g.input("x", ("batch", 4))
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    w1 = g.const("w1", w)
    w2 = g.const("w2", w.copy())  # same bytes, other param
    w1b = g.const("w1", name="w1_again")  # same param, second Const node
    a = g.add(Op.LINEAR, [x, w1], name="a")
    b = g.add(Op.LINEAR, [x, w2], name="b")
    c = g.add(Op.LINEAR, [x, w1b], name="c")
    r1, r2 = g.add(Op.RELU, [a], name="r1"), g.add(Op.RELU, [b], name="r2")
    g.set_output("y", g.add(Op.ADD, [g.add(Op.ADD, [r1, r2], name="s1"), c], name="s2"))
    return verify(g)


def test_structure():
    before = _dupes()
    g = before.copy()
    res = cse(g)
    verify(g)
    assert res.stats["merged_nodes"] == 5 and res.stats["merged_params"] == 1  # w2, w1_again, b, c, r2
    e = Graph("expected")
    x = e.input("x", ("batch", 4))
    r = e.add(Op.RELU, [e.add(Op.LINEAR, [x, e.const("w", before.params["w1"])])])
    e.set_output("y", e.add(Op.ADD, [e.add(Op.ADD, [r, r]), r.inputs[0]]))
    assert_structural_equal(g, e)
    assert set(g.params) == {"w1"}
    assert_same_numbers(before, g, atol=0, rtol=0)


def test_attributes_take_part():
    g = Graph("attrs")
    x = g.input("x", (2, 6))
    s0 = g.add(Op.SPLIT, [x], {"axis": 1, "sizes": (3, 3), "index": 0})
    s1 = g.add(Op.SPLIT, [x], {"axis": 1, "sizes": (3, 3), "index": 1})
    g.set_output("y", g.add(Op.ADD, [s0, s1]))
    res = cse(g)
    assert not res.changed and g.ops() == ["Split", "Split", "Add"]


def test_swappable_keeps_equal_adapter_weights_apart():
    g = exported("linear", 2)
    g.params["attn.k_proj.lora_B"] = g.params["attn.q_proj.lora_B"].copy()
    kept = cse(g.copy(), swappable=True)
    assert not kept.changed
    reason = kept.stats["refused"]["attn.k_proj.lora_B"]
    assert reason == "cse: param 'attn.k_proj.lora_B' equals 'attn.q_proj.lora_B' but swappable keeps weights separate"
    merged = cse(g.copy())
    assert merged.stats["merged_params"] >= 1  # B (and the equal scalings) merge
    assert_same_numbers(g, merged.graph)


def test_tagged_survivor_keeps_its_tags():
    g = exported("linear")
    x = g.inputs[0]
    dup = g.add(Op.LINEAR, [x, g.node("attn.q_proj.lora_A")], name="dup_down")
    g.set_output("extra", dup)
    cse(g)
    assert g.outputs["extra"].name == "attn.q_proj.lora_down" and g.outputs["extra"].meta["role"] == "lora_down"


def _twins(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> Graph:
    g = Graph("twins")
    x = g.input("x", ("batch", a.shape[1]))
    ys = [g.add(Op.LINEAR, [x, g.const(f"w{i}", v)], name=f"y{i}") for i, v in enumerate([a, b] + ([] if c is None else [c]))]
    out = ys[0]
    for y in ys[1:]:
        out = g.add(Op.ADD, [out, y])
    g.set_output("y", out)
    return verify(g)


def test_params_differing_off_the_sampled_values_stay_separate():
    """Weights are told apart by a sample of their values, then compared bit for bit: a weight that
    differs in one value between two sampled ones is not merged; its exact twin is."""
    a = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)
    b = a.copy()
    b.flat[1] += 1.0  # 64*300 values, 256 sampled: index 1 is not among them
    g = _twins(a, b, a.copy())
    res = cse(g)
    assert res.stats["merged_params"] == 1 and set(g.params) == {"w0", "w1"}


def test_params_merge_bitwise_not_by_value():
    """-0.0 == 0.0 and NaN != NaN as numbers; cse compares bytes, so the first pair stays separate
    and two NaN weights with one payload merge."""
    z = np.zeros((4, 4), np.float32)
    assert cse(_twins(z, -z)).stats["merged_params"] == 0
    nan = np.full((4, 4), np.nan, np.float32)
    assert cse(_twins(nan, nan.copy())).stats["merged_params"] == 1


def test_a_twin_merges_with_the_weight_it_equals_among_equal_samples():
    """w0, w1, w2 share their sampled values; w1 differs from w0 off the sample and w2 equals w1."""
    a = np.random.default_rng(1).standard_normal((64, 300)).astype(np.float32)
    b = a.copy()
    b.flat[1] += 1.0
    g = _twins(a, b, b.copy())
    res = cse(g)
    assert res.stats["merged_params"] == 1 and set(g.params) == {"w0", "w1"}
    assert [n.attrs["param"] for n in g.nodes if n.op is Op.CONST] == ["w0", "w1"]


def test_a_read_only_view_of_a_weight_merges_without_a_byte_comparison():
    a = np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32)
    view = a.view()
    view.flags.writeable = False
    g = _twins(a, view)
    assert cse(g).stats["merged_params"] == 1
