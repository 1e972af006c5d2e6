"""pack-linears: sibling static Linears of one input become one Linear + Split; values equal the unpacked graph's."""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import optimize
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.reference import run

RNG = np.random.default_rng(0)


def _graph() -> Graph:
    """q/k/v-like biased siblings of ``h``, a bias-free pair of ``h``, one Linear of another input, one
    Linear whose weight is an input (not static) and one that is itself a graph output."""
    g = Graph("siblings")
    x = g.input("x", ("batch", "seq", 8))
    w_in = g.input("w_in", (5, 8))
    h = g.add(Op.TANH, [x], name="h")

    def lin(name: str, src, out: int, bias: bool = True, weight=None):
        w = weight if weight is not None else g.const(f"{name}.w", RNG.standard_normal((out, 8)).astype(np.float32))
        b = [g.const(f"{name}.b", RNG.standard_normal(out).astype(np.float32))] if bias else []
        return g.add(Op.LINEAR, [src, w, *b], name=name)

    q, k, v = lin("q", h, 8), lin("k", h, 4), lin("v", h, 4)
    gate, up = lin("gate", h, 6, bias=False), lin("up", h, 6, bias=False)
    other = lin("other", x, 3)
    dynamic = lin("dynamic", h, 5, bias=False, weight=w_in)
    g.set_output("attn", g.add(Op.CONCAT, [q, k, v], {"axis": -1}))
    g.set_output("mlp", g.add(Op.MUL, [gate, up]))
    g.set_output("other", other)
    g.set_output("dynamic", dynamic)
    g.set_output("head", lin("head", h, 7, bias=False))  # a graph output itself: left alone
    return verify(g)


def test_sibling_linears_become_one_linear_and_split_with_equal_values() -> None:
    g = _graph()
    feeds = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32), "w_in": RNG.standard_normal((5, 8)).astype(np.float32)}
    want = run(g, feeds)
    packed = optimize(g, ["pack-linears", "dce"])
    linears = collections.Counter(n.name for n in packed.nodes if n.op is Op.LINEAR)
    assert set(linears) == {"q+k+v", "gate+up", "other", "dynamic", "head"}
    assert sum(n.op is Op.SPLIT for n in packed.nodes) == 5
    got = run(packed, feeds)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=1e-5, err_msg=k)
    sess = ort.InferenceSession(to_onnx(packed, 23).SerializeToString(), providers=["CPUExecutionProvider"])
    for name, value in zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True):
        np.testing.assert_allclose(value, want[name], atol=1e-5, rtol=1e-5, err_msg=name)
