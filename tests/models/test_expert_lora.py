"""LoRA on a mixture of experts' expert tensors (PEFT ``target_parameters``): exported through PEFT's own
layers, merged and fused, equal to eager PEFT; and a hot-swappable adapter of a GenAI package (each (token, expert)
pair's own expert's low-rank product, an ``experts`` slot), alone or per row of a mixed batch, equal to eager PEFT.

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


def test_expert_lora_captures_without_a_retrace(moe_folders, tmp_path, monkeypatch) -> None:
    """PEFT's LoRA on the router's weight (a ``ParamWrapper``) sets the parameter to itself (``aten.set_``, an in-place
    op), and Qwen3-MoE routes with autocast off (``wrap_with_autocast``): capture drops the one and inlines the other,
    so the program is converted as torch.export gave it, with no retrace, and the file is eager PEFT's."""
    import importlib

    module = importlib.import_module("flora_graph.frontend.capture")
    seen: dict[str, int] = {"set_": 0, "wrap": 0, "retraces": 0}
    real_sets, real_wraps, real_retrace = module._without_self_sets, module._inlined_wrappers, module._functionalize

    def sets(ep):
        seen["set_"] += sum(n.target is torch.ops.aten.set_.source_Tensor for n in ep.graph.nodes)
        return real_sets(ep)

    def wraps(ep):
        seen["wrap"] += sum("wrap_with_autocast" in str(n.target) for n in ep.graph.nodes)
        return real_wraps(ep)

    monkeypatch.setattr(module, "_without_self_sets", sets)
    monkeypatch.setattr(module, "_inlined_wrappers", wraps)
    monkeypatch.setattr(module, "_functionalize", lambda ep, name: seen.update(retraces=seen["retraces"] + 1)
                        or real_retrace(ep, name))
    cli_export_matches_eager(*moe_folders, "fused", tmp_path / "fused")
    assert seen["set_"] > 0 and seen["wrap"] > 0  # what torch.export gives here
    assert seen["retraces"] == 0


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


def test_flora_graphs_own_loader_refuses_expert_lora_naming_what_reads_it(moe_folders) -> None:
    """flora_graph's LoRAAdapter loader holds layer adapters only; the package reads such a folder through PEFT."""
    model_dir, adapter_dir = moe_folders
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


@pytest.fixture(scope="module")
def expert_package(moe_folders, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.nn.Module]]:
    """A package of the tiny Qwen3-MoE with the all-linear adapter ``moe`` (expert tensors, the routers' weights,
    attention) and a layer adapter ``attn`` (q/o only); ``(package, {adapter: eager PEFT model})``."""
    model_dir, adapter_dir = moe_folders
    root = tmp_path_factory.mktemp("expert_pkg")
    torch.manual_seed(160)  # the adapter's random factors, the same on every run
    attn = peft.get_peft_model(transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    attn.save_pretrained(root / "attn")
    export_genai(model_dir, root / "pkg", {"moe": adapter_dir, "attn": root / "attn"})
    eager = {"moe": eager_peft(model_dir, adapter_dir),
             "attn": peft.PeftModel.from_pretrained(transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir),
                                                    root / "attn").eval(),
             None: transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir).eval()}
    return root / "pkg", eager


