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
