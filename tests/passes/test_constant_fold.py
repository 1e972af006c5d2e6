"""constant-fold: all-Const nodes become Consts computed by the numpy reference."""

from __future__ import annotations

import numpy as np

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import optimize
from flora_graph.passes.constant_fold import constant_fold

from .helpers import assert_same_numbers, assert_structural_equal, exported, live_ops


def _graph() -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("cf")
    x = g.input("x", ("batch", 4))
    b = g.const("B", rng.standard_normal((4, 2)).astype(np.float32))
    a = g.const("A", rng.standard_normal((2, 4)).astype(np.float32))
    s = g.const("s", np.asarray(0.5, np.float32))
    w = g.add(Op.MUL, [g.add(Op.MATMUL, [b, a], name="ba"), s], name="w")  # a chain of two
    g.set_output("y", g.add(Op.LINEAR, [x, w], name="lin"))
    return verify(g)


def test_structure_and_numbers():
    before = _graph()
    g = before.copy()
    res = constant_fold(g)
    verify(g)
    assert res.stats["folded"] == 2 and g.ops() == ["Linear"]
    p = before.params
    e = Graph("e")
    e.set_output("y", e.add(Op.LINEAR, [e.input("x", ("batch", 4)), e.const("w", (p["B"] @ p["A"]) * np.float32(0.5))]))
    assert_structural_equal(g, e)
    assert_same_numbers(before, g, atol=1e-6, rtol=1e-6)


def test_folds_swappable_weight_expressions_of_the_fused_preset():
    before = exported("linear", 3)
    fused = optimize(before, "fused")
    assert live_ops(fused) != fused.ops()  # Mul(B, s) on weights
    g = constant_fold(fused.copy()).graph
    assert g.ops() == live_ops(g)
    assert_same_numbers(before, g)


def test_refused_when_too_large_and_not_on_inputs():
    g = _graph()
    res = constant_fold(g, max_elements=8)
    assert res.stats["folded"] == 0 and not res.changed
    assert res.stats["refused"]["ba"] == "constant-fold: result has 16 values > max_elements=8"
    assert g.ops() == ["MatMul", "Mul", "Linear"]  # Linear reads the input x: never folded