def test_expert_lora_is_a_slot_of_its_own_per_expert_tensor(expert_package, moe_folders) -> None:
    """The package's slots: one ``experts`` slot per adapted expert tensor, a linear slot on each router's weight (a
    2-D parameter), and the file's weights are PEFT's per expert (``s * B_e @ A_e`` is PEFT's delta of expert e)."""
    from peft.tuners.lora import ParamWrapper

    from flora_graph.serving.adapter_file import read_adapter
    from flora_graph.serving.session import OrtModel
    from flora_graph.serving.slots import slots_from_metadata

    package, eager = expert_package
    kind, slots = slots_from_metadata(OrtModel(package / "model.onnx").metadata, "model.onnx")
    assert kind == "swappable"
    by_module = {s.module: s for s in slots}
    gate_up = by_module["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.kind, gate_up.in_dims, gate_up.out) == ("experts", (4, 32), 32)
    assert by_module["model.layers.1.mlp.experts.down_proj"].kind == "experts"
    assert by_module["model.layers.0.mlp.gate.weight"].kind == "linear"
    params = read_adapter(package / "adapters" / "moe.onnx_adapter").params
    a, b = params["model.layers.1.mlp.experts.down_proj.lora_A"], params["model.layers.1.mlp.experts.down_proj.lora_B"]
    assert a.shape == (4, 4, 16) and b.shape == (4, 32, 4)
    wrapper = next(m for n, m in eager["moe"].named_modules() if isinstance(m, ParamWrapper)
                   and m.parameter_name == "down_proj" and ".layers.1." in n)
    with torch.no_grad():
        want = wrapper.get_delta_weight("default").numpy()  # [experts, out, in], as the parameter is stored
    np.testing.assert_allclose(b @ a, want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).max() > 1e-3


def test_expert_lora_decodes_as_eager_peft_alone_and_per_row(expert_package) -> None:
    """Greedy tokens equal eager PEFT's with no adapter, with each, with rows of each in one batch (the expert
    slots pick each pair's expert of its row's adapter), and in ONNX Runtime GenAI."""
    from flora_graph.serving.generate import Generator

    package, eager = expert_package
    want = {a: greedy(m) for a, m in eager.items()}
    assert len({tuple(v) for v in want.values()}) == 3  # each adapter changes the tokens
    gen = Generator(package)
    for adapter, tokens in want.items():
        assert gen.generate([PROMPT], adapters=adapter, max_new_tokens=NEW, stop_tokens=[])[0] == tokens
    rows = ["moe", None, "attn", "moe"]
    assert gen.generate([PROMPT] * 4, adapters=rows, max_new_tokens=NEW, stop_tokens=[]) == [want[r] for r in rows]
    assert genai_greedy(package, "moe") == want["moe"]
    assert genai_greedy(package) == want[None]


def test_an_adapter_on_the_experts_alone_moves_the_tokens_through_them(moe_folders, tmp_path) -> None:
    """An adapter whose only LoRA is on the expert tensors: the package's tokens leave the base's and equal eager
    PEFT's; without the If that skips empty slots, the base runs the experts slots at rank 0 and stays the base."""
    from flora_graph.serving.generate import Generator

    model_dir, _ = moe_folders
    torch.manual_seed(222)  # the adapter's random factors, the same on every run
    model = peft.get_peft_model(transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=3, lora_alpha=6, target_modules=[], init_lora_weights=False,
                                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    model.save_pretrained(tmp_path / "experts")
    export_genai(model_dir, tmp_path / "pkg", {"experts": tmp_path / "experts"}, base_branch=False)
    want, plain = greedy(eager_peft(model_dir, tmp_path / "experts")), greedy(
        transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir).eval())
    assert want != plain
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT], adapters="experts", max_new_tokens=NEW, stop_tokens=[])[0] == want
    assert gen.generate([PROMPT, PROMPT], adapters=[None, "experts"], max_new_tokens=NEW, stop_tokens=[]) == [plain, want]
    assert gen.generate([PROMPT], max_new_tokens=NEW, stop_tokens=[])[0] == plain


def test_transposed_experts_with_biases_take_their_lora_too(tmp_path) -> None:
    """gpt-oss stores its experts ``[experts, in, out]`` with biases (``is_transposed``), its adapters name the
    expert tensors in ``target_parameters``: tokens equal eager PEFT alone and per row."""
    from flora_graph.serving.generate import Generator

    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=120, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8)
    transformers.GptOssForCausalLM(cfg).save_pretrained(tmp_path / "model")
    model = peft.get_peft_model(transformers.GptOssForCausalLM.from_pretrained(tmp_path / "model"),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    model.save_pretrained(tmp_path / "oss")
    export_genai(tmp_path / "model", tmp_path / "pkg", {"oss": tmp_path / "oss"})
    want = greedy(eager_peft(tmp_path / "model", tmp_path / "oss"))
    plain = greedy(transformers.GptOssForCausalLM.from_pretrained(tmp_path / "model").eval())
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT, PROMPT], adapters=["oss", None], max_new_tokens=NEW, stop_tokens=[]) == [want, plain]
    assert want != plain


def test_an_expert_adapter_that_does_not_fit_is_refused_naming_its_parameter(expert_package) -> None:
    from flora_graph.serving.adapter_file import read_adapter
    from flora_graph.serving.errors import AdapterFileError
    from flora_graph.serving.session import AdapterSession

    package, _ = expert_package
    session = AdapterSession(package / "model.onnx")
    params = read_adapter(package / "adapters" / "moe.onnx_adapter").params
    name = "model.layers.0.mlp.experts.gate_up_proj.lora_A"
    rank = params[name].shape[1]
    with pytest.raises(AdapterFileError, match=rf"{name}' has shape \[3, {rank}, 32\], the model takes \[4, "):
        session.load_adapter("fewer_experts", {**params, name: params[name][:3]})
    with pytest.raises(AdapterFileError, match=r"gate_up_proj.lora_[AB]' has .*rank = \d+, but"):
        session.load_adapter("other_rank", {**params, name: np.zeros((4, 5, 32), np.float32)})
    session.load_adapter("moe", params)  # the session keeps serving


