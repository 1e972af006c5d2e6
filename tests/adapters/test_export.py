"""LoRAAdapter.export_graph: structure, tags, one shared input, and numbers via the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flora_graph.adapters import FloraAdapter, LoRAAdapter, apply_lora
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes.reference import run

ROLES = ("base", "lora_down", "lora_up", "lora_scale", "lora_add")


def _nonzero(adapter: LoRAAdapter, seed: int = 0) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen).to(adapter.lora_B.dtype))
    return adapter


def _linear_adapter(cls=LoRAAdapter, bias: bool = True, **kw) -> LoRAAdapter:
    torch.manual_seed(0)
    return _nonzero(cls(nn.Linear(10, 6, bias=bias), rank=3, alpha=12, module_name="blk.proj", **kw)).eval()


def _export(adapter: LoRAAdapter, shape: tuple) -> tuple[Graph, object, object]:
    g = Graph("adapter")
    x = g.input("x", shape)
    y = adapter.export_graph(g, x)
    g.set_output("y", y)
    verify(g)
    return g, x, y


def _by_role(g: Graph) -> dict[str, object]:
    out = {}
    for n in g.nodes:
        role = n.meta.get("role")
        if role is not None:
            assert role not in out, f"two nodes tagged {role!r}"
            out[role] = n
    return out


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("bias", [True, False])
def test_linear_export_structure(bias):
    a = _linear_adapter(bias=bias)
    g, x, y = _export(a, ("batch", 10))
    assert g.ops() == ["Linear", "Linear", "Linear", "Mul", "Add"]
    roles = _by_role(g)
    assert set(roles) == set(ROLES)
    for role, n in roles.items():
        assert n.meta["role"] == role
        assert n.meta["adapter"] == "default"
        assert n.meta["module"] == "blk.proj"
    base, down, up, scale, add = (roles[r] for r in ROLES)
    # both branches read the very same input node (no second placeholder for the LoRA branch)
    assert base.inputs[0] is x and down.inputs[0] is x
    assert len(g.inputs) == 1 and g.inputs[0] is x
    assert up.inputs[0] is down and scale.inputs[0] is up
    assert add is y and set(map(id, add.inputs)) == {id(base), id(scale)}
    assert len(base.inputs) == (3 if bias else 2)
    assert y.shape == ("batch", 6) and y.dtype == "float32"
    # the weights behind the Const nodes are the module's, in torch layout
    np.testing.assert_array_equal(g.param_of(base.inputs[1]), a.base_layer.weight.detach().numpy())
    np.testing.assert_array_equal(g.param_of(down.inputs[1]), a.lora_A.detach().numpy())  # [r, in]
    np.testing.assert_array_equal(g.param_of(up.inputs[1]), a.lora_B.detach().numpy())  # [out, r]
    assert float(g.param_of(scale.inputs[1])) == pytest.approx(a.scaling) == 4.0
    assert all(name.startswith("blk.proj.") for name in g.params)


def test_exported_weights_are_copies():
    a = _linear_adapter()
    g, _, _ = _export(a, ("batch", 10))
    before = {k: v.copy() for k, v in g.params.items()}
    with torch.no_grad():
        a.lora_B.add_(1.0)
        a.base_layer.weight.zero_()
    for k, v in g.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_adapter_name_tag():
    torch.manual_seed(0)
    a = LoRAAdapter(nn.Linear(4, 4), rank=2, module_name="m", adapter_name="french")
    g, _, _ = _export(a, ("batch", 4))
    assert {n.meta["adapter"] for n in g.nodes if "role" in n.meta} == {"french"}


@pytest.mark.parametrize(
    "conv_kw",
    [
        dict(kernel_size=3, stride=2, padding=1, dilation=1),
        dict(kernel_size=(3, 2), stride=1, padding=(2, 1), dilation=2),
    ],
)
def test_conv_export_structure(conv_kw):
    torch.manual_seed(1)
    a = _nonzero(LoRAAdapter(nn.Conv2d(3, 5, **conv_kw), rank=2, module_name="stem")).eval()
    g, x, y = _export(a, ("batch", 3, 9, 8))
    assert g.ops() == ["Conv2d", "Conv2d", "Conv2d", "Mul", "Add"]
    roles = _by_role(g)
    assert set(roles) == set(ROLES)
    base, down, up = roles["base"], roles["lora_down"], roles["lora_up"]
    assert base.inputs[0] is x and down.inputs[0] is x and up.inputs[0] is down
    assert all(n.meta["module"] == "stem" for n in roles.values())
    # the down projection uses the base layer's geometry, the up projection is pointwise
    for key in ("stride", "dilation"):
        assert down.attrs[key] == base.attrs[key] == tuple(getattr(a.base_layer, key))
    assert down.attrs["padding"] == base.attrs["padding"] == tuple(a.base_layer.padding)
    assert up.attrs["stride"] == (1, 1) and up.attrs["padding"] == (0, 0)
    assert g.param_of(up.inputs[1]).shape == (5, 2, 1, 1)
    with torch.no_grad():
        want_shape = a(torch.zeros(1, 3, 9, 8)).shape[1:]
    assert tuple(y.shape[1:]) == tuple(want_shape)


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cls", [LoRAAdapter, FloraAdapter])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_export_numbers(batch, cls, bias):
    a = _linear_adapter(cls, bias=bias)
    g, _, _ = _export(a, ("batch", 10))
    x = torch.randn(batch, 10, generator=torch.Generator().manual_seed(batch))
    got = run(g, {"x": x.numpy()})["y"]
    with torch.no_grad():
        want = a(x).numpy()
        base_only = a.base_layer(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, base_only, atol=1e-3)  # the LoRA branch is in the graph


def test_linear_export_3d_input_numbers():
    a = _linear_adapter()
    g, _, y = _export(a, ("batch", "seq", 10))
    assert y.shape == ("batch", "seq", 6)
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        np.testing.assert_allclose(run(g, {"x": x.numpy()})["y"], a(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    "conv_kw",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 2), padding=(2, 1), dilation=2, bias=False),
        dict(kernel_size=3, padding="same"),
    ],
)
def test_conv_export_numbers(batch, conv_kw):
    torch.manual_seed(2)
    a = _nonzero(LoRAAdapter(nn.Conv2d(3, 5, **conv_kw), rank=2, alpha=4, module_name="stem")).eval()
    g, _, _ = _export(a, ("batch", 3, 9, 8))
    x = torch.randn(batch, 3, 9, 8)
    with torch.no_grad():
        want = a(x).numpy()
    np.testing.assert_allclose(run(g, {"x": x.numpy()})["y"], want, rtol=1e-5, atol=1e-5)


def test_dropout_is_not_exported():
    torch.manual_seed(3)
    a = _nonzero(LoRAAdapter(nn.Linear(10, 6), rank=3, dropout=0.5, module_name="d")).eval()
    g, _, _ = _export(a, ("batch", 10))
    assert g.ops() == ["Linear", "Linear", "Linear", "Mul", "Add"]
    x = torch.randn(4, 10)
    with torch.no_grad():
        np.testing.assert_allclose(run(g, {"x": x.numpy()})["y"], a(x).numpy(), rtol=1e-5, atol=1e-5)


def test_two_unnamed_adapters_in_one_graph_keep_their_own_weights():
    """Adapters without a module name must not overwrite each other's weights in ``graph.params``."""
    torch.manual_seed(4)
    a1 = _nonzero(LoRAAdapter(nn.Linear(6, 6), rank=2), seed=1)
    a2 = _nonzero(LoRAAdapter(nn.Linear(6, 6), rank=2), seed=2)
    g = Graph()
    x = g.input("x", ("batch", 6))
    h = a1.export_graph(g, x)
    y = a2.export_graph(g, h)
    g.set_output("y", y)
    verify(g)
    assert len(g.params) == 10  # W, b, A, B, s for each
    xt = torch.randn(3, 6)
    with torch.no_grad():
        np.testing.assert_allclose(run(g, {"x": xt.numpy()})["y"], a2(a1(xt)).numpy(), rtol=1e-5, atol=1e-5)


