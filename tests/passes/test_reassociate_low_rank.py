"""reassociate-low-rank: (x A^T) B^T vs x (B A)^T, chosen per branch by the cost model."""

from __future__ import annotations

import pytest

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes.reassociate_low_rank import branch_costs, reassociate_low_rank

from .helpers import assert_same_numbers, assert_structural_equal, demo_graph, exported, lora_conv, lora_linear


def _high_rank(**kw) -> Graph:
    """rank 12 of 16x16: the product form does fewer FLOPs and moves fewer bytes."""
    return lora_linear(d_in=16, d_out=16, rank=12, x_shape=kw.pop("x_shape", (64, 16)), **kw)


def test_cost_model_formula():
    c = branch_costs(64, 16, 16, 12, 4, product_static=True, peak_flops=1e11, bandwidth=2e10)
    assert c["low_rank_flops"] == 2 * 64 * 12 * 32 and c["product_flops"] == 2 * 64 * 16 * 16
    assert c["low_rank_bytes"] == 4 * (64 * 16 + 12 * 16 + 2 * 64 * 12 + 12 * 16 + 64 * 16)
    assert c["product_bytes"] == 4 * (64 * 16 + 16 * 16 + 64 * 16)
    assert c["product"] == pytest.approx(c["product_flops"] / 1e11 + c["product_bytes"] / 2e10)
    runtime = branch_costs(64, 16, 16, 12, 4, product_static=False)
    assert runtime["product_flops"] == c["product_flops"] + 2 * 16 * 12 * 16


def test_structure_product_chosen():
    before = _high_rank()
    g = before.copy()
    res = reassociate_low_rank(g)
    verify(g)
    assert res.stats["fired"] == {"reassociate-to-product": 1}
    assert g.ops() == ["Linear", "Linear", "Mul", "Add"]
    (d,) = res.stats["decisions"].values()
    assert d["choice"] == "product" and d["product"] < d["low_rank"] and d["rank"] == 12
    p = before.params
    expected = Graph("expected")
    x = expected.input("x", (64, 16))
    base = expected.add(Op.LINEAR, [x, expected.const("W", p["W"]), expected.const("b", p["b"])])
    prod = expected.add(Op.LINEAR, [x, expected.const("BA", p["B"] @ p["A"])])
    expected.set_output("y", expected.add(Op.ADD, [base, expected.add(Op.MUL, [prod, expected.const("s", p["s"])])]))
    assert_structural_equal(g, expected)
    assert_same_numbers(before, g, atol=1e-5, rtol=1e-5)


def test_low_rank_kept_with_costs_in_stats():
    g = demo_graph()
    res = reassociate_low_rank(g)
    assert not res.changed
    decisions = res.stats["decisions"]
    assert set(decisions) == {"fc_in.lora_up", "fc_mid.lora_up", "head.lora_up"}
    assert all(d["choice"] == "low_rank" and d["low_rank"] <= d["product"] for d in decisions.values())
    assert res.stats["refused"]["fc_in.lora_up"].startswith("reassociate-to-product: low-rank form is cheaper (")
    assert res.stats["refused"]["conv1.lora_up"] == "reassociate-to-product: Conv2d branches are not reassociated (Linear only)"


def test_conv_refused():
    res = reassociate_low_rank(lora_conv(rank=3))
    assert not res.changed and "Conv2d branches" in res.stats["refused"]["up"]


def test_refused_when_down_is_read_elsewhere():
    g = _high_rank()
    g.set_output("h", g.node("down"))
    res = reassociate_low_rank(g)
    assert not res.changed and res.stats["refused"]["up"] == "reassociate-to-product: lora_down 'down' is also read by ['<output>']"


def test_swappable_counts_the_runtime_product_and_decides_by_rows():
    few = reassociate_low_rank(_high_rank(x_shape=("batch", 16)), swappable=True, dynamic_dim_size=1)
    assert not few.changed and next(iter(few.stats["decisions"].values()))["choice"] == "low_rank"
    before = _high_rank(x_shape=("batch", 16))
    g = before.copy()
    many = reassociate_low_rank(g, swappable=True, dynamic_dim_size=4096)
    assert many.stats["fired"] == {"reassociate-to-product": 1}
    assert g.ops() == ["Linear", "MatMul", "Linear", "Mul", "Add"] and {"A", "B"} <= set(g.params)
    assert_same_numbers(before, g, atol=1e-5, rtol=1e-5)
    # and back: at one row the low-rank form wins again, so the in-graph product is undone
    back = reassociate_low_rank(g, swappable=True, dynamic_dim_size=1)
    assert back.stats["fired"] == {"reassociate-to-low-rank": 1}
    assert g.ops() == ["Linear", "Linear", "Linear", "Mul", "Add"]
    assert_same_numbers(before, g, atol=1e-5, rtol=1e-5)


def test_fixed_point_is_stable():
    g = _high_rank()
    reassociate_low_rank(g)
    again = reassociate_low_rank(g)
    assert not again.changed


def test_tagged_export_product_keeps_tags():
    g = exported("linear")
    before = g.copy()
    res = reassociate_low_rank(g, dynamic_dim_size=10**6, peak_flops=1e30)  # bytes only: one weight read wins
    assert res.changed
    prod = next(n for n in g.nodes if n.meta.get("role") == "lora_product")
    assert prod.meta["module"] == "attn.q_proj"
    assert "attn.q_proj.lora_product" in g.params
    assert_same_numbers(before, g, atol=1e-4, rtol=1e-5)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="positive"):
        reassociate_low_rank(lora_linear(), peak_flops=0)
