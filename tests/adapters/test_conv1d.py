"""transformers' Conv1D (GPT-2's [in, out] Linear): our LoRA, PEFT fan_in_fan_out, capture."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flora_graph.adapters import LoRAAdapter, apply_lora
from flora_graph.adapters.peft import load_peft_adapter
from flora_graph.frontend import capture
from flora_graph.ir import Graph, verify
from flora_graph.passes import optimize
from flora_graph.runtimes import compile, run


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(24, 8), Conv1D(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_attn(x)))


def _nonzero(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.lora_B.normal_()


def test_lora_on_conv1d_forward_merge_and_export():
    torch.manual_seed(0)
    base = Conv1D(6, 8)
    a = LoRAAdapter(base, 3, 6.0, module_name="c")
    _nonzero(a)
    x = torch.randn(2, 5, 8)
    want = x @ base.weight + base.bias + 2.0 * (x @ a.lora_A.T @ a.lora_B.T)
    torch.testing.assert_close(a(x), want, atol=1e-5, rtol=1e-5)
    merged = a.merge_to_original_layer()
    assert type(merged) is Conv1D and merged.weight.shape == (8, 6)
    torch.testing.assert_close(merged(x), a(x), atol=1e-5, rtol=1e-5)
    g = Graph("c")
    g.set_output("y", a.export_graph(g, g.input("x", ["batch", 5, 8])))
    verify(g)
    np.testing.assert_allclose(run(g, {"x": x.numpy()})["y"], a(x).detach().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["ours", "peft", "peft-folder"])
def test_conv1d_models_capture_and_every_preset_matches_eager(source, tmp_path):
    torch.manual_seed(0)
    plain = Attn().eval()
    if source == "ours":
        model = copy.deepcopy(plain)
        apply_lora(model, ["c_attn", "c_proj"], rank=4)
        _nonzero(model)
    else:
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                              init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(plain), cfg).eval()
        if source == "peft-folder":  # PEFT's folder onto flora_graph adapters, then compile those
            model.save_pretrained(tmp_path / "a")
            want_model, model = model, copy.deepcopy(plain)
            load_peft_adapter(model, tmp_path / "a")
            x = torch.randn(3, 7, 8)
            torch.testing.assert_close(model(x), want_model(x), atol=1e-5, rtol=1e-5)
    g = capture(model, {"x": torch.randn(2, 3, 8)}, {"x": {0: "batch", 1: "seq"}})
    assert g.inputs[0].shape == ("batch", "seq", 8)
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        want = model(x).numpy()
    for preset in ("unfused", "fused", "merged"):
        opt = optimize(g, preset, backend="onnxruntime")
        if preset == "merged":
            assert opt.ops().count("Linear") == 2 and "Mul" not in opt.ops()
        for backend in ("onnxruntime", "torchscript"):
            got = compile(optimize(g, preset, backend=backend), backend)(x=x)["output"]
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{preset}/{backend}")
