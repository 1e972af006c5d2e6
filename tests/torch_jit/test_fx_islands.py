"""canonicalize and partition on AOT autograd's ATen graphs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import fx, nn
from torch._dynamo.backends.common import aot_autograd

from flora_graph.torch_jit.canonicalize import canonicalize
from flora_graph.torch_jit.dynamo import reset_stats
from flora_graph.torch_jit.fx_islands import (
    LoweringConfig,
    LoweringFallbackWarning,
    partition,
    scalar_nodes,
    unsupported_ops,
)
from tests.torch_jit.helpers import AdaptedLinear, Exotic

aten = torch.ops.aten


def aten_graph(model: nn.Module, *inputs: torch.Tensor, dynamic: bool = False) -> fx.GraphModule:
    """The inference graph AOT autograd produces for ``model``."""
    found: list[fx.GraphModule] = []

    def keep(gm: fx.GraphModule, example_inputs: list) -> Callable:
        found.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=aot_autograd(fw_compiler=keep), dynamic=dynamic)(*inputs)
    torch._dynamo.reset()
    return found[0]


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def test_linear_and_layer_norm_are_recomposed() -> None:
    gm = aten_graph(Norm().eval(), torch.randn(3, 6))
    assert aten.addmm.default in targets(gm) and aten.native_layer_norm.default in targets(gm)
    assert canonicalize(gm) == 2
    assert targets(gm) == [aten.linear.default, aten.layer_norm.default]


def test_reshapes_around_3d_linears_disappear() -> None:
    model = AdaptedLinear()
    gm = aten_graph(model, torch.randn(2, 5, 8), dynamic=True)
    assert aten.view.default in targets(gm)
    canonicalize(gm)
    ts = targets(gm)
    assert aten.view.default not in ts and aten._unsafe_view.default not in ts
    assert ts.count(aten.linear.default) == 3
    gm.recompile()
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(ph) >= 4


def test_dynamic_scale_is_a_foldable_scalar_chain() -> None:
    gm = aten_graph(AdaptedLinear(), torch.randn(2, 5, 8), dynamic=True)
    canonicalize(gm)
    scalars = scalar_nodes(gm)
    assert any(n.op == "call_function" for n in scalars)  # alpha / rank, computed on 0-d tensors
    assert unsupported_ops(gm) == {}


def test_partition_leaves_unsupported_ops_to_torch() -> None:
    model = Exotic()
    gm = aten_graph(model, torch.randn(3, 5))
    canonicalize(gm)
    assert set(unsupported_ops(gm)) == {model.op_name}
    reset_stats()
    with pytest.warns(LoweringFallbackWarning, match=model.op_name):
        run = partition(gm, None, LoweringConfig(backend="numpy"), name="exotic")
    x = torch.randn(3, 5)
    with torch.no_grad():
        weight, bias = model.fc.weight, model.fc.bias
        placeholders = [n.meta["val"].shape for n in gm.graph.nodes if n.op == "placeholder"]
        assert placeholders == [weight.shape, bias.shape, x.shape]
        out = run([weight, bias, x])
    torch.testing.assert_close(out[0], model(x), atol=1e-5, rtol=1e-5)
