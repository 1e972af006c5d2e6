"""The LoRA recogniser: untagged variants, conv, tagged exports, captured graphs, non-matches."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.ir import Graph, Op
from flora_graph.passes import find_lora
from flora_graph.passes.lora_pattern import LORA_BRANCH, SCALED_BRANCH

from .helpers import demo_graph, exported, lora_conv, lora_linear


@pytest.mark.parametrize("swap_add", [False, True])
@pytest.mark.parametrize("scale_left", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_untagged_linear_variants(swap_add, scale_left, bias):
    g = lora_linear(swap_add=swap_add, scale_left=scale_left, bias=bias)
    (m,) = find_lora(g)
    nodes = {n.name: n for n in g.nodes}
    assert m.op is Op.LINEAR and m.add is nodes["add"] and m.base is nodes["base"]
    assert (m.down, m.up, m.scale) == (nodes["down"], nodes["up"], nodes["scale"])
    assert (m.W, m.A, m.B, m.s, m.x) == (nodes["W"], nodes["A"], nodes["B"], nodes["s"], nodes["x"])
    assert (m.bias is nodes.get("b")) if bias else m.bias is None
    assert m.rank == 2 and m.module == "base" and m.adapter is None


def test_scale_already_folded():
    (m,) = find_lora(lora_linear(scale=None))
    assert m.scale is None and m.s is None and m.up.name == "up"


def test_conv_variant():
    (m,) = find_lora(lora_conv())
    assert m.op is Op.CONV2D and m.rank == 2 and m.B.shape == (5, 2, 1, 1)


def test_tagged_export_and_capture():
    (m,) = find_lora(exported("linear"))
    assert m.module == "attn.q_proj" and m.adapter == "default"
    assert [n.meta["role"] for n in m.nodes] == ["base", "lora_down", "lora_up", "lora_scale", "lora_add"]
    found = {m.module: m.op for m in find_lora(demo_graph())}
    assert found == {"conv1": Op.CONV2D, "conv2": Op.CONV2D, "fc_in": Op.LINEAR, "fc_mid": Op.LINEAR, "head": Op.LINEAR}


def test_branches_on_different_inputs_do_not_match():
    rng = np.random.default_rng(0)
    g = Graph("two_inputs")
    x, z = g.input("x", (2, 4)), g.input("z", (2, 4))
    base = g.add(Op.LINEAR, [x, g.const("W", rng.standard_normal((3, 4)).astype(np.float32))])
    h = g.add(Op.LINEAR, [z, g.const("A", rng.standard_normal((1, 4)).astype(np.float32))])
    up = g.add(Op.LINEAR, [h, g.const("B", rng.standard_normal((3, 1)).astype(np.float32))])
    g.set_output("y", g.add(Op.ADD, [base, up]))
    assert list(find_lora(g)) == []
    assert [m.up.name for m in find_lora(g, LORA_BRANCH)] == [up.name]  # the bare branch still is one


def test_non_scalar_or_input_weights_do_not_match():
    g = lora_linear()
    # a weight that is a graph input is not static: no adapter recognised
    nodes = {n.name: n for n in g.nodes}
    b_in = g.input("B_in", (6, 2))
    nodes["up"].inputs[1] = b_in
    g.toposort()
    assert list(find_lora(g)) == []
    g2 = lora_linear()
    nodes = {n.name: n for n in g2.nodes}
    g2.params["s"] = np.full((6,), 0.5, dtype=np.float32)  # a per-channel vector is not a scalar scale
    nodes["s"].shape = (6,)
    assert list(find_lora(g2, SCALED_BRANCH)) == []
    assert list(find_lora(g2)) == []
