"""Graph building guards."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.errors import GraphError
from flora_graph.ir import Graph, verify


def test_const_refuses_to_replace_an_existing_param():
    g = Graph("g")
    x = g.input("x", ["batch", 4])
    first = g.const("w", np.ones((2, 4), np.float32))
    with pytest.raises(GraphError, match="'w' already exists"):
        g.const("w", np.zeros((3, 4), np.float32))
    again = g.const("w")  # a second reader of the same weight is fine
    from flora_graph.ir import Op

    g.set_output("y", g.add(Op.ADD, [g.add(Op.LINEAR, [x, first]), g.add(Op.LINEAR, [x, again])]))
    verify(g)
    assert g.params["w"].shape == (2, 4)


def test_copy_handles_deep_graphs_and_is_independent():
    from flora_graph.ir import Op

    g = Graph("deep")
    h = g.input("x", ["batch", 4])
    for _ in range(3000):  # deeper than Python's recursion limit
        h = g.add(Op.RELU, [h], meta={"tag": [1]})
    g.set_output("y", h)
    c = g.copy()
    verify(c)
    assert [n.name for n in c.nodes] == [n.name for n in g.nodes]
    assert c.outputs["y"] is c.nodes[-1] and c.inputs[0] is c.nodes[0]
    c.nodes[-1].meta["tag"].append(2)
    assert g.nodes[-1].meta["tag"] == [1]
    assert c.nodes[1].inputs[0] is c.nodes[0] and c.nodes[1] is not g.nodes[1]
