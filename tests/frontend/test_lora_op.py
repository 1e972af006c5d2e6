"""The capture-time LoRA Linear op: one traced node per site, expanded into the op-by-op pattern."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flora_graph.adapters import FloraAdapter, LoRAAdapter, apply_lora
from flora_graph.adapters.peft import peft_lora_layers
from flora_graph.errors import GraphError
from flora_graph.frontend import capture
from flora_graph.frontend.capture import trace_with_torch_export
from flora_graph.frontend.lora_op import lora_sites_as_op
from flora_graph.ir import Graph
from flora_graph.runtimes import compile, run

from .test_capture import structure

OP = torch.ops.flora_graph.lora_linear.default
DYN = {"x": {0: "batch"}}


class Stack(nn.Module):
    """q and k read one input, o reads their concatenation; GPT-2-style Conv1D optional."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        self.q = Conv1D(12, 10) if conv1d else nn.Linear(10, 12)
        self.k = nn.Linear(10, 8, bias=False)
        self.o = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(torch.cat([self.q(x), self.k(x)], -1)))


def _nonzero_b(model: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def _peft(conv1d: bool = False, **extra) -> nn.Module:
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "o"], rank_pattern={"k": 2},
                          fan_in_fan_out=conv1d, **extra)
    return _nonzero_b(peft.get_peft_model(Stack(conv1d), cfg))


