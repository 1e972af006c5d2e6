"""Graph builders and comparisons shared by the IR tests."""

from __future__ import annotations

import numpy as np

from flora_graph.ir import Graph, Op


def tiny_graph() -> Graph:
    """x -> Linear(W, b) -> Relu -> out, with an adapter tag on the Linear."""
    g = Graph("tiny")
    x = g.input("x", ("batch", 8))
    w = g.const("w", np.arange(32, dtype=np.float32).reshape(4, 8))
    b = g.const("b", np.ones(4, dtype=np.float32))
    y = g.add(Op.LINEAR, [x, w, b], name="lin", meta={"adapter": "default", "role": "base"})
    r = g.add(Op.RELU, [y], name="act")
    g.set_output("out", r)
    return g


def rich_graph() -> Graph:
    """A graph touching every non-leaf op and the dtypes float32, float64, float16, int64, bool."""
    rng = np.random.default_rng(0)
    g = Graph("rich")
    # float32 branch: a LoRA-shaped block, normalisation and movement ops
    x = g.input("x", ("batch", "seq", 8), module="embed")
    w = g.const("w", rng.standard_normal((8, 8)).astype(np.float32))
    b = g.const("b", rng.standard_normal(8).astype(np.float32))
    a = g.const("lora_A", rng.standard_normal((2, 8)).astype(np.float32))
    bb = g.const("lora_B", rng.standard_normal((8, 2)).astype(np.float32))
    s = g.const("scale", np.array(0.5, dtype=np.float32))
    base = g.add(Op.LINEAR, [x, w, b], name="base", meta={"adapter": "default", "role": "base", "module": "m.q"})
    down = g.add(Op.LINEAR, [x, a], name="down", meta={"adapter": "default", "role": "lora_down"})
    up = g.add(Op.LINEAR, [down, bb], name="up", meta={"adapter": "default", "role": "lora_up", "rank": 2})
    scaled = g.add(Op.MUL, [up, s], name="scaled")
    y = g.add(Op.ADD, [base, scaled], name="y")
    gamma = g.const("gamma", np.ones(8, dtype=np.float32))
    beta = g.const("beta", np.zeros(8, dtype=np.float32))
    ln = g.add(Op.LAYER_NORM, [y, gamma, beta], {"epsilon": 1e-6}, name="ln")
    ge = g.add(Op.GELU, [ln], {"approximate": "tanh"}, name="gelu")
    sm = g.add(Op.SOFTMAX, [ge], {"axis": 1}, name="softmax")
    rs = g.add(Op.RESHAPE, [sm], {"shape": (0, 0, 2, 4)}, name="reshape")
    tr = g.add(Op.TRANSPOSE, [rs], {"perm": (0, 2, 1, 3)}, name="transpose")
    fl = g.add(Op.FLATTEN, [tr], {"axis": 2}, name="flatten")
    s0 = g.add(Op.SPLIT, [ge], {"axis": -1, "sizes": (3, 5), "index": 0}, name="split0")
    s1 = g.add(Op.SPLIT, [ge], {"axis": -1, "sizes": (3, 5), "index": 1}, name="split1")
    cat = g.add(Op.CONCAT, [s1, s0], {"axis": 2}, name="concat")
    sub = g.add(Op.SUB, [cat, ge], name="sub")
    div = g.add(Op.DIV, [sub, s], name="div")
    neg = g.add(Op.NEG, [div], name="neg")
    # float64 branch: convolutions with every attribute
    img = g.input("img", ("batch", 4, 9, 9), dtype="float64")
    k = g.const("conv_w", rng.standard_normal((6, 2, 3, 3)), name="conv_k")
    kb = g.const("conv_b", rng.standard_normal(6))
    conv = g.add(Op.CONV2D, [img, k, kb], {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2},
                 name="conv", meta={"module": "vision.conv1"})
    sg = g.add(Op.SIGMOID, [conv], name="sigmoid")
    # float16 branch: MatMul and the remaining unary ops
    h = g.input("h", ("seq", 4), dtype="float16")
    m = g.const("m", rng.standard_normal((4, 5)).astype(np.float16))
    mm = g.add(Op.MATMUL, [h, m], name="mm")
    si = g.add(Op.SILU, [mm], name="silu")
    th = g.add(Op.TANH, [si], name="tanh")
    idn = g.add(Op.IDENTITY, [th], name="ident")
    rl = g.add(Op.RELU, [idn], name="relu")
    # integer and bool weights as outputs of their own
    steps = g.const("steps", np.array([1, -2, 3], dtype=np.int64))
    mask = g.const("mask", np.array([[True, False], [False, True]]))
    # outputs deliberately not in alphabetical or creation order
    g.set_output("z_flat", fl)
    g.set_output("a_neg", neg)
    g.set_output("vision", sg)
    g.set_output("half", rl)
    g.set_output("mask", mask)
    g.set_output("steps", steps)
    return g


def assert_graphs_equal(a: Graph, b: Graph) -> None:
    """Exact structural equality: names, ops, edges, attrs (with types), shapes, dtypes, meta, weights, io order."""
    assert a.name == b.name
    assert [n.name for n in a.nodes] == [n.name for n in b.nodes]
    for na, nb in zip(a.nodes, b.nodes, strict=True):
        assert na.op is nb.op, na.name
        assert [i.name for i in na.inputs] == [i.name for i in nb.inputs], na.name
        assert na.attrs == nb.attrs, na.name
        assert {k: type(v) for k, v in na.attrs.items()} == {k: type(v) for k, v in nb.attrs.items()}, na.name
        assert na.shape == nb.shape, na.name
        assert [type(d) for d in na.shape] == [type(d) for d in nb.shape], na.name
        assert na.dtype == nb.dtype, na.name
        assert na.meta == nb.meta, na.name
    assert [n.name for n in a.inputs] == [n.name for n in b.inputs]
    assert list(a.outputs) == list(b.outputs)
    assert [n.name for n in a.outputs.values()] == [n.name for n in b.outputs.values()]
    assert set(a.params) == set(b.params)
    for k, v in a.params.items():
        w = b.params[k]
        assert w.dtype == v.dtype and w.shape == v.shape, k
        assert w.tobytes() == v.tobytes(), k
