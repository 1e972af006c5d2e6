"""merge-lora: base + s·B(A(x)) -> one Linear/Conv2d over W + s·B@A."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from flora_graph.errors import GraphError
from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import optimize
from flora_graph.passes.merge_lora import merge_lora

from .helpers import adapter, assert_same_numbers, assert_structural_equal, exported, lora_conv, lora_linear


def _expected_linear(scale: float = 0.5) -> Graph:
    src = lora_linear()
    p = src.params
    g = Graph("expected")
    x = g.input("x", ("batch", 8))
    merged = p["W"].astype(np.float32) + np.float32(scale) * (p["B"] @ p["A"])
    g.set_output("y", g.add(Op.LINEAR, [x, g.const("Wm", merged), g.const("b", p["b"])]))
    return g


@pytest.mark.parametrize("swap_add", [False, True])
@pytest.mark.parametrize("scale_left", [False, True])
def test_structure_untagged(swap_add, scale_left):
    g = lora_linear(swap_add=swap_add, scale_left=scale_left)
    res = merge_lora(g)
    verify(g)
    assert res.stats["fired"] == {"merge-lora": 1}
    assert_structural_equal(g, _expected_linear())
    assert set(g.params) == {"base.merged_weight", "b"}


def test_structure_tagged_keeps_module():
    g = exported("linear")
    merge_lora(g)
    assert g.ops() == ["Linear"]
    (node,) = (n for n in g.nodes if n.op is Op.LINEAR)
    assert node.meta["module"] == "attn.q_proj" and node.meta["role"] == "merged"
    assert node.inputs[1].attrs["param"] == "attn.q_proj.merged_weight"


def test_agrees_with_the_adapter_merge():
    layer = adapter(nn.Linear(12, 10), rank=3, name="fc")
    g = Graph("one")
    x = g.input("x", ("batch", 12))
    g.set_output("y", layer.export_graph(g, x))
    merge_lora(g)
    want = layer.merge_to_original_layer().weight.detach().numpy()
    np.testing.assert_allclose(g.params["fc.merged_weight"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: lora_linear(), lambda: lora_linear(scale=None, bias=False), lambda: lora_linear(swap_add=True, scale_left=True),
    lambda: exported("linear", 3), lambda: lora_conv(), lambda: lora_conv(stride=(2, 2), padding=(0, 0)),
    lambda: exported("conv", 2),
])
def test_numbers(make):
    before = make()
    after = merge_lora(before.copy()).graph
    verify(after)
    assert after.ops() in (["Linear"], ["Conv2d"], ["Linear"] * 3, ["Conv2d"] * 2)
    assert_same_numbers(before, after, atol=1e-5, rtol=1e-5)


def test_float16_accumulates_in_float32():
    before = lora_linear(dtype="float16")
    after = merge_lora(before.copy()).graph
    assert after.params["base.merged_weight"].dtype == np.float16
    assert_same_numbers(before, after, atol=2e-2, rtol=2e-2)


def test_stacked_adapters_merge_in_turn():
    g = lora_linear()
    nodes = {n.name: n for n in g.nodes}
    rng = np.random.default_rng(5)
    h2 = g.add(Op.LINEAR, [nodes["x"], g.const("A2", rng.standard_normal((3, 8)).astype(np.float32))])
    up2 = g.add(Op.LINEAR, [h2, g.const("B2", rng.standard_normal((6, 3)).astype(np.float32))])
    g.set_output("y", g.add(Op.ADD, [nodes["add"], up2], name="add2"))
    before = g.copy()
    res = merge_lora(g)
    assert res.stats["fired"] == {"merge-lora": 2} and res.stats["iterations"] == 3
    assert g.ops() == ["Linear"]
    assert_same_numbers(before, g)


def test_shared_base_weight_is_not_edited():
    g = lora_linear()
    nodes = {n.name: n for n in g.nodes}
    g.set_output("other", g.add(Op.LINEAR, [nodes["x"], nodes["W"]], name="other"))
    w = g.params["W"].copy()
    before = g.copy()
    merge_lora(g)
    np.testing.assert_array_equal(g.params["W"], w)
    assert_same_numbers(before, g)


def test_conv_refused_when_down_stride_differs():
    # down at stride 1 then a stride-2 1x1 up gives the base's shape, but is not the base's geometry
    g = lora_conv(stride=(2, 2), down_stride=(1, 1), up_stride=(2, 2))
    before = g.copy()
    res = merge_lora(g)
    assert not res.changed and g.ops() == before.ops()
    assert res.stats["refused"]["add"] == "merge-lora: lora_down 'down' stride (1, 1) differs from the base's (2, 2)"


def test_conv_refusals_name_the_reason():
    g = lora_conv()
    nodes = {n.name: n for n in g.nodes}
    nodes["down"].attrs["dilation"] = (2, 2)  # same output size (padding 2 keeps 8x8)
    nodes["down"].attrs["padding"] = (2, 2)
    verify(g)
    res = merge_lora(g)
    assert not res.changed
    assert res.stats["refused"]["add"] == "merge-lora: lora_down 'down' padding (2, 2) differs from the base's (1, 1)"
    g = lora_conv(up_kernel=3)
    res = merge_lora(g)
    assert not res.changed
    assert res.stats["refused"]["add"] == "merge-lora: lora_up 'up' is not a 1x1, stride-1, unpadded convolution"
    assert g.ops() == ["Conv2d", "Conv2d", "Conv2d", "Mul", "Add"]


def test_refused_when_branch_is_read_elsewhere():
    g = lora_linear()
    g.set_output("base_too", g.node("base"))
    res = merge_lora(g)
    assert not res.changed
    assert "intermediate values are read outside the adapter: {'base': ['<output>']}" in res.stats["refused"]["add"]


def test_non_finite_merge_raises_naming_the_node():
    g = lora_linear(dtype="float16", scale=60000.0)
    with pytest.raises(GraphError, match=r"merged weight of node 'add' \(module 'base'\)"):
        merge_lora(g)
    g = lora_linear()
    g.params["B"][0, 0] = np.inf
    with pytest.raises(GraphError, match=r"'add'.*not finite"):
        merge_lora(g)


def test_non_finite_merge_through_optimize_names_pass_and_node():
    g = lora_linear(dtype="float16", scale=60000.0)
    with pytest.raises(GraphError, match=r"pass 'merge-lora' \(iteration 1; passes run before it: \['simplify', 'drop-zero-lora', 'fold-lora-scale'\]\).*node 'add'"):
        optimize(g, "merged", verify_each=True)  # fold-lora-scale refuses (s·B overflows float16), merge raises
