"""Inputs past a graph's ``dim_max`` are refused by every backend before it runs, naming the dim and its maximum."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.errors import RuntimeInputError
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import compile, run


def bounded() -> Graph:
    """``tokens[batch, seq] + positions[:seq]`` over a 4-row position table: valid for seq <= 4."""
    g = Graph("bounded")
    x = g.input("tokens", ("batch", "seq", 3))
    table = g.const("positions", np.arange(12, dtype=np.float32).reshape(4, 3))
    pos = g.add(Op.SLICE, [table], {"axes": (0,), "starts": (0,), "ends": ("seq",), "steps": (1,)})
    g.set_output("y", g.add(Op.ADD, [x, pos]))
    g.dim_max = {"seq": 4}
    return verify(g)


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "torchscript"])
def test_past_dim_max_is_a_runtime_input_error(backend: str) -> None:
    g = bounded()
    exe = compile(g, backend)
    ok = np.ones((2, 4, 3), np.float32)
    np.testing.assert_allclose(exe(tokens=ok)["y"], run(g, {"tokens": ok})["y"])
    with pytest.raises(RuntimeInputError, match=r"input 'tokens' dim 1: dim 'seq' is 5, past its maximum 4"):
        exe(tokens=np.ones((2, 5, 3), np.float32))


def test_reference_run_checks_dim_max_too() -> None:
    with pytest.raises(RuntimeInputError, match=r"'seq' is 9, past its maximum 4"):
        run(bounded(), {"tokens": np.ones((1, 9, 3), np.float32)})
