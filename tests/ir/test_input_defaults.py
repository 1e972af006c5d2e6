"""Input defaults: declared with ``Graph.input(default=)``, verified, saved and loaded, used when an input is left out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flora_graph.errors import GraphError, RuntimeInputError, ShapeError
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import run
from flora_graph.runtimes.onnx_lowering import to_onnx


def scaled() -> Graph:
    """``y = x * s``, ``s`` an input of default 2 (rank 1, a named dim the default binds)."""
    g = Graph("d")
    x = g.input("x", ("batch", "n"))
    s = g.input("s", ("n",), default=np.full(3, 2.0, np.float32))
    g.set_output("y", g.add(Op.MUL, [x, s]))
    return verify(g)


def test_left_out_the_input_takes_its_default() -> None:
    g = scaled()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run(g, {"x": x})["y"], x * 2)
    np.testing.assert_array_equal(run(g, {"x": x, "s": np.ones(3)})["y"], x)
    with pytest.raises(RuntimeInputError, match=r"input 's' \(its default\) dim 0 binds dim 'n' to 3"):
        run(g, {"x": np.ones((2, 4), np.float32)})
    with pytest.raises(RuntimeInputError, match=r"missing input\(s\) \['x'\]"):
        run(g, {"s": np.ones(3)})


def test_a_default_must_fit_its_input() -> None:
    g = Graph("d")
    with pytest.raises(GraphError, match="input 'a': default of dtype float64, the input is float32"):
        g.input("a", (2,), default=np.zeros(2))
    with pytest.raises(ShapeError, match=r"input 'b': default of shape \[3\] does not fit the declared \[2\]"):
        g.input("b", (2,), default=np.zeros(3, np.float32))
    assert not g.inputs and not g.input_defaults  # nothing half-declared
    g = scaled()
    g.input_defaults["s"] = np.zeros((3, 1), np.float32)
    with pytest.raises(ShapeError, match="input 's'"):
        verify(g)
    g.input_defaults = {"nope": np.zeros(1, np.float32)}
    with pytest.raises(GraphError, match="default for 'nope', which is not one of its inputs"):
        verify(g)


def test_defaults_are_read_only_and_copied_with_the_graph() -> None:
    g = scaled()
    assert not g.input_defaults["s"].flags.writeable
    c = g.copy()
    assert c.input_defaults["s"] is g.input_defaults["s"]
    with pytest.raises(GraphError, match="still read"):  # remove_input refuses an input a node reads
        c.remove_input(c.inputs[1])
    c.outputs["y"] = c.inputs[0]
    c.remove_dead()
    c.remove_input(c.inputs[1])
    assert [i.name for i in c.inputs] == ["x"] and c.input_defaults == {} and "s" in g.input_defaults


def test_save_load_keeps_defaults_and_files_without_them_still_load(tmp_path) -> None:
    g = scaled()
    g.save(tmp_path / "d")
    doc = json.loads((tmp_path / "d" / "graph.json").read_text())
    assert doc["input_defaults"] == {"s": "s:default"}
    back = Graph.load(tmp_path / "d")
    np.testing.assert_array_equal(back.input_defaults["s"], g.input_defaults["s"])
    assert "= default[3]" in back.format()
    clash = scaled()  # a param already named like the default's key: the key moves aside
    clash.set_output("w", clash.const("s:default", np.ones(1, np.float32)))
    clash.save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "graph.json").read_text())["input_defaults"] == {"s": "s:default_1"}
    back = Graph.load(tmp_path / "c")
    assert set(back.params) == {"s:default"} and back.input_defaults["s"].shape == (3,)
    plain = Graph("p")
    plain.set_output("y", plain.add(Op.RELU, [plain.input("x", (2,))]))
    plain.save(tmp_path / "p")
    assert "input_defaults" not in json.loads((tmp_path / "p" / "graph.json").read_text())
    assert Graph.load(tmp_path / "p").input_defaults == {}


def test_onnx_writes_a_default_as_a_same_named_initializer() -> None:
    model = to_onnx(scaled())
    assert [i.name for i in model.graph.input] == ["x", "s"]
    assert [t.name for t in model.graph.initializer] == ["s"]
