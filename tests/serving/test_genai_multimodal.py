"""Packages of multimodal checkpoints (Gemma 3 and 4, Mistral 3, Llama 4: ``*ForConditionalGeneration``): their text
decoder.

The reference is eager PEFT on the whole multimodal model with the adapter as trained on it (LoRA on the text
decoder and on the vision side): a text-only generation must not see the vision side's adapters, and must see
every text one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai does not import on this platform")

from flora_graph.errors import AdapterError, FloraGraphError  # noqa: E402
from flora_graph.serving.genai import add_adapters, export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from flora_graph.serving.text_decoder import text_decoder, text_params  # noqa: E402
from tests.frontend.test_causal_lm import tiny_causal_lm  # noqa: E402
from tests.serving.genai_package import eager_greedy, genai_tokens, tiny_with_adapter  # noqa: E402

PROMPT, NEW = [1, 5, 9, 33, 70], 8
ARCHS = ["Gemma3ForConditionalGeneration", *(pytest.param(a, marks=pytest.mark.slow)
                                             for a in ("Mistral3ForConditionalGeneration", "Llama4ForConditionalGeneration",
                                                       "Gemma4ForConditionalGeneration",
                                                       "Gemma4UnifiedForConditionalGeneration"))]
TEXT = {"Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", "gemma3_text"),
        "Mistral3ForConditionalGeneration": ("MistralForCausalLM", "mistral"),
        "Llama4ForConditionalGeneration": ("Llama4ForCausalLM", "decoder"),
        "Gemma4ForConditionalGeneration": ("Gemma4ForCausalLM", "gemma4_text"),
        "Gemma4UnifiedForConditionalGeneration": ("Gemma4UnifiedForCausalLM", "gemma4_text")}
TARGETS = {"Llama4ForConditionalGeneration": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_multimodal_checkpoint_packages_its_text_decoder_with_its_text_adapters(arch: str, tmp_path: Path) -> None:
    # all-linear: the vision tower and projector too (Llama 4: its attention, in the text part and the vision tower)
    model, adapted = tiny_with_adapter(arch, tmp_path, TARGETS.get(arch, "all-linear"))
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"}, progress=said.append)
        for m in (model, adapted.base_model.model):
            m.generation_config.eos_token_id = None
        want, plain = eager_greedy(adapted, PROMPT, NEW), eager_greedy(model, PROMPT, NEW)
        with torch.no_grad():
            ids = torch.tensor([PROMPT])
            assert (adapted(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() > 1e-3  # it matters
    assert report.model_type == TEXT[arch][1] and report.not_for_genai is None
    assert any(f"exporting its text decoder as {TEXT[arch][0]}" in s for s in report.notes)
    assert any("outside the text decoder left out" in s and "vision" in s for s in report.notes)
    assert set(report.notes) <= set(said)  # told as it happened too
    with warnings.catch_warnings():  # the same adapter added to the package afterwards: read the same way
        warnings.simplefilter("ignore")
        add_adapters(tmp_path / "pkg", tmp_path / "base", {"again": tmp_path / "ad"})
    assert (tmp_path / "pkg" / "adapters" / "again.onnx_adapter").read_bytes() == \
        (tmp_path / "pkg" / "adapters" / "ad.onnx_adapter").read_bytes()
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT, PROMPT], adapters=[None, "ad"], max_new_tokens=NEW, stop_tokens=[]) == [plain, want]
    gm = og.Model(str(tmp_path / "pkg"))
    ads = og.Adapters(gm)
    ads.load(str(tmp_path / "pkg" / "adapters" / "ad.onnx_adapter"), "ad")
    with warnings.catch_warnings():  # GenAI's min_length holds the end-of-text ids back, as min_new_tokens does
        warnings.simplefilter("ignore")
        held = {"min_new_tokens": NEW, "eos_token_id": list(gen.eos)}
        assert genai_tokens(gm, PROMPT, NEW, ads, "ad") == eager_greedy(adapted, PROMPT, NEW, **held)
        assert genai_tokens(gm, PROMPT, NEW) == eager_greedy(model, PROMPT, NEW, **held)


def test_the_text_decoder_is_the_checkpoint_s_own_modules_and_its_logits() -> None:
    model = tiny_causal_lm("Gemma3ForConditionalGeneration")
    text = text_decoder(model)
    assert type(text.model).__name__ == "Gemma3ForCausalLM" and text.source is model
    assert text.model.model is model.get_decoder() and text.model.lm_head is model.get_output_embeddings()
    assert text.paths["model.language_model.layers.1.self_attn.q_proj"] == "model.layers.1.self_attn.q_proj"
    assert not any(p.startswith("model.vision_tower") for p in text.paths)
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(text.model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert text_decoder(tiny_causal_lm("LlamaForCausalLM")) is None
    kept, dropped = text_params({"model.language_model.layers.0.mlp.up_proj.lora_A": 1,
                                 "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.lora_B": 2}, text.paths)
    assert kept == {"model.layers.0.mlp.up_proj.lora_A": 1}
    assert dropped == ["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1"]


def test_an_adapter_of_the_vision_side_alone_is_refused_by_name(tmp_path: Path) -> None:
    tiny_with_adapter("Gemma3ForConditionalGeneration", tmp_path, target_modules=r".*vision_tower.*\.(q_proj|v_proj)")
    with warnings.catch_warnings(), pytest.raises(AdapterError, match="adapts none of Gemma3ForCausalLM's modules"):
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"})
    assert not (tmp_path / "pkg").exists()


def test_a_multimodal_model_whose_text_part_has_no_causal_lm_class_is_refused(tmp_path: Path) -> None:
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64))
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path / "base")
    with pytest.raises(FloraGraphError, match="nor a multimodal model whose text part has one"):
        export_genai(tmp_path / "base", tmp_path / "pkg")
