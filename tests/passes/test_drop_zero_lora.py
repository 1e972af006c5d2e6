"""drop-zero-lora: a branch whose B, A or scale is all zeros disappears exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter
from flora_graph.ir import Graph, verify
from flora_graph.passes.drop_zero_lora import drop_zero_lora
from flora_graph.runtimes.reference import run

from .helpers import assert_same_numbers, exported, inputs_for, lora_conv, lora_linear


@pytest.mark.parametrize("zero", ["B", "A", "s"])
def test_structure_and_exact_numbers_untagged(zero):
    before = lora_linear(zero=zero)
    g = before.copy()
    res = drop_zero_lora(g)
    verify(g)
    assert res.stats["fired"] == {"drop-zero-lora": 1} and res.stats["dropped"] == {"base": [zero]}
    assert g.ops() == ["Linear"] and g.outputs["y"].name == "base"
    assert set(g.params) == {"W", "b"}
    feeds = inputs_for(before)
    np.testing.assert_array_equal(run(g, feeds)["y"], run(before, feeds)["y"])  # exactly


def test_conv_variant():
    before = lora_conv(zero="B")
    g = drop_zero_lora(before.copy()).graph
    assert g.ops() == ["Conv2d"]
    assert_same_numbers(before, g, atol=0, rtol=0)


def test_fresh_tagged_adapter_with_b_zero():
    torch.manual_seed(0)
    fresh = LoRAAdapter(nn.Linear(5, 4), rank=2, module_name="fc").eval()  # B initialised to zeros
    g = Graph("fresh")
    x = g.input("x", ("batch", 5))
    g.set_output("y", fresh.export_graph(g, x))
    before = g.copy()
    drop_zero_lora(g)
    assert g.ops() == ["Linear"] and g.outputs["y"].meta["role"] == "base"
    assert_same_numbers(before, g, atol=0, rtol=0)


def test_only_the_zero_sibling_is_dropped():
    g = exported("linear", 3)
    g.params["attn.k_proj.lora_B"][:] = 0
    before = g.copy()
    res = drop_zero_lora(g)
    assert res.stats["dropped"] == {"attn.k_proj": ["B"]}
    assert g.outputs["y1"].meta["role"] == "base" and g.outputs["y0"].meta["role"] == "lora_add"
    assert_same_numbers(before, g)


def test_nonzero_branch_is_kept_with_reason():
    g = lora_linear()
    res = drop_zero_lora(g)
    assert not res.changed and g.ops() == ["Linear", "Linear", "Linear", "Mul", "Add"]
    assert res.stats["refused"] == {"add": "drop-zero-lora: A, B and s are nonzero"}

