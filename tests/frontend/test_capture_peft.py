"""Capturing a PEFT model directly: its LoRA layers become tagged adapter patterns."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from torch import nn

from flora_graph.adapters.peft import load_peft_adapter
from flora_graph.frontend import capture
from flora_graph.passes import optimize
from flora_graph.runtimes import compile


class QKO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(12, 12), nn.Linear(12, 8), nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.cat([self.q(x), self.k(x)], -1))


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "o"], rank_pattern={"k": 2},
                          init_lora_weights=False, lora_dropout=0.1)
    return peft.get_peft_model(QKO(), cfg).eval()


def test_peft_layers_are_tagged_like_our_adapters(peft_model):
    g = capture(peft_model, {"x": torch.randn(2, 12)}, {"x": {0: "batch"}})
    for module in ("q", "k", "o"):
        roles = {n.meta["role"]: n for n in g.nodes if n.meta.get("module") == module}
        assert set(roles) == {"base", "lora_down", "lora_up", "lora_scale", "lora_add"}
        assert roles["base"].inputs[0] is roles["lora_down"].inputs[0]
        assert all(n.meta["adapter"] == "default" for n in roles.values())
    assert g.node("k.lora_down").shape[-1] == 2  # rank_pattern honoured by PEFT, seen by capture


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_every_preset_matches_eager_peft(peft_model, backend):
    g = capture(peft_model, {"x": torch.randn(2, 12)}, {"x": {0: "batch"}})
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = peft_model(x).numpy()
    for preset in ("unfused", "fused", "merged"):
        opt = optimize(g, preset, backend=backend)
        if preset == "merged":
            assert opt.ops().count("Linear") == 3 and "Mul" not in opt.ops()
        got = compile(opt, backend)(x=x)["output"]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=preset)


def test_peft_model_and_loaded_folder_capture_to_the_same_numbers(peft_model, tmp_path):
    peft_model.save_pretrained(tmp_path / "a")
    torch.manual_seed(0)
    ours = QKO().eval()
    ours.load_state_dict({k.replace("base_layer.", ""): v for k, v in peft_model.get_base_model().state_dict().items()
                          if "lora_" not in k})
    load_peft_adapter(ours, tmp_path / "a")
    x = torch.randn(3, 12)
    g1 = capture(peft_model, {"x": torch.randn(2, 12)}, {"x": {0: "batch"}})
    g2 = capture(copy.deepcopy(ours), {"x": torch.randn(2, 12)}, {"x": {0: "batch"}})
    assert g1.ops() == g2.ops()
    a = compile(g1, "numpy")(x=x)["output"]
    b = compile(g2, "numpy")(x=x)["output"]
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