def test_model_of_adapters_exports_with_module_prefixes():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4))
    apply_lora(m, ["0", "1"], rank=2)
    for a in (m[0], m[1]):
        _nonzero(a)
    g = Graph()
    x = g.input("x", ("batch", 8))
    g.set_output("y", m[1].export_graph(g, m[0].export_graph(g, x)))
    verify(g)
    assert {n.meta["module"] for n in g.nodes if "role" in n.meta} == {"0", "1"}
    assert {"0.lora_A", "1.lora_A", "0.base_layer.weight", "1.lora_B"} <= set(g.params)
    xt = torch.randn(4, 8)
    with torch.no_grad():
        np.testing.assert_allclose(run(g, {"x": xt.numpy()})["y"], m(xt).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_low_precision_export(dtype, name):
    torch.manual_seed(6)
    a = _nonzero(LoRAAdapter(nn.Linear(8, 4).to(dtype), rank=2, alpha=4, module_name="lp")).eval()
    g = Graph()
    x = g.input("x", ("batch", 8), dtype=name)
    y = a.export_graph(g, x)
    g.set_output("y", y)
    verify(g)
    assert y.dtype == name
    assert all(str(v.dtype) == name for v in g.params.values())
    assert float(g.params["lp.scaling"]) == 2.0
    xt = torch.randn(3, 8).to(dtype)
    got = np.asarray(run(g, {"x": xt})["y"], dtype=np.float32)
    with torch.no_grad():
        want = a(xt).float().numpy()
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)


def test_export_ops_are_known_ops():
    a = _linear_adapter()
    g, _, _ = _export(a, ("batch", 10))
    assert {n.op for n in g.nodes} <= {Op.INPUT, Op.CONST, Op.LINEAR, Op.MUL, Op.ADD}
