"""fuse-lora-siblings: LoRA-A projections reading one input -> one Linear + a Split each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flora_graph.adapters import adapters_of, apply_lora
from flora_graph.frontend import capture
from flora_graph.ir import Graph, Op, verify
from flora_graph.passes.fuse_lora_siblings import fuse_lora_siblings
from flora_graph.runtimes.reference import run

from .helpers import assert_same_numbers, assert_structural_equal, demo_graph, exported, live_ops, lora_linear


def _qkv(ranks=(2, 3, 2), bias=True) -> Graph:
    """Untagged q/k/v: three adapters of different rank on one input x."""
    rng = np.random.default_rng(0)
    g = Graph("qkv")
    x = g.input("x", ("batch", "seq", 8))
    for name, r in zip("qkv", ranks, strict=True):
        args = [x, g.const(f"{name}.W", rng.standard_normal((8, 8)).astype(np.float32))]
        if bias:
            args.append(g.const(f"{name}.b", rng.standard_normal(8).astype(np.float32)))
        base = g.add(Op.LINEAR, args, name=f"{name}.base")
        h = g.add(Op.LINEAR, [x, g.const(f"{name}.A", rng.standard_normal((r, 8)).astype(np.float32))], name=f"{name}.down")
        up = g.add(Op.LINEAR, [h, g.const(f"{name}.B", rng.standard_normal((8, r)).astype(np.float32))], name=f"{name}.up")
        g.set_output(name, g.add(Op.ADD, [base, up], name=f"{name}.add"))
    return verify(g)


def _expected_qkv() -> Graph:
    src = _qkv()
    p = src.params
    g = Graph("expected")
    x = g.input("x", ("batch", "seq", 8))
    fused = g.add(Op.LINEAR, [x, g.const("Acat", np.concatenate([p["q.A"], p["k.A"], p["v.A"]]))])
    for i, name in enumerate("qkv"):
        base = g.add(Op.LINEAR, [x, g.const(f"{name}.W", p[f"{name}.W"]), g.const(f"{name}.b", p[f"{name}.b"])])
        piece = g.add(Op.SPLIT, [fused], {"axis": -1, "sizes": (2, 3, 2), "index": i})
        up = g.add(Op.LINEAR, [piece, g.const(f"{name}.B", p[f"{name}.B"])])
        g.set_output(name, g.add(Op.ADD, [base, up]))
    return g


def test_structure_untagged():
    g = _qkv()
    res = fuse_lora_siblings(g)
    verify(g)
    assert res.stats["fired"] == {"fuse-lora-siblings": 1}
    assert res.stats["fused"] == [["q.down", "k.down", "v.down"]]
    assert g.ops().count("Split") == 3 and g.ops().count("Linear") == 3 + 1 + 3
    assert_structural_equal(g, _expected_qkv())
    assert "x.lora_A_fused" in g.params and "q.A" not in g.params


@pytest.mark.parametrize("swappable", [False, True])
def test_numbers(swappable):
    for before in (_qkv(), exported("linear", 3), exported("conv", 2)):
        g = fuse_lora_siblings(before.copy(), swappable=swappable).graph
        verify(g)
        assert "Split" in g.ops()
        assert_same_numbers(before, g, atol=1e-5, rtol=1e-5)


def test_tagged_splits_keep_roles():
    g = exported("linear", 3)
    fuse_lora_siblings(g)
    splits = [n for n in g.nodes if n.op is Op.SPLIT]
    assert [s.meta["module"] for s in splits] == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    assert all(s.meta["role"] == "lora_down" for s in splits)
    fused = splits[0].inputs[0]
    assert fused.meta == {"role": "lora_down_fused", "modules": "attn.q_proj,attn.k_proj,attn.v_proj"}


def test_swappable_keeps_each_a():
    g = exported("linear", 3)
    fuse_lora_siblings(g, swappable=True)
    assert {f"attn.{p}_proj.lora_A" for p in "qkv"} <= set(g.params)
    assert live_ops(g).count("Linear") == 3 + 1 + 3 and g.ops().count("Concat") == 1


def test_conv_siblings_split_along_channels():
    g = exported("conv", 2)
    fuse_lora_siblings(g)
    splits = [n for n in g.nodes if n.op is Op.SPLIT]
    assert [s.attrs["axis"] for s in splits] == [1, 1]


def test_single_projection_refused_with_reason():
    res = fuse_lora_siblings(lora_linear())
    assert not res.changed
    assert res.stats["refused"] == {"down": "fuse-lora-siblings: only one LoRA-A projection of its kind reads 'x'"}
    demo = fuse_lora_siblings(demo_graph())
    assert not demo.changed and len(demo.stats["refused"]) == 5


def test_projection_with_bias_is_not_a_lora_a():
    g = _qkv()
    nodes = {n.name: n for n in g.nodes}
    nodes["k.down"].inputs.append(g.const("k.down_bias", np.ones(3, dtype=np.float32)))
    g.toposort()
    verify(g)
    res = fuse_lora_siblings(g)
    assert res.stats["fused"] == [["q.down", "v.down"]]


class _Attn(nn.Module):
    """q/k/v projections of one input, as an attention block has."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1) @ self.v(x)


def test_captured_attention_block():
    torch.manual_seed(0)
    model = _Attn()
    apply_lora(model, ["q", "k", "v"], rank=2)
    with torch.no_grad():
        for a in adapters_of(model).values():
            a.lora_B.normal_()
    x = torch.randn(2, 5, 8)
    g = capture(model, (x,), {"x": {0: "batch"}})
    before = g.copy()
    res = fuse_lora_siblings(g)
    verify(g)
    assert res.stats["fused"] == [["q.lora_down", "k.lora_down", "v.lora_down"]]
    assert_same_numbers(before, g, atol=1e-5, rtol=1e-5)
    out = run(g, {"x": x.numpy()})["output"]
    np.testing.assert_allclose(out, model.eval()(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_fixed_point():
    g = _qkv()
    fuse_lora_siblings(g)
    assert not fuse_lora_siblings(g).changed
