"""DoRA (PEFT ``use_dora=True``): exported through PEFT's own layers, merged and fused, equal to eager PEFT; and a
hot-swappable adapter of a GenAI package (a linear slot that also takes the magnitude ``d = m / ||W + s B A|| - 1`` of
each output row), alone, per row of a mixed batch beside plain LoRA adapters, and in ONNX Runtime GenAI."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers

from flora_graph.serving.genai import export_genai
from tests.models.test_hf_export import cli_export_matches_eager, eager_peft
from tests.models.test_hf_peft_parity import llama_model


@pytest.fixture(scope="module")
def dora_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama folder and a DoRA adapter on it: nonzero ``B``, magnitudes that are not the weight norms."""
    root = tmp_path_factory.mktemp("dora")
    torch.manual_seed(0)  # the model and the adapter's A: the same on every run
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


@pytest.fixture(scope="module")
def dora_package(dora_folders, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A package of the tiny Llama with the DoRA adapter ``dora`` and a plain LoRA adapter ``plain`` (q/v/up, so
    ``q_proj`` and ``v_proj`` carry both kinds); ``(package, {adapter: eager PEFT model})``."""
    model_dir, adapter_dir = dora_folders
    root = tmp_path_factory.mktemp("dora_pkg")
    torch.manual_seed(68)  # the adapter's random factors, the same on every run
    plain = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    plain.save_pretrained(root / "plain")
    report = export_genai(model_dir, root / "pkg", {"dora": adapter_dir, "plain": root / "plain"})
    assert set(report.adapters) == {"dora", "plain"}
    eager = {"dora": eager_peft(model_dir, adapter_dir), "plain": eager_peft(model_dir, root / "plain"),
             None: transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()}
    return root / "pkg", eager


def test_dora_is_a_hot_swappable_adapter_alone_and_per_row(dora_package) -> None:
    """Greedy tokens equal eager PEFT's with no adapter, the DoRA one, the plain one, rows of each in one batch (the
    rows of one adapter grouped), and in ONNX Runtime GenAI."""
    from flora_graph.serving.generate import Generator
    from tests.models.test_expert_lora import NEW, PROMPT, genai_greedy, greedy

    package, eager = dora_package
    want = {a: greedy(m) for a, m in eager.items()}
    assert len({tuple(v) for v in want.values()}) == 3
    gen = Generator(package)
    for adapter, tokens in want.items():
        assert gen.generate([PROMPT], adapters=adapter, max_new_tokens=NEW, stop_tokens=[])[0] == tokens
    rows = ["dora", None, "plain", "dora"]
    assert gen.generate([PROMPT] * 4, adapters=rows, max_new_tokens=NEW, stop_tokens=[]) == [want[r] for r in rows]
    from flora_graph.serving.export import stack_names, stacked_inputs
    from flora_graph.serving.grouped import GROUPS_SUFFIX
    from flora_graph.serving.mixed import ROWS_SUFFIX

    dora = next(s for s in gen._mixed.slots if s.dora)  # its product ran on the two DoRA rows together
    assert stack_names(dora)[0] + GROUPS_SUFFIX in gen._mixed.model.inputs
    assert stacked_inputs(dora)[2] + ROWS_SUFFIX in gen._mixed.model.inputs  # its magnitudes per row
    assert genai_greedy(package, "dora") == want["dora"]
    assert genai_greedy(package, "plain") == want["plain"]


def test_dora_magnitude_is_pefts_rescaling_of_each_row(dora_package, dora_folders) -> None:
    """The file's ``d`` is PEFT's ``m / ||W + s B A|| - 1``, computed here from the folder by hand; the DoRA modules'
    slots (and only theirs) take it."""
    import numpy as np
    from safetensors.torch import load_file

    from flora_graph.serving.adapter_file import read_adapter
    from flora_graph.serving.session import OrtModel
    from flora_graph.serving.slots import slots_from_metadata

    package, _ = dora_package
    model_dir, adapter_dir = dora_folders
    params = read_adapter(package / "adapters" / "dora.onnx_adapter").params
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = saved[f"{key}.lora_A.weight"], saved[f"{key}.lora_B.weight"]
    m = saved[f"{key}.lora_magnitude_vector"]
    w = transformers.LlamaForCausalLM.from_pretrained(model_dir).model.layers[0].self_attn.q_proj.weight.detach()
    want = (m / torch.linalg.norm(w + 2.0 * (b @ a), dim=1) - 1).numpy()  # s = alpha / r = 8 / 4
    np.testing.assert_allclose(params["model.layers.0.self_attn.q_proj.lora_magnitude"], want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).max() > 0.05
    _, slots = slots_from_metadata(OrtModel(package / "model.onnx").metadata, "model.onnx")
    assert {s.module.rsplit(".", 1)[-1] for s in slots if s.dora} == {"q_proj", "v_proj", "down_proj"}
    assert not any(s.dora for s in slots if s.module.endswith(("up_proj", "k_proj", "o_proj")))


def test_a_dora_adapter_for_a_package_without_its_magnitudes_is_refused_by_name(dora_folders, tmp_path) -> None:
    """A package exported with plain adapters has no magnitude inputs: a DoRA fine-tune added later is refused,
    naming the parameter, and the package stays as it was."""
    from flora_graph.serving.errors import AdapterFileError
    from flora_graph.serving.genai import add_adapters

    model_dir, adapter_dir = dora_folders
    torch.manual_seed(129)  # the adapter's random factors, the same on every run
    plain = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    plain.save_pretrained(tmp_path / "plain")
    export_genai(model_dir, tmp_path / "pkg", {"plain": tmp_path / "plain"})
    with pytest.raises(AdapterFileError, match=r"adds a DoRA magnitude \(parameter\(s\) \['model\..*\.lora_magnitude'.*"
                                               r"whose slots in this model take none.*export it again"):
        add_adapters(tmp_path / "pkg", model_dir, {"dora": adapter_dir})
    assert not (tmp_path / "pkg" / "adapters" / "dora.onnx_adapter").exists()


def test_dora_in_an_encoder_decoder_package_decodes_as_eager_peft(tmp_path) -> None:
    """BART with a DoRA adapter on both stacks' projections (biased: each rescaled without its bias):
    the package's encoder and decoder slots take each module's magnitude; tokens equal eager PEFT's, alone and
    beside a row without an adapter."""
    from flora_graph.serving.seq2seq import Seq2SeqGenerator, export_seq2seq
    from tests.serving.seq2seq_package import build, eager_tokens

    model = build("bart")
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(147)  # the adapter's random factors, the same on every run
    adapted = peft.get_peft_model(type(model).from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
    gen_t = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=gen_t))
            if "lora_B" in name:  # large enough to move this small model's tokens
                p.copy_(torch.randn(p.shape, generator=gen_t) * 0.3)
    adapted.save_pretrained(tmp_path / "dora")
    export_seq2seq(tmp_path / "base", tmp_path / "pkg", {"dora": tmp_path / "dora"})
    prompts, new = [[5, 9, 33, 70, 12, 8, 4], [7, 3, 44]], 8
    gen = Seq2SeqGenerator(tmp_path / "pkg")
    want = eager_tokens(tmp_path, "bart", "dora", prompts, gen.pad, set(), max_new_tokens=new, min_new_tokens=new)
    plain = eager_tokens(tmp_path, "bart", None, prompts, gen.pad, set(), max_new_tokens=new, min_new_tokens=new)
    assert want != plain
    assert gen.generate(prompts, adapters="dora", max_new_tokens=new, min_new_tokens=new) == want
    assert gen.generate(prompts, adapters=["dora", None], max_new_tokens=new, min_new_tokens=new) == [want[0], plain[1]]


def test_dora_on_gpt2_conv1d_layers_swaps_and_decodes_as_eager_peft(tmp_path) -> None:
    """DoRA on GPT-2's ``Conv1D`` layers (PEFT's ``fan_in_fan_out``: the base weight ``[in, out]``, which the magnitude's
    row norms read transposed): a hot-swappable adapter whose rows decode as eager PEFT's, alone and beside a row
    without it, and other than the base model's."""
    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import eager_greedy, export_small, save_small
    from tests.serving.test_causal_lm_families import small_model

    model = small_model("GPT2LMHeadModel")
    base = save_small(model, tmp_path)
    torch.manual_seed(0)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                  peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True,
                                                  target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    with torch.no_grad():
        for module in adapted.modules():
            for vec in getattr(module, "lora_magnitude_vector", {}).values():
                vec.weight.mul_(1.0 + 0.5 * torch.rand(vec.weight.shape))
    adapted.save_pretrained(tmp_path / "dora")
    export_small(model, tmp_path, {"dora": tmp_path / "dora"})
    prompt = [1, 5, 9, 33, 70, 12]
    want, plain = (eager_greedy(m.eval(), prompt, 8, min_new_tokens=8) for m in (adapted, model))
    assert want != plain
    rows = Generator(tmp_path / "pkg").generate([prompt] * 2, adapters=["dora", None], max_new_tokens=8,
                                                min_new_tokens=8)
    assert rows == [want, plain]