def _ours(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = Stack(conv1d=kind == "conv1d")
    if kind == "flora":
        for name in ("q", "k", "o"):
            setattr(model, name, FloraAdapter(getattr(model, name), 3, alpha=6, module_name=name))
    else:
        apply_lora(model, ["q", "k", "o"], rank={"q": 3, "k": 2, "o": 4}, alpha=5)
    return _nonzero_b(model)


MODELS = {
    "peft": lambda: _peft(),
    "peft-conv1d": lambda: _peft(conv1d=True),
    "peft-dropout": lambda: _peft(lora_dropout=0.2),
    "peft-rslora": lambda: _peft(use_rslora=True),
    "ours": lambda: _ours("linear"),
    "ours-conv1d": lambda: _ours("conv1d"),
    "flora": lambda: _ours("flora"),
}


@contextlib.contextmanager
def _op_by_op():
    yield 0


def _same(a: Graph, b: Graph) -> None:
    assert structure(a) == structure(b)
    assert [n.name for n in a.nodes] == [n.name for n in b.nodes]
    assert [n.meta for n in a.nodes] == [n.meta for n in b.nodes]
    assert [n.attrs for n in a.nodes] == [n.attrs for n in b.nodes]
    assert list(a.outputs) == list(b.outputs)


def _op_count(model: nn.Module, x: torch.Tensor) -> int:
    ep = trace_with_torch_export(model, x, DYN)[0]
    return sum(1 for n in ep.graph.nodes if n.target is OP)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_capture_through_the_op_equals_the_op_by_op_trace(name, monkeypatch):
    model = MODELS[name]()
    x = torch.randn(3, 10)
    assert _op_count(model, x) == 3  # every site went through the op
    fast = capture(model, x, DYN)
    monkeypatch.setattr(sys.modules["flora_graph.frontend.capture"], "lora_sites_as_op", lambda adapters: _op_by_op())
    assert _op_count(model, x) == 0
    slow = capture(model, x, DYN)
    _same(fast, slow)
    assert {n.meta["role"] for n in fast.nodes if n.meta} == {"base", "lora_down", "lora_up", "lora_scale", "lora_add"}
    xr = torch.randn(5, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(xr).numpy()
    got = compile(fast, "numpy")(x=xr.numpy())["output"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["peft", "peft-conv1d", "ours", "ours-conv1d"])
def test_op_computes_what_the_site_computes(name):
    model = MODELS[name]()
    x = torch.randn(4, 7, 10)
    layers = {**peft_lora_layers(model), **{p: m for p, m in model.named_modules() if isinstance(m, LoRAAdapter)}}
    site = next(m for p, m in layers.items() if p.endswith("q"))
    with torch.no_grad():
        want = site(x)
        with lora_sites_as_op({"q": site}) as patched:
            assert patched == 1
            got = site(x)  # eager: the op's own implementation
    assert "forward" not in vars(site)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert float(want.abs().max()) > 0


def _peft_two_adapters() -> nn.Module:
    model = _peft()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q", "k", "o"]))
    model.base_model.set_adapter(["default", "other"])
    return _nonzero_b(model, seed=3)


def _peft_merged() -> nn.Module:
    model = _peft()
    model.merge_adapter()
    return model


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _ours_conv() -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet()
    apply_lora(model, ["conv"], rank=2)
    return _nonzero_b(model)


def test_dora_sites_are_traced_op_by_op_and_match_eager():
    model = _peft(use_dora=True)
    for module in model.modules():  # a magnitude that is not the norm: DoRA differs from LoRA
        for vec in getattr(module, "lora_magnitude_vector", {}).values():
            with torch.no_grad():
                vec.weight.mul_(1.5)
    x = torch.randn(3, 10)
    assert _op_count(model, x) == 0
    graph = capture(model, x, DYN)
    with torch.no_grad():
        want = model(torch.randn(5, 10, generator=torch.Generator().manual_seed(1)))
    got = run(graph, {graph.inputs[0].name: torch.randn(5, 10, generator=torch.Generator().manual_seed(1)).numpy()})
    np.testing.assert_allclose(next(iter(got.values())), want.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("build", "x"),
    [(_peft_two_adapters, torch.randn(3, 10)), (_peft_merged, torch.randn(3, 10)), (_ours_conv, torch.randn(2, 3, 6, 6))],
    ids=["peft-two-active-adapters", "peft-merged", "ours-conv2d"],
)
def test_sites_the_op_does_not_cover_are_traced_op_by_op(build, x):
    model = build()
    assert _op_count(model, x) == 0
    g = capture(model, x, DYN)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(compile(g, "numpy")(x=x.numpy())["output"], want, atol=1e-5, rtol=1e-5)


def test_lora_weights_in_another_dtype_take_the_module_forward():
    """PEFT casts the input to the LoRA weights' dtype and the sum back: the op does not, so such a site keeps its forward."""
    model = _peft()
    for name, p in model.named_parameters():
        if "lora_" in name and ".k." in name:
            p.data = p.data.double()
    x = torch.randn(3, 10)
    assert _op_count(model, x) == 2  # q and o
    g = capture(model, x, DYN)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(compile(g, "numpy")(x=x.numpy())["output"], want, atol=1e-5, rtol=1e-5)


def test_forwards_are_restored_when_the_export_fails():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 4)

        def forward(self, x):
            self.q(x)
            raise RuntimeError("boom")

    model = Broken()
    apply_lora(model, ["q"], rank=2)
    with pytest.raises(GraphError, match="boom"):
        capture(model, torch.randn(2, 4))
    assert "forward" not in vars(model.q)


def test_a_forward_set_on_the_instance_is_left_alone():
    model = _ours("linear")
    calls = []

    def own(x):
        calls.append(1)
        return type(model.q).forward(model.q, x)

    model.q.forward = own
    assert _op_count(model, torch.randn(3, 10)) == 2  # k and o only
    assert model.q.forward is own and calls


def test_a_shape_mismatch_is_caught_while_tracing():
    """The fake kernel checks what F.linear's would: a LoRA B of the wrong width fails the capture, naming the shapes."""
    model = _ours("linear")
    with torch.no_grad():
        model.q.lora_B.data = torch.randn(12, 5)  # rank 3 expected
    with pytest.raises(GraphError, match="lora_B"):
        capture(model, torch.randn(3, 10), DYN)


@pytest.mark.parametrize("name", ["peft", "ours"])
def test_a_forward_hook_inside_a_site_keeps_it_op_by_op(name):
    """The op reads the weights directly, so a site whose base layer has a hook keeps its forward and the hook runs."""
    model = MODELS[name]()
    site = model.base_model.model.q if name == "peft" else model.q
    seen = []
    handle = site.base_layer.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        x = torch.randn(3, 10)
        assert _op_count(model, x) == 2  # k and o only
        assert seen  # the hook ran during the trace
        g = capture(model, x, DYN)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(compile(g, "numpy")(x=x.numpy())["output"], want, atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    assert _op_count(model, x) == 3


def test_a_global_forward_hook_keeps_every_site_op_by_op():
    model = MODELS["ours"]()
    handle = nn.modules.module.register_module_forward_hook(lambda mod, inp, out: None)
    try:
        assert _op_count(model, torch.randn(3, 10)) == 0
    finally:
        handle.remove()
