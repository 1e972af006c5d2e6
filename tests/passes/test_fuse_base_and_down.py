"""fuse-base-and-down: base W and LoRA A on one input -> one Linear over [W; A] (+ [b; 0]) and Split."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import PRESETS
from flora_graph.passes.fuse_base_and_down import fuse_base_and_down

from .helpers import assert_same_numbers, assert_structural_equal, exported, lora_conv, lora_linear


def test_structure_untagged():
    before = lora_linear()
    g = before.copy()
    res = fuse_base_and_down(g)
    verify(g)
    assert res.stats["fired"] == {"fuse-base-and-down": 1}
    p = before.params
    e = Graph("expected")
    x = e.input("x", ("batch", 8))
    wcat = e.const("Wcat", np.concatenate([p["W"], p["A"]]))
    bcat = e.const("bcat", np.concatenate([p["b"], np.zeros(2, np.float32)]))
    fused = e.add(Op.LINEAR, [x, wcat, bcat])
    base = e.add(Op.SPLIT, [fused], {"axis": -1, "sizes": (6, 2), "index": 0})
    down = e.add(Op.SPLIT, [fused], {"axis": -1, "sizes": (6, 2), "index": 1})
    up = e.add(Op.LINEAR, [down, e.const("B", p["B"])])
    e.set_output("y", e.add(Op.ADD, [base, e.add(Op.MUL, [up, e.const("s", p["s"])])]))
    assert_structural_equal(g, e)


@pytest.mark.parametrize("swappable", [False, True])
@pytest.mark.parametrize("make", [lambda: lora_linear(), lambda: lora_linear(bias=False, swap_add=True),
                                  lambda: exported("linear", 3), lambda: lora_conv(), lambda: exported("conv")])
def test_numbers(make, swappable):
    before = make()
    g = fuse_base_and_down(before.copy(), swappable=swappable).graph
    verify(g)
    assert "Split" in g.ops()
    assert_same_numbers(before, g, atol=1e-5, rtol=1e-5)


def test_tags_and_no_bias():
    g = exported("linear")
    fuse_base_and_down(g)
    splits = {n.meta["role"]: n for n in g.nodes if n.op is Op.SPLIT}
    assert set(splits) == {"base", "lora_down"} and splits["base"].meta["module"] == "attn.q_proj"
    g = lora_linear(bias=False)
    fuse_base_and_down(g)
    (fused,) = (n for n in g.nodes if n.op is Op.LINEAR and len(n.inputs) == 2 and n.shape[-1] == 8)
    assert fused.inputs[1].shape == (8, 8)


def test_conv_refused_when_attributes_differ():
    g = lora_conv(stride=(2, 2), down_stride=(1, 1), up_stride=(2, 2))
    res = fuse_base_and_down(g)
    assert not res.changed
    assert res.stats["refused"]["add"].startswith("fuse-base-and-down: lora_down 'down' attributes")


def test_not_in_the_fused_preset_by_default():
    assert "fuse-base-and-down" not in PRESETS["fused"]


def test_only_one_op_kind_fuses_that_kind_and_refuses_the_other_with_the_reason():
    g = lora_linear()
    res = fuse_base_and_down(g, only="Conv2d")
    assert not res.changed and "Linear sites are left unfused (only='Conv2d'" in res.stats["refused"]["add"]
    before = lora_conv()
    g = before.copy()
    assert fuse_base_and_down(g, only="Conv2d").stats["fired"] == {"fuse-base-and-down": 1}
    assert_same_numbers(before, g)
    assert not fuse_base_and_down(lora_conv(), only="Linear").changed
    with pytest.raises(ValueError, match="only='Gemm'"):
        fuse_base_and_down(lora_linear(), only="Gemm")
