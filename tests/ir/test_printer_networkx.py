"""The text form and the networkx view."""

from __future__ import annotations

import networkx as nx
import numpy as np

from flora_graph.ir import Graph, Op, format_graph

from .helpers import rich_graph, tiny_graph


def test_printer_lines_for_every_node():
    g = rich_graph()
    text = format_graph(g)
    lines = text.splitlines()
    assert lines[0] == "graph rich(%x: f32[batch, seq, 8], %img: f64[batch, 4, 9, 9], %h: f16[seq, 4]) {"
    assert lines[-1] == "}"
    assert lines[-2] == "  return {z_flat: %flatten, a_neg: %neg, vision: %sigmoid, half: %relu, mask: %mask, steps: %steps}"
    body = [ln for ln in lines if ln.startswith("  %")]
    assert len(body) == len([n for n in g.nodes if n.op is not Op.INPUT])
    for n in g.nodes:
        if n.op is Op.INPUT:
            continue
        line = next(ln for ln in body if ln.startswith(f"  %{n.name} = "))
        assert f"[{', '.join(map(str, n.shape))}]" in line
        for k, v in n.meta.items():
            assert f"{k}={v}" in line


def test_printer_exact_lines():
    text = str(rich_graph())
    for want in [
        "  %w = Const[w] : f32[8, 8]",
        "  %scale = Const[scale] : f32[]",
        "  %conv_k = Const[conv_w] : f64[6, 2, 3, 3]",
        "  %base = Linear(%x, %w, %b) : f32[batch, seq, 8]   # adapter=default module=m.q role=base",
        "  %up = Linear(%down, %lora_B) : f32[batch, seq, 8]   # adapter=default rank=2 role=lora_up",
        "  %ln = LayerNorm[axis=-1, epsilon=1e-06](%y, %gamma, %beta) : f32[batch, seq, 8]",
        "  %gelu = Gelu[approximate=tanh](%ln) : f32[batch, seq, 8]",
        "  %flatten = Flatten[axis=2](%transpose) : f32[2*batch, 4*seq]",
        "  %split1 = Split[axis=-1, sizes=(3, 5), index=1](%gelu) : f32[batch, seq, 5]",
        "  %conv = Conv2d[stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2](%img, %conv_k, %conv_b)"
        " : f64[batch, 6, 5, 5]   # module=vision.conv1",
        "  %mm = MatMul(%h, %m) : f16[seq, 5]",
        "  %steps = Const[steps] : i64[3]",
        "  %mask = Const[mask] : bool[2, 2]",
    ]:
        assert want in text.splitlines(), want


def test_printer_without_meta():
    g = tiny_graph()
    assert "#" in g.format()
    plain = g.format(meta=False)
    assert "#" not in plain and "adapter" not in plain
    assert "  %lin = Linear(%x, %w, %b) : f32[batch, 4]" in plain.splitlines()


def test_printer_is_deterministic_and_tracks_edits():
    g = tiny_graph()
    assert str(g) == str(g.copy())
    g.node("act").meta["adapter"] = "other"
    assert "  %act = Relu(%lin) : f32[batch, 4]   # adapter=other" in str(g).splitlines()


def test_summary_counts():
    s = tiny_graph().summary()
    assert "5 nodes" in s and "2 weights" in s and "36 values" in s and "Linear x1" in s and "Relu x1" in s


def test_networkx_one_node_per_ir_node_and_one_edge_per_use():
    g = rich_graph()
    nxg = g.to_networkx()
    assert isinstance(nxg, nx.MultiDiGraph)
    assert set(nxg.nodes) == {n.name for n in g.nodes}
    assert nxg.number_of_nodes() == len(g.nodes)
    assert nxg.number_of_edges() == sum(len(n.inputs) for n in g.nodes)
    assert nx.is_directed_acyclic_graph(nxg)
    conv = nxg.nodes["conv"]
    assert conv["op"] == "Conv2d" and conv["shape"] == ("batch", 6, 5, 5) and conv["dtype"] == "float64"
    assert conv["meta"] == {"module": "vision.conv1"} and conv["attrs"]["groups"] == 2
    # edges carry the input position
    assert sorted(d["index"] for _, _, d in nxg.in_edges("conv", data=True)) == [0, 1, 2]
    assert {u for u, _ in nxg.in_edges("conv")} == {"img", "conv_k", "conv_b"}


def test_networkx_repeated_input_gives_parallel_edges():
    g = Graph("sq")
    x = g.input("x", ("batch", 3))
    sq = g.add(Op.MUL, [x, x], name="sq")
    y = g.add(Op.ADD, [sq, sq], name="y")
    g.set_output("y", y)
    nxg = g.to_networkx()
    assert nxg.number_of_edges("x", "sq") == 2
    assert nxg.number_of_edges("sq", "y") == 2
    assert sorted(d["index"] for u, _, d in nxg.edges(data=True) if u == "x") == [0, 1]
    assert nxg.number_of_edges() == 4


def test_networkx_view_sees_a_cycle_made_by_mutation():
    g = tiny_graph()
    g.node("lin").inputs[0] = g.node("act")
    assert not nx.is_directed_acyclic_graph(g.to_networkx())


def test_networkx_agrees_with_users():
    g = rich_graph()
    nxg = g.to_networkx()
    users = g.users()
    for n in g.nodes:
        assert sorted(v for _, v in nxg.out_edges(n.name)) == sorted(u.name for u in users[n])


def test_networkx_isolated_const():
    g = Graph()
    c = g.const("c", np.zeros(2, np.float32))
    g.set_output("c", c)
    nxg = g.to_networkx()
    assert list(nxg.nodes) == ["c"] and nxg.number_of_edges() == 0
