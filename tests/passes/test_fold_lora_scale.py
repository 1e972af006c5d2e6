"""fold-lora-scale: Mul(up(h, B), s) -> up(h, s·B)."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import PASSES
from flora_graph.passes.fold_lora_scale import fold_lora_scale

from .helpers import assert_same_numbers, assert_structural_equal, exported, live_ops, lora_conv, lora_linear


def _expected_linear() -> Graph:
    rng = np.random.default_rng(0)  # the same draws as lora_linear()
    g = Graph("expected")
    x = g.input("x", ("batch", 8))
    w, b = rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    a, bb = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    base = g.add(Op.LINEAR, [x, g.const("W", w), g.const("b", b)])
    h = g.add(Op.LINEAR, [x, g.const("A", a)])
    up = g.add(Op.LINEAR, [h, g.const("Bs", (bb * np.float32(0.5)).astype(np.float32))])
    g.set_output("y", g.add(Op.ADD, [base, up]))
    return g


@pytest.mark.parametrize("scale_left", [False, True])
def test_structure_untagged(scale_left):
    g = lora_linear(scale_left=scale_left)
    res = fold_lora_scale(g)
    verify(res.graph)
    assert res.changed and res.stats["fired"] == {"fold-lora-scale": 1}
    assert_structural_equal(res.graph, _expected_linear())
    assert "B.scaled" in g.params and "B" not in g.params and "s" not in g.params  # unused params dropped


def test_structure_and_tags_exported():
    g = exported("linear")
    res = fold_lora_scale(g)
    assert g.ops() == ["Linear", "Linear", "Linear", "Add"]
    up = g.outputs["y0"].inputs[1]
    assert up.meta["role"] == "lora_up" and up.meta["module"] == "attn.q_proj"
    assert up.inputs[1].attrs["param"] == "attn.q_proj.lora_B.scaled"
    assert res.stats["refused"] == {}


@pytest.mark.parametrize("make", [lambda: lora_linear(), lambda: lora_linear(scale_left=True, swap_add=True),
                                  lambda: exported("linear", 3), lambda: lora_conv(), lambda: exported("conv")])
def test_numbers(make):
    before = make()
    after = fold_lora_scale(before.copy()).graph
    verify(after)
    assert "Mul" not in after.ops()
    assert_same_numbers(before, after, atol=1e-5, rtol=1e-5)


def test_conv_structure():
    g = lora_conv()
    res = fold_lora_scale(g)
    assert res.stats["fired"] == {"fold-lora-scale": 1}
    assert g.ops() == ["Conv2d", "Conv2d", "Conv2d", "Add"]
    np.testing.assert_allclose(g.params["B.scaled"], lora_conv().params["B"] * np.float32(0.25), rtol=1e-7)


def test_swappable_keeps_b_and_s():
    before = lora_linear()
    g = fold_lora_scale(before.copy(), swappable=True).graph
    verify(g)
    assert live_ops(g) == ["Linear", "Linear", "Linear", "Add"]  # the Mul moved onto the weights
    assert g.ops().count("Mul") == 1 and {"B", "s"} <= set(g.params)
    assert_same_numbers(before, g)


def test_shared_weight_is_never_edited():
    g = lora_linear()
    nodes = {n.name: n for n in g.nodes}
    other = g.add(Op.LINEAR, [nodes["down"], nodes["B"]], name="other_reader_of_B")
    g.set_output("z", other)
    b_before = g.params["B"].copy()
    before = g.copy()
    fold_lora_scale(g)
    np.testing.assert_array_equal(g.params["B"], b_before)
    assert_same_numbers(before, g)


def test_refused_when_up_is_read_elsewhere():
    g = lora_linear()
    g.set_output("up_too", g.node("up"))
    res = fold_lora_scale(g)
    assert not res.changed and res.stats["fired"] == {}
    assert "is also read by ['<output>']" in res.stats["refused"]["scale"]
    assert g.ops() == ["Linear", "Linear", "Linear", "Mul", "Add"]


def test_refused_when_scaled_weight_overflows():
    g = lora_linear(dtype="float16", scale=60000.0)
    res = fold_lora_scale(g)
    assert not res.changed and "not finite in float16" in res.stats["refused"]["scale"]


def test_non_scalar_mul_is_not_a_scale():
    g = lora_linear()
    g.params["s"] = np.full((6,), 0.5, dtype=np.float32)
    g.node("s").shape = (6,)
    verify(g)
    res = fold_lora_scale(g)
    assert not res.changed and res.stats["refused"] == {}  # no pattern match, so nothing to refuse


def test_registered():
    assert PASSES["fold-lora-scale"] is fold_lora_scale
