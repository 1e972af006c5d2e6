"""The JIT's ``preset="auto"``: ``merged`` for float32 weights, ``fused`` where merging would round an update away."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora_graph.adapters import apply_lora
from flora_graph.errors import FloraGraphError
from flora_graph.frontend import capture
from flora_graph.ir import Graph, Op
from flora_graph.torch_jit import dynamo, jit
from flora_graph.torch_jit.presets import JIT_PRESETS, resolve_preset
from tests.torch_jit.helpers import ORT, AdaptedLinear, adapted_stack, assert_close

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Cancelling(nn.Module):
    """``x @ W.T`` cancels to exactly 0 for ``x`` of ones, while the LoRA update ``1e-4`` per weight
    adds ``8e-4`` to every output: in float16 that update is below half an ulp of ``W`` (so
    ``W + s * B @ A`` rounds back to ``W``), but far above an ulp of the output."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4, bias=False)
        apply_lora(self, ["proj"], rank=2, alpha=2)  # scale 1
        with torch.no_grad():
            self.proj.base_layer.weight.copy_(torch.tensor([1.0, -1.0] * 4).repeat(4, 1))
            self.proj.lora_A.fill_(0.5)
            self.proj.lora_B.fill_(1e-4)  # (B @ A)[i, j] = 2 * 1e-4 * 0.5 = 1e-4
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _graph(model: nn.Module, x: torch.Tensor) -> Graph:
    return capture(model, x, {"x": {0: "batch"}})


def test_auto_resolves_by_weight_dtype() -> None:
    x = torch.randn(3, 8)
    fp32 = _graph(AdaptedLinear(), x)
    half = _graph(AdaptedLinear().half(), x.half())
    assert resolve_preset(fp32, "auto") == "merged"
    assert resolve_preset(half, "auto") == "fused"
    assert resolve_preset(_graph(AdaptedLinear().double(), x.double()), "auto") == "merged"
    for preset in ("unfused", "fused", "merged"):  # a named preset is taken as it is
        assert resolve_preset(half, preset) == preset
        assert resolve_preset(fp32, preset) == preset


def test_auto_looks_at_the_live_weights() -> None:
    """An fp16 weight some output reads makes the graph ``fused``; a dead one does not count."""
    g = Graph("mixed")
    y = g.add(Op.LINEAR, [g.input("x", ["batch", 8]), g.const("w", torch.randn(4, 8).numpy())])
    h = g.add(Op.LINEAR, [g.input("xh", ["batch", 8], "float16"), g.const("a", torch.randn(2, 8).half().numpy())])
    g.set_output("y", y)
    assert h.dtype == "float16"
    assert resolve_preset(g, "auto") == "merged"  # the fp16 weight is read by no output
    g.set_output("h", h)
    assert resolve_preset(g, "auto") == "fused"


def test_unknown_preset_is_refused_naming_the_choices() -> None:
    with pytest.raises(FloraGraphError, match=r"unknown preset 'quick'.*'auto'"):
        jit(AdaptedLinear(), preset="quick")
    with pytest.raises(Exception, match=r"unknown preset 'quick'.*'auto'"), torch.no_grad():
        torch.compile(AdaptedLinear(), backend="flora_graph", options={"preset": "quick"})(torch.randn(2, 8))
    assert "auto" in JIT_PRESETS and set(JIT_PRESETS) >= {"fused", "merged", "unfused"}


@pytest.mark.parametrize("seed", [0, 1])
def test_backend_default_merges_float32_and_matches_eager(seed: int) -> None:
    model = adapted_stack(seed)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed))
    graphs: dict[str, list[Graph]] = {"default": [], "merged": [], "fused": []}
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend="flora_graph", options={**ORT, "on_compile": graphs["default"].append})(x)
        assert dict(dynamo.stats().presets) == {"merged": 1}
        assert_close(out, expected)
        for preset in ("merged", "fused"):
            torch._dynamo.reset()
            torch.compile(model, backend="flora_graph", options={**ORT, "preset": preset,
                                                                 "on_compile": graphs[preset].append})(x)

    def ops(g: Graph) -> list[str]:
        return sorted(n.op.value for n in g.live_nodes())

    assert ops(graphs["default"][0]) == ops(graphs["merged"][0])
    assert ops(graphs["default"][0]) != ops(graphs["fused"][0])  # nonzero B: fused keeps the low-rank products


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_backend_auto_keeps_a_half_precision_update_that_merging_loses(backend: str) -> None:
    model = Cancelling().half()
    x = torch.ones(3, 8, dtype=torch.float16)
    opts = {"backend": backend, **(ORT if backend == "onnxruntime" else {})}
    with torch.no_grad():
        expected = model(x)
        auto = torch.compile(model, backend="flora_graph", options=opts)(x)
        torch._dynamo.reset()
        merged = torch.compile(model, backend="flora_graph", options={**opts, "preset": "merged"})(x)
    assert dynamo.stats().presets == {"fused": 1, "merged": 1}
    assert float(expected.float().abs().min()) > 7e-4  # eager keeps the update
    torch.testing.assert_close(auto, expected, rtol=1e-2, atol=1e-5)
    assert float(merged.float().abs().max()) == 0.0  # rounded into W, the update is gone


def test_jit_accepts_auto() -> None:
    model = Cancelling().half()
    x = torch.ones(3, 8, dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        auto = jit(model, preset="auto", backend="numpy")
        merged = jit(model, preset="merged", backend="numpy")
        torch.testing.assert_close(auto(x), expected, rtol=1e-2, atol=1e-5)
        assert float(merged(x).float().abs().max()) == 0.0
        fp32 = jit(AdaptedLinear(), preset="auto", **ORT)
        xs = torch.randn(4, 8)
        assert_close(fp32(xs), fp32._orig_mod(xs))
    assert not any(n.meta.get("role") == "lora_up" for n in fp32.graphs[0].live_nodes())
    assert any(n.meta.get("role") == "lora_up" for n in auto.graphs[0].live_nodes())
