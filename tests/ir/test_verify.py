"""verify(): every defect it must catch names the node at fault; toposort and remove_dead."""

from __future__ import annotations

import numpy as np
import pytest

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir import Graph, Op, verify

from .helpers import rich_graph, tiny_graph


def chain() -> tuple[Graph, dict]:
    """x -> a=Relu -> b=Neg -> c=Tanh -> out, plus y=Add(c, w) with a weight."""
    g = Graph("chain")
    x = g.input("x", ("batch", 4))
    a = g.add(Op.RELU, [x], name="a")
    b = g.add(Op.NEG, [a], name="b")
    c = g.add(Op.TANH, [b], name="c")
    w = g.const("w", np.ones(4, dtype=np.float32), name="wc")
    y = g.add(Op.ADD, [c, w], name="y")
    g.set_output("out", y)
    return g, {"x": x, "a": a, "b": b, "c": c, "w": w, "y": y}


def fails(g: Graph, *names: str, exc: type[Exception] = GraphError, match: str | None = None) -> str:
    with pytest.raises(exc, match=match) as info:
        verify(g)
    msg = str(info.value)
    for name in names:
        assert repr(name) in msg or f" {name} " in f" {msg} ", (name, msg)
    return msg


# ------------------------------------------------------------------ accepts
@pytest.mark.parametrize("build", [tiny_graph, rich_graph, lambda: chain()[0]])
def test_accepts_valid_graphs(build):
    g = build()
    assert verify(g) is g


def test_accepts_non_canonical_but_equal_shapes():
    g = Graph()
    x = g.input("x", ("batch", "seq", 4))
    f = g.add(Op.FLATTEN, [x], {"axis": 2}, name="f")
    f.shape = ("seq*batch", 4)  # same dim, other spelling
    g.set_output("y", f)
    verify(g)


# ------------------------------------------------------------------ rejects
def test_cycle():
    g, n = chain()
    n["a"].inputs = [n["c"]]  # a reads c, c reads b reads a
    msg = fails(g, match="cycle")
    for name in ("a", "b", "c"):
        assert name in msg


def test_self_loop():
    g, n = chain()
    n["b"].inputs = [n["b"]]
    fails(g, "b", match="cycle")


def test_undefined_input():
    g, n = chain()
    other = Graph("other")
    stranger = other.input("stranger", ("batch", 4))
    n["b"].inputs = [stranger]
    fails(g, "b", "stranger", match="not defined")


def test_undefined_input_that_is_not_a_node():
    g, n = chain()
    n["b"].inputs = ["a"]  # a name, not the node
    fails(g, "b")


@pytest.mark.parametrize("extra", [0, 2])
def test_wrong_arity(extra):
    g, n = chain()
    n["b"].inputs = [n["a"]] * extra  # Neg takes exactly one input
    msg = fails(g, "b", match="inputs")
    assert f"got {extra}" in msg


def test_leaf_with_inputs():
    g, n = chain()
    n["w"].inputs = [n["x"]]
    fails(g, "wc", match="inputs")


def test_declared_shape_mismatch():
    g, n = chain()
    n["b"].shape = ("batch", 5)
    fails(g, "b", exc=ShapeError, match="shape")


def test_declared_rank_mismatch_with_dynamic_dim():
    g, n = chain()
    n["c"].shape = ("seq", 4)
    fails(g, "c", exc=ShapeError)


def test_input_shape_change_breaks_a_reader():
    g, n = chain()
    n["x"].shape = ("batch", 5)  # a, b, c follow x, but y adds a [4] weight
    fails(g, "a", exc=ShapeError)


def test_const_param_replaced_by_another_shape():
    g, _n = chain()
    g.params["w"] = np.ones(5, dtype=np.float32)
    fails(g, "wc", "w", exc=ShapeError, match="param")


def test_const_param_replaced_by_another_dtype():
    g, _n = chain()
    g.params["w"] = np.ones(4, dtype=np.float64)
    fails(g, "wc", exc=ShapeError, match="float64")


def test_const_param_not_an_array():
    g, _n = chain()
    g.params["w"] = [1.0, 1.0, 1.0, 1.0]
    fails(g, "wc", match="numpy")


def test_declared_dtype_mismatch():
    g, n = chain()
    n["b"].dtype = "float64"
    fails(g, "b", exc=ShapeError, match="dtype")


def test_input_dtype_change_breaks_a_binary_reader():
    g, n = chain()
    for key in ("x", "a", "b", "c"):
        n[key].dtype = "float16"  # the chain agrees, but y adds a float32 weight
    fails(g, "y", exc=ShapeError, match="dtype")


def test_unknown_dtype():
    g, n = chain()
    n["x"].dtype = "float8"
    fails(g, "x", match="dtype")


def test_invalid_dim_in_declared_shape():
    g, n = chain()
    n["c"].shape = ("batch", -4)
    fails(g, "c", exc=ShapeError)


def test_nodes_out_of_order():
    g, n = chain()
    i, j = g.nodes.index(n["a"]), g.nodes.index(n["b"])
    g.nodes[i], g.nodes[j] = g.nodes[j], g.nodes[i]
    fails(g, "b", "a", match="order")


def test_duplicate_names():
    g, n = chain()
    n["c"].name = "a"
    fails(g, "a", match="twice")


def test_const_refers_to_missing_param():
    g, _n = chain()
    del g.params["w"]
    fails(g, "wc", "w", match="unknown param")


def test_const_with_bad_attrs():
    g, n = chain()
    n["w"].attrs = {"param": "w", "extra": 1}
    fails(g, "wc", match="unknown attribute")


