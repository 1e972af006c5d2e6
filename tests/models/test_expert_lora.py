"""LoRA on a mixture of experts' expert tensors (PEFT ``target_parameters``): exported through PEFT's own
layers, merged and fused, equal to eager PEFT; refused as a hot-swappable adapter, saying what to do.

PEFT's ``all-linear`` adds ``target_parameters`` by itself on models whose experts are fused 3-D tensors
(Qwen3-MoE, OLMoE in transformers 5), so an ordinary fine-tune of such a model carries them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import peft
import pytest
import torch
import transformers

from flora_graph.adapters.peft import load_peft_adapter
from flora_graph.cli import main
from flora_graph.errors import AdapterError
from flora_graph.model_export import load_model
from flora_graph.serving.genai import export_genai
from tests.models.test_hf_export import eager_peft, run_artifact
from tests.models.test_hf_peft_parity import TOL


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen3-MoE folder (4 experts, 2 per token) and an ``all-linear`` adapter with nonzero ``B``."""
    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16, max_position_embeddings=64)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(root / "model")
    model = peft.get_peft_model(transformers.Qwen3MoeForCausalLM.from_pretrained(root / "model"),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))  # nonzero B
    model.save_pretrained(root / "adapter")
    return root / "model", root / "adapter"


def test_all_linear_on_fused_experts_targets_parameters(moe_folders) -> None:
    """The premise: PEFT's all-linear puts LoRA on the expert tensors here (else this file tests nothing new)."""
    cfg = json.loads((moe_folders[1] / "adapter_config.json").read_text())
    assert {"gate_up_proj", "down_proj"} <= set(cfg["target_parameters"])


@pytest.mark.parametrize("preset", ["merged", "fused"])
def test_expert_lora_exports_equal_to_eager_peft(moe_folders, tmp_path, preset) -> None:
    model_dir, adapter_dir = moe_folders
    out = tmp_path / preset
    assert main(["export", str(model_dir), "--adapter", str(adapter_dir), "--preset", preset, "--out", str(out)]) == 0
    x = load_model(model_dir).check_inputs
    with torch.no_grad():
        peft_model = eager_peft(model_dir, adapter_dir)
        want = peft_model(**x).logits.numpy()
        with peft_model.disable_adapter():
            base = peft_model(**x).logits.numpy()
    assert np.abs(want - base).max() > 100 * TOL  # the adapter (its expert part included) changes the logits
    np.testing.assert_allclose(run_artifact(out.with_suffix(".onnx"), x), want, atol=TOL, rtol=TOL)
    names = {i.name for i in onnx.load(str(out.with_suffix(".onnx"))).graph.initializer}
    if preset == "fused":  # A and B stay weights of their own
        assert any("lora_A" in n for n in names)
    else:  # each expert's W + s B_e A_e baked in
        assert not any("lora_" in n for n in names)


def test_expert_lora_changes_the_logits_through_the_experts(moe_folders) -> None:
    """The expert tensors' LoRA alone moves the output: a reference that dropped it would differ."""
    model_dir, adapter_dir = moe_folders
    x = load_model(model_dir).check_inputs
    peft_model = eager_peft(model_dir, adapter_dir)
    with torch.no_grad():
        want = peft_model(**x).logits
        for module in peft_model.modules():  # zero the LoRA of the expert tensors only
            if type(module).__name__ == "ParamWrapper" and module.parameter_name != "weight":
                for b in module.lora_B.values():
                    b.weight.zero_()
        assert (peft_model(**x).logits - want).abs().max() > 100 * TOL


def test_expert_lora_is_refused_where_peft_layers_cannot_run(moe_folders, tmp_path) -> None:
    model_dir, adapter_dir = moe_folders
    with pytest.raises(AdapterError, match=r"target_parameters=.* no hot-swappable slot yet; merge the adapter"):
        export_genai(model_dir, tmp_path / "pkg", {"moe": adapter_dir})
    assert not (tmp_path / "pkg").exists()
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir)
    with pytest.raises(AdapterError, match=r"target_parameters=.* not held by flora_graph's LoRA adapters"):
        load_peft_adapter(model, adapter_dir)
