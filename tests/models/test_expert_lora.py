"""LoRA on a mixture of experts' expert tensors (PEFT ``target_parameters``): exported through PEFT's own
layers, merged and fused, equal to eager PEFT; refused as a hot-swappable adapter, saying what to do.

PEFT's ``all-linear`` adds ``target_parameters`` by itself on models whose experts are fused 3-D tensors
(Qwen3-MoE, OLMoE in transformers 5), so an ordinary fine-tune of such a model carries them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers

from flora_graph.adapters.peft import load_peft_adapter
from flora_graph.cli import main
from flora_graph.errors import AdapterError
from flora_graph.model_export import load_model
from flora_graph.serving.genai import export_genai
from tests.models.test_hf_export import cli_export_matches_eager, eager_peft
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
    want, names = cli_export_matches_eager(model_dir, adapter_dir, preset, tmp_path / preset)
    peft_model = eager_peft(model_dir, adapter_dir)
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(**load_model(model_dir).check_inputs).logits.numpy()
    assert np.abs(want - base).max() > 100 * TOL  # the adapter (its expert part included) changes the logits
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
    want = r"target_parameters=.* no hot-swappable slot yet; bake it into the package.s base model .*--merge-adapter DIR"
    with pytest.raises(AdapterError, match=want):
        export_genai(model_dir, tmp_path / "pkg", {"moe": adapter_dir})
    assert not (tmp_path / "pkg").exists()
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir)
    with pytest.raises(AdapterError, match=r"target_parameters=.* not held by flora_graph's LoRA adapters"):
        load_peft_adapter(model, adapter_dir)


PROMPT = [1, 5, 9, 33, 70, 12]
NEW = 16


def greedy(model: torch.nn.Module, new: int = NEW) -> list[int]:
    """Eager greedy tokens after :data:`PROMPT` (no end-of-text stop)."""
    from tests.serving.genai_package import eager_greedy

    model.generation_config.eos_token_id = None
    return eager_greedy(model, PROMPT, new)


def genai_greedy(package: Path, adapter: str | None = None, new: int = NEW) -> list[int]:
    """ONNX Runtime GenAI's greedy tokens after :data:`PROMPT` on ``package`` (``adapter`` active)."""
    import onnxruntime_genai as og

    from tests.serving.genai_package import genai_tokens

    model = og.Model(str(package))
    loaded = og.Adapters(model) if adapter else None
    if adapter:
        loaded.load(str(package / "adapters" / f"{adapter}.onnx_adapter"), adapter)
    return genai_tokens(model, PROMPT, new, loaded, adapter)


def test_expert_lora_merged_into_a_genai_package_generates_as_eager_peft(moe_folders, tmp_path) -> None:
    """--merge-adapter bakes the expert LoRA into the package's base; a linear-only adapter swaps on top of it."""
    from flora_graph.serving.generate import Generator

    model_dir, adapter_dir = moe_folders
    top = peft.get_peft_model(transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir),
                              peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    top.save_pretrained(tmp_path / "top")
    out = tmp_path / "pkg"
    assert main(["export", str(model_dir), "--task", "text-generation-with-past", "--format", "genai",
                 "--merge-adapter", str(adapter_dir), "--adapter", f"top={tmp_path / 'top'}", "--out", str(out)]) == 0
    want = greedy(eager_peft(model_dir, adapter_dir))
    merged = eager_peft(model_dir, adapter_dir).merge_and_unload()
    want_top = greedy(peft.PeftModel.from_pretrained(merged, tmp_path / "top").eval())
    plain = greedy(transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir).eval())
    assert want != plain and want_top != want  # each adapter changes the tokens
    gen = Generator(out)
    assert gen.generate([PROMPT], max_new_tokens=NEW, stop_tokens=[])[0] == want
    assert gen.generate([PROMPT], adapters="top", max_new_tokens=NEW, stop_tokens=[])[0] == want_top
    assert gen.generate([PROMPT, PROMPT], adapters=[None, "top"], max_new_tokens=NEW, stop_tokens=[]) == [want, want_top]
    assert genai_greedy(out) == want
    assert genai_greedy(out, "top") == want_top


def test_merge_adapter_is_checked_before_anything_loads(moe_folders, tmp_path) -> None:
    model_dir, _ = moe_folders
    with pytest.raises(AdapterError, match="no such folder"):
        export_genai(model_dir, tmp_path / "pkg", merge=tmp_path / "missing")
    assert not (tmp_path / "pkg").exists()
    assert main(["export", str(model_dir), "--merge-adapter", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_merge_adapter_for_another_model_is_refused_naming_it(moe_folders, tmp_path) -> None:
    from tests.models.test_hf_peft_parity import llama_model

    _, adapter_dir = moe_folders
    llama_model().save_pretrained(tmp_path / "llama")
    with pytest.raises(AdapterError, match=r"PEFT could not merge it into LlamaForCausalLM"):
        export_genai(tmp_path / "llama", tmp_path / "pkg", merge=adapter_dir)
    assert not (tmp_path / "pkg").exists()