def test_unnormalized_or_invalid_attrs():
    g = Graph()
    x = g.input("x", (2, 3))
    t = g.add(Op.TRANSPOSE, [x], {"perm": (1, 0)}, name="t")
    g.set_output("y", t)
    t.attrs = {"perm": [1, 0]}  # a list where the schema normalizes to a tuple
    fails(g, "t", match="normalized")
    t.attrs = {"perm": (0, 1, 2)}
    fails(g, "t", exc=ShapeError, match="perm")
    t.attrs = {}
    fails(g, "t", match="missing")


def test_output_refers_to_node_outside_graph():
    g, _n = chain()
    stranger = Graph("other").input("stranger", (1,))
    g.set_output("extra", stranger)
    fails(g, "extra", "stranger")


def test_output_refers_to_removed_node():
    g, n = chain()
    g.set_output("mid", n["b"])
    g.nodes.remove(n["b"])
    fails(g)  # c now reads a node outside the graph


def test_graph_without_outputs():
    g, _n = chain()
    g.outputs.clear()
    fails(g, "chain", match="no outputs")


def test_input_node_not_listed_as_graph_input():
    g, _n = chain()
    g.inputs.clear()
    fails(g, "x", match="graph.inputs")


def test_graph_input_listed_twice():
    g, n = chain()
    g.inputs.append(n["x"])
    fails(g, "x", match="twice")


def test_graph_input_that_is_not_an_input_node():
    g, n = chain()
    g.inputs.append(n["a"])
    fails(g, "a", match="not an Input")


def test_input_node_with_attrs():
    g, n = chain()
    n["x"].attrs = {"axis": 0}
    fails(g, "x", match="attributes")


def test_foreign_object_among_nodes():
    g, _n = chain()
    g.nodes.append("not a node")  # type: ignore[arg-type]
    fails(g, match="not a ComputationNode")


# ------------------------------------------------------------------ toposort, remove_dead, copy
def test_toposort_fixes_out_of_order_graph():
    g = rich_graph()
    want = [n.name for n in g.nodes]
    g.nodes.reverse()
    with pytest.raises(GraphError):
        verify(g)
    g.toposort()
    verify(g)
    pos = {n.name: i for i, n in enumerate(g.nodes)}
    for n in g.nodes:
        assert all(pos[i.name] < pos[n.name] for i in n.inputs)
    assert sorted(pos) == sorted(want)


def test_toposort_keeps_a_valid_order():
    g = rich_graph()
    before = list(g.nodes)
    g.toposort()
    assert g.nodes == before


def test_toposort_moves_only_what_it_must():
    g, n = chain()
    g.nodes.remove(n["a"])
    g.nodes.append(n["a"])  # a now sits after its readers
    g.toposort()
    # each step takes the earliest-placed ready node: wc (index 3) is ready before a (now last)
    assert [m.name for m in g.nodes] == ["x", "wc", "a", "b", "c", "y"]


def test_toposort_reports_cycle_and_undefined_input():
    g, n = chain()
    n["a"].inputs = [n["c"]]
    with pytest.raises(GraphError, match="cycle"):
        g.toposort()
    g, n = chain()
    n["b"].inputs = [Graph().input("ghost", (1,))]
    with pytest.raises(GraphError, match="ghost"):
        g.toposort()


def test_remove_dead_drops_unused_nodes_and_params():
    g, n = chain()
    unused_in = g.input("unused_in", (3,))
    dead = g.add(Op.RELU, [n["b"]], name="dead")
    g.add(Op.SIGMOID, [dead], name="dead2")
    g.const("dead_w", np.zeros((2, 2), np.float32))
    assert g.remove_dead() == 3
    names = [m.name for m in g.nodes]
    assert "dead" not in names and "dead2" not in names and "dead_w" not in names
    assert "unused_in" in names and g.inputs[-1] is unused_in  # inputs stay
    assert set(g.params) == {"w"}
    verify(g)
    assert g.remove_dead() == 0
    # the dropped names are free again
    assert g.add(Op.RELU, [n["c"]], name="dead").name == "dead"


def test_replace_all_uses_rewires_readers_and_outputs():
    g, n = chain()
    g.replace_all_uses(n["c"], n["b"])
    assert n["y"].inputs[0] is n["b"]
    g.replace_all_uses(n["y"], n["a"])
    assert g.outputs["out"] is n["a"]
    assert g.remove_dead() == 4  # b, c, wc, y
    assert set(g.params) == set()
    verify(g)


def test_copy_is_deep():
    g = rich_graph()
    h = g.copy()
    verify(h)
    assert [n.name for n in h.nodes] == [n.name for n in g.nodes]
    assert not set(map(id, h.nodes)) & set(map(id, g.nodes))
    h.params["w"][0, 0] += 1.0
    assert g.params["w"][0, 0] != h.params["w"][0, 0]
    h.node("base").meta["role"] = "changed"
    assert g.node("base").meta["role"] == "base"


def test_copy_sharing_weights_is_copy_on_write():
    g = rich_graph()
    h = g.copy(share_weights=True)
    verify(h)
    assert all(np.shares_memory(h.params[k], g.params[k]) for k in g.params)
    with pytest.raises(ValueError, match="read-only"):
        h.params["w"][0, 0] += 1.0
    h.params["w"] = h.params["w"] + 1.0  # a changed weight is a new array: g keeps its own
    assert not np.array_equal(g.params["w"], h.params["w"])
    assert g.params["w"].flags.writeable
    assert h.copy(share_weights=True).params["b"] is h.params["b"]  # already read-only: no second view
