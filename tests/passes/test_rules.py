"""The pattern language, MatchResult, Rule and RuleSet."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import Match, MatchResult, Pat, Rule, RuleSet
from flora_graph.passes.rewrite import RewriteContext, static_nodes

from .helpers import assert_same_numbers


def _graph():
    g = Graph("g")
    x = g.input("x", ("batch", 4))
    w = g.const("w", np.eye(4, dtype=np.float32))
    two = g.const("two", np.asarray(2.0, dtype=np.float32))
    lin = g.add(Op.LINEAR, [x, w], name="lin")
    m1 = g.add(Op.MUL, [lin, two], name="m1")
    m2 = g.add(Op.MUL, [two, lin], name="m2")
    a = g.add(Op.ADD, [m1, m2], name="a")
    g.set_output("y", a)
    return g, {n.name: n for n in g.nodes}


def _all(p: Pat, node, g):
    return list(p.match(node, static_nodes(g)))


def test_op_inputs_and_binding():
    g, n = _graph()
    p = Pat(Op.MUL, (Pat(Op.LINEAR, name="l"), Pat.weight("s")), name="m")
    (b,) = _all(p, n["m1"], g)
    assert b == {"m": n["m1"], "l": n["lin"], "s": n["two"]}
    assert _all(p, n["lin"], g) == []  # wrong root op


def test_commutative_inputs_match_in_either_order():
    g, n = _graph()
    p = Pat(Op.MUL, (Pat(Op.LINEAR, name="l"), Pat.weight("s")))
    assert len(_all(p, n["m2"], g)) == 1  # Mul(two, lin): scalar on the left
    sub = Pat(Op.SUB, (Pat(Op.LINEAR), Pat.weight()))
    assert sub.root_ops() == frozenset({Op.SUB})


def test_same_name_must_bind_same_node():
    g, n = _graph()
    both = Pat(Op.ADD, (Pat(Op.MUL, (Pat.any("l"), Pat.weight())), Pat(Op.MUL, (Pat.any("l"), Pat.weight()))))
    assert _all(both, n["a"], g)  # both Muls read lin
    g2 = Graph("g2")
    x, y = g2.input("x", (4,)), g2.input("y", (4,))
    s = g2.const("s", np.asarray(1.0, dtype=np.float32))
    add = g2.add(Op.ADD, [g2.add(Op.MUL, [x, s]), g2.add(Op.MUL, [y, s])])
    assert list(both.match(add, static_nodes(g2))) == []  # different inputs: no match


def test_op_sets_alternatives_predicates_and_extra_inputs():
    g, n = _graph()
    p = Pat({Op.MUL, Op.ADD}, name="r")
    assert _all(p, n["a"], g) and _all(p, n["m1"], g) and not _all(p, n["lin"], g)
    alt = Pat(Op.RELU) | Pat(Op.LINEAR, (Pat.any(), Pat.weight()), name="lin")
    assert alt.root_ops() == frozenset({Op.RELU, Op.LINEAR})
    assert _all(alt, n["lin"], g)[0]["lin"] is n["lin"]
    assert not _all(Pat(Op.LINEAR, pred=lambda node: node.shape[-1] == 5), n["lin"], g)
    assert not _all(Pat(Op.LINEAR, (Pat.any(),)), n["lin"], g)  # two inputs, one listed
    assert _all(Pat(Op.LINEAR, (Pat.any(),), extra=True), n["lin"], g)
    assert not _all(Pat.weight(), n["lin"], g)  # reads an input: not a weight
    assert "Linear" in repr(alt)


def test_match_result():
    ok = MatchResult()
    assert ok and ok.reason is None
    bad = MatchResult().fail("because")
    assert not bad and bad.reason == "because" and "because" in repr(bad)


# ------------------------------------------------------------------ RuleSet
def _mul2_to_add(m: Match, ctx: RewriteContext):
    """Replaces Mul(v, 2) with Add(v, v)."""
    return ctx.add(Op.ADD, [m["v"], m["v"]], name=f"{m.root.name}.add")


def _only_two(m: Match, ctx: RewriteContext) -> MatchResult:
    res = MatchResult()
    if float(ctx.value(m["s"])) != 2.0:
        return res.fail(f"scale is {float(ctx.value(m['s']))}, not 2")
    return res


MUL2 = Rule("mul2-to-add", Pat(Op.MUL, (Pat.any("v"), Pat.weight("s"))), _mul2_to_add, _only_two)


def test_ruleset_fires_and_counts():
    g, _ = _graph()
    before = g.copy()
    res = RuleSet([MUL2]).apply(g)
    verify(res.graph)
    assert res.changed and res.stats["fired"] == {"mul2-to-add": 2} and res.stats["converged"]
    assert res.graph.ops() == ["Linear", "Add", "Add", "Add"]
    assert_same_numbers(before, res.graph)


def test_ruleset_records_refusal_reason():
    g = Graph("g")
    x = g.input("x", (4,))
    g.set_output("y", g.add(Op.MUL, [x, g.const("three", np.asarray(3.0, dtype=np.float32))], name="m"))
    res = RuleSet([MUL2]).apply(g)
    assert not res.changed and res.stats["fired"] == {}
    assert res.stats["refused"] == {"m": "mul2-to-add: scale is 3.0, not 2"}
    assert g.ops() == ["Mul"]


def test_ruleset_reaches_fixed_point_over_chained_rewrites():
    g = Graph("chain")
    x = g.input("x", (4,))
    two = g.const("two", np.asarray(2.0, dtype=np.float32))
    v = x
    for i in range(5):
        v = g.add(Op.MUL, [v, two], name=f"m{i}")
    g.set_output("y", v)
    before = g.copy()
    res = RuleSet([MUL2]).apply(g)
    assert res.stats["fired"] == {"mul2-to-add": 5} and res.stats["converged"]
    assert g.ops() == ["Add"] * 5
    assert_same_numbers(before, g)


def test_ruleset_bounded_and_composable():
    def relu_to_identity(m, ctx):
        return ctx.add(Op.IDENTITY, [m["v"]], name="id")

    def identity_to_relu(m, ctx):
        return ctx.add(Op.RELU, [m["v"]], name="relu")

    a = RuleSet([Rule("r2i", Pat(Op.RELU, (Pat.any("v"),)), relu_to_identity)], max_iterations=3)
    b = RuleSet([Rule("i2r", Pat(Op.IDENTITY, (Pat.any("v"),)), identity_to_relu)], max_iterations=3)
    g = Graph("osc")
    g.set_output("y", g.add(Op.RELU, [g.input("x", (2,))]))
    res = (a + b).apply(g)  # each sweep flips the op: never converges, but stops
    assert not res.stats["converged"] and res.stats["iterations"] == 3
    assert [r.name for r in (a + b).rules] == ["r2i", "i2r"]


def test_rule_rewrite_returning_none_is_no_match():
    g, _ = _graph()
    res = RuleSet([Rule("noop", Pat(Op.MUL), lambda m, ctx: None)]).apply(g)
    assert not res.changed and res.stats["fired"] == {}


def test_pattern_match_on_any_root_rule():
    g, _ = _graph()
    seen = []

    def spy(m, ctx):
        seen.append(m.root.op)

    RuleSet([Rule("spy", Pat.any("n"), spy)]).apply(g)
    assert Op.INPUT in seen and Op.ADD in seen


@pytest.mark.parametrize("swappable", [False, True])
def test_context_weight_is_computed_or_built_in_graph(swappable):
    g, n = _graph()
    ctx = RewriteContext(g, {"swappable": swappable})
    w2 = ctx.weight(Op.MUL, [n["w"], n["two"]], name="w2")
    if swappable:
        assert w2.op is Op.MUL
    else:
        assert w2.op is Op.CONST and w2.attrs["param"] == "w2"
        np.testing.assert_array_equal(g.params["w2"], 2 * np.eye(4, dtype=np.float32))
    np.testing.assert_array_equal(ctx.value(w2), 2 * np.eye(4, dtype=np.float32))
