"""dce: nodes and params no output depends on disappear; graph inputs stay."""

from __future__ import annotations

import numpy as np

from flora_graph.ir import Op, verify
from flora_graph.passes.dce import dce

from .helpers import assert_same_numbers, lora_linear


def test_structure_and_numbers():
    before = lora_linear()
    g = before.copy()
    x = g.node("x")
    g.add(Op.RELU, [g.add(Op.LINEAR, [x, g.const("dead_w", np.ones((3, 8), np.float32))], name="dead")], name="dead2")
    g.params["orphan"] = np.zeros(2, np.float32)
    res = dce(g)
    verify(g)
    assert res.changed and res.stats["removed_nodes"] == 3 and res.stats["removed_params"] == 2
    assert g.ops() == before.ops() and set(g.params) == set(before.params)
    assert_same_numbers(before, g, atol=0, rtol=0)


def test_nothing_dead_and_unused_input_kept_with_reason():
    g = lora_linear()
    g.input("unused", (3,))
    res = dce(g)
    assert not res.changed and g.ops() == ["Linear", "Linear", "Linear", "Mul", "Add"]
    assert [n.name for n in g.inputs] == ["x", "unused"]
    assert res.stats["refused"] == {"unused": "dce: graph inputs stay even when unused"}