def test_a_parameter_read_other_than_by_its_product_is_refused_by_name() -> None:
    """A parametrized weight read by something else than a Linear or an expert product cannot be split into a slot."""
    from torch import nn

    from flora_graph.adapters.param_lora import apply_param_lora
    from flora_graph.frontend.capture import capture
    from flora_graph.passes.adapter_slots import adapter_slots

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return x @ self.weight.t() + self.weight.sum()

    model = Odd()
    apply_param_lora(model, ["weight"], rank=2)
    graph = capture(model, (torch.randn(3, 4),))
    with pytest.raises(AdapterError, match=r"parameter 'weight': its adapted weight is read by"):
        adapter_slots(graph)


def test_a_4_bit_package_keeps_its_adapted_experts_float_and_serves_them(moe_folders, tmp_path) -> None:
    """``--precision int4``: ONNX Runtime's QMoE takes no LoRA between its products, so experts with slots stay
    float loops (the package says so); the adapter swaps and mixes per row as in the float package."""
    from flora_graph.serving.generate import Generator

    model_dir, adapter_dir = moe_folders
    report = export_genai(model_dir, tmp_path / "pkg", {"moe": adapter_dir}, precision="int4", int4_accuracy_level=0)
    assert any("stay float" in n for n in report.notes)
    gen = Generator(tmp_path / "pkg")
    alone = [gen.generate([PROMPT], adapters=a, max_new_tokens=NEW, stop_tokens=[])[0] for a in (None, "moe")]
    assert alone[0] != alone[1]
    assert gen.generate([PROMPT, PROMPT], adapters=[None, "moe"], max_new_tokens=NEW, stop_tokens=[]) == alone


def test_an_expert_adapter_joins_a_package_without_exporting_it_again(expert_package, moe_folders, tmp_path) -> None:
    """``add_adapters`` (``--adapters-only``) writes another expert fine-tune, of another rank, into the package."""
    from flora_graph.serving.genai import add_adapters
    from flora_graph.serving.generate import Generator

    model_dir, _ = moe_folders
    package, _ = expert_package
    torch.manual_seed(319)  # the adapter's random factors, the same on every run
    model = peft.get_peft_model(transformers.Qwen3MoeForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=5, lora_alpha=7, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "more")
    import shutil

    shutil.copytree(package, tmp_path / "pkg")
    add_adapters(tmp_path / "pkg", model_dir, {"more": tmp_path / "more"})
    want = greedy(eager_peft(model_dir, tmp_path / "more"))
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT], adapters="more", max_new_tokens=NEW, stop_tokens=[])[0] == want
    assert genai_greedy(tmp_path / "pkg", "more") == want


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "GraniteMoeForCausalLM",
                                  "Glm4MoeForCausalLM", "PhimoeForCausalLM", "DeepseekV32ForCausalLM"])
def test_expert_lora_of_other_mixtures_decodes_as_eager_peft(arch: str, tmp_path) -> None:
    """LoRA on every 3-D expert tensor of the family (PEFT ``target_parameters`` by name), alone and beside a row
    without an adapter: tokens equal eager PEFT's."""
    from flora_graph.llm_demo import save_word_tokenizer
    from flora_graph.serving.generate import Generator
    from tests.serving.test_causal_lm_families import small_model

    model = small_model(arch)
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", model.config.vocab_size)
    tensors = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.ndim == 3 and "experts" in n})
    assert tensors  # the family stores its experts as 3-D tensors (else this tests nothing)
    torch.manual_seed(1)
    adapted = peft.get_peft_model(getattr(transformers, arch).from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=tensors,
                                                  init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "experts")
    export_genai(tmp_path / "base", tmp_path / "pkg", {"experts": tmp_path / "experts"})
    want = greedy(eager_peft(tmp_path / "base", tmp_path / "experts"), 8)
    plain = greedy(getattr(transformers, arch).from_pretrained(tmp_path / "base").eval(), 8)
    assert want != plain
    got = Generator(tmp_path / "pkg").generate([PROMPT, PROMPT], adapters=["experts", None], max_new_tokens=8,
                                               stop_tokens=[])
    assert got == [want, plain]
