"""DoRA (PEFT ``use_dora=True``): exported through PEFT's own layers, merged and fused, equal to eager PEFT."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from flora_graph.errors import AdapterError
from flora_graph.serving.genai import export_genai
from tests.models.test_hf_export import cli_export_matches_eager, eager_peft
from tests.models.test_hf_peft_parity import llama_model


@pytest.fixture(scope="module")
def dora_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama folder and a DoRA adapter on it: nonzero ``B``, magnitudes that are not the weight norms."""
    root = tmp_path_factory.mktemp("dora")
    base = llama_model()
    base.save_pretrained(root / "model")
    model = peft.get_peft_model(llama_model(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    model.base_model.model.load_state_dict(base.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for b in getattr(module, "lora_B", {}).values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.2)
            for vec in getattr(module, "lora_magnitude_vector", {}).values():
                vec.weight.mul_(1.0 + 0.5 * torch.rand(vec.weight.shape, generator=gen))
    model.save_pretrained(root / "adapter")
    return root / "model", root / "adapter"


@pytest.mark.parametrize("preset", ["merged", "fused"])
def test_dora_folder_exports_equal_to_eager_peft(dora_folders, tmp_path, preset) -> None:
    _, names = cli_export_matches_eager(*dora_folders, preset, tmp_path / preset)
    magnitudes = [n for n in names if "lora_magnitude_vector" in n]
    if preset == "fused":  # the magnitude and A/B stay weights of their own
        assert magnitudes and any("lora_A" in n for n in names)
    else:  # baked into the base weights: m * (W + s B A) / ||W + s B A||
        assert not magnitudes and not any("lora_" in n for n in names)


def test_dora_cannot_be_a_hot_swappable_adapter(dora_folders, tmp_path) -> None:
    model_dir, adapter_dir = dora_folders
    with pytest.raises(AdapterError, match="DoRA rescales every adapted base weight row"):
        export_genai(model_dir, tmp_path / "pkg", {"d": adapter_dir})
    assert not (tmp_path / "pkg").exists()


def test_dora_merged_into_a_genai_package_generates_as_eager_peft(dora_folders, tmp_path) -> None:
    from flora_graph.serving.generate import Generator
    from tests.models.test_expert_lora import NEW, PROMPT, genai_greedy, greedy

    model_dir, adapter_dir = dora_folders
    report = export_genai(model_dir, tmp_path / "pkg", merge=adapter_dir)
    assert report.merged == adapter_dir and not report.adapters
    want = greedy(eager_peft(model_dir, adapter_dir))
    assert want != greedy(llama_model().eval())  # DoRA changes the tokens: the package must carry it
    assert Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=NEW, stop_tokens=[])[0] == want
    assert genai_greedy(tmp_path / "pkg") == want
