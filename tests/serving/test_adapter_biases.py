"""Adapters that add to a layer's bias, swapped as a slot's bias ``c`` (``<module>.lora_bias``): PEFT's ``lora_bias``
(a bias on each LoRA's up projection, on a base layer with or without a bias of its own), base biases the adapter
trained (``bias="lora_only"`` / ``"all"``) and a module trained whole whose bias changed (``modules_to_save``).
References: eager PEFT alone, row by row in a mixed batch beside another adapter, and in ONNX Runtime GenAI; the
adapter file's bias against PEFT's tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from flora_graph.errors import AdapterError  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from flora_graph.serving.slots import peft_adapter_params  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_mixed_rows_decode_as_eager_peft,
    eager_greedy,
    export_small,
    genai_tokens,
    save_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

PROMPT = [1, 5, 9, 33, 70, 12]


def _biased(model, folder: Path, name: str, *, seed: int = 5, scale: float = 3.0, **config) -> object:
    """A PEFT adapter of ``config`` (``LoraConfig`` fields) on the saved ``model``, every bias it trains (``lora_B``'s
    with ``lora_bias``, the base layers' with ``bias``, a saved module's) moved by random values of spread ``scale``,
    saved as ``folder / name``: the adapted model, in eval mode."""
    base = save_small(model, folder)
    torch.manual_seed(seed)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                  peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    with torch.no_grad():
        for pname, p in adapted.named_parameters():
            if pname.endswith(".bias") and p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    adapted.save_pretrained(folder / name)
    return adapted.eval()


def without_biases(adapted, prompt: list[int]) -> list[int]:
    """Eager PEFT's greedy tokens of ``adapted`` with every bias it trained put back (its LoRA kept): what the package
    would give if it dropped them."""
    import copy

    undone = copy.deepcopy(adapted)
    saved = transformers.AutoModelForCausalLM.from_pretrained(
        adapted.peft_config["default"].base_model_name_or_path).state_dict()  # the base model as it was saved
    with torch.no_grad():
        for pname, p in undone.named_parameters():
            if pname.endswith(".bias") and p.requires_grad:
                if ".lora_B." in pname:
                    p.zero_()
                else:  # a trained base bias, or a saved module's
                    p.copy_(saved[".".join(s for s in pname.removeprefix("base_model.model.").split(".")
                                           if s not in ("base_layer", "modules_to_save", "default"))])
    return eager_greedy(undone, prompt, 8, min_new_tokens=8)


@pytest.mark.parametrize("arch, config", [
    ("LlamaForCausalLM", dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)),
    ("Qwen2ForCausalLM", dict(target_modules=["q_proj", "k_proj", "o_proj"], lora_bias=True)),
    ("Qwen2ForCausalLM", dict(target_modules=["q_proj", "v_proj"], bias="lora_only")),
    ("Qwen2ForCausalLM", dict(target_modules=["q_proj", "v_proj", "o_proj"], bias="lora_only", use_dora=True)),
])
def test_biased_adapters_swap_and_decode_as_eager_peft(tmp_path: Path, arch: str, config: dict) -> None:
    """LoRA biases on layers without a bias (Llama's, which PEFT cannot merge) and with one (Qwen2's ``q``/``k``; its
    ``o_proj`` has none), and the base biases an adapter trained (``bias="lora_only"``): alone, in a mixed batch beside
    another adapter's rows, and in ONNX Runtime GenAI, greedy tokens equal eager PEFT's, which the biases change; with
    DoRA too, whose magnitude rescales the product and not the bias."""
    import onnxruntime_genai as og

    model = small_model(arch)
    adapted = small_adapters(model, tmp_path, {"attn": ["v_proj", "o_proj"]})
    adapted["biased"] = _biased(model, tmp_path, "biased", **config)
    export_small(model, tmp_path, {n: tmp_path / n for n in ("attn", "biased")})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "biased", "attn")
    want = eager_greedy(adapted["biased"], PROMPT, 8, min_new_tokens=8)
    assert want != without_biases(adapted["biased"], PROMPT)  # the biases are fed, not only the LoRA
    og_model = og.Model(str(tmp_path / "pkg"))
    og_adapters = og.Adapters(og_model)
    for name in ("biased", "attn"):
        og_adapters.load(str(tmp_path / "pkg" / "adapters" / f"{name}.onnx_adapter"), name)
    assert genai_tokens(og_model, PROMPT, 8, og_adapters, "biased") == want
    # an adapter without biases after one with them: its slots' biases are the model's zeros again
    assert genai_tokens(og_model, PROMPT, 8, og_adapters, "attn") == eager_greedy(adapted["attn"], PROMPT, 8,
                                                                                  min_new_tokens=8)


def test_the_adapter_files_bias_is_peft_s_scaled_lora_bias_plus_the_trained_base_bias(tmp_path: Path) -> None:
    """``lora_bias`` and ``bias="lora_only"`` together on Qwen2's ``q_proj``: the slot's bias is ``scaling`` times
    ``lora_B``'s bias plus the change of the base bias; a layer without either has no bias parameter."""
    model = small_model("Qwen2ForCausalLM")
    adapted = _biased(model, tmp_path, "both", target_modules=["q_proj", "o_proj"], lora_bias=True, bias="lora_only")
    params = peft_adapter_params(model, tmp_path / "both")
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    want = (layer.lora_B["default"].bias * layer.scaling["default"] + layer.base_layer.bias
            - model.model.layers[0].self_attn.q_proj.bias).detach().numpy()
    np.testing.assert_allclose(params["model.layers.0.self_attn.q_proj.lora_bias"], want, rtol=0, atol=1e-6)
    assert np.abs(want).max() > 0.1
    o = adapted.base_model.model.model.layers[0].self_attn.o_proj  # no base bias: lora_bias alone
    np.testing.assert_allclose(params["model.layers.0.self_attn.o_proj.lora_bias"],
                               (o.lora_B["default"].bias * o.scaling["default"]).detach().numpy(), rtol=0, atol=1e-6)
    plain = _biased(model, tmp_path, "plain", target_modules=["q_proj"])
    assert plain is not None and not any(k.endswith(".lora_bias") for k in peft_adapter_params(model, tmp_path / "plain"))


def test_gpt2_saved_conv1d_with_a_changed_bias_decodes_as_eager_peft(tmp_path: Path) -> None:
    """GPT-2's ``c_fc`` (a ``Conv1D``) trained whole, weight and bias changed, beside ``fan_in_fan_out`` LoRA on
    ``c_attn`` whose base bias the adapter trained (``bias="lora_only"``): greedy tokens equal eager PEFT's, which the
    biases change."""
    model = small_model("GPT2LMHeadModel")
    adapted = _biased(model, tmp_path, "whole", target_modules=["c_attn"], modules_to_save=["h.0.mlp.c_fc"],
                      bias="lora_only")
    export_small(model, tmp_path, {"whole": tmp_path / "whole"})
    got = Generator(tmp_path / "pkg").generate([PROMPT], adapters="whole", max_new_tokens=8, min_new_tokens=8)[0]
    want = eager_greedy(adapted, PROMPT, 8, min_new_tokens=8)
    assert got == want != without_biases(adapted, PROMPT)


def test_a_trained_bias_no_slot_can_carry_is_refused_by_name(tmp_path: Path) -> None:
    """``bias="all"`` on GPT-2 also trains its layer norms' biases, which no slot carries: refused naming one,
    ``--merge-adapter`` offered; nothing is written."""
    model = small_model("GPT2LMHeadModel")
    _biased(model, tmp_path, "all", target_modules=["c_attn"], bias="all")
    with pytest.raises(AdapterError, match=r"'transformer\.h\.0\.ln_1\.bias'.*--merge-adapter"):
        export_small(model, tmp_path, {"all": tmp_path / "all"})
    assert not (tmp_path / "pkg").exists()


def test_a_lora_bias_on_a_layer_without_bias_merges(tmp_path: Path) -> None:
    """PEFT refuses to merge ``lora_bias`` into Llama's bias-less layers; baked in by ``--merge-adapter`` (the GenAI
    package) and by ``flora-graph export --adapter`` (the merged preset), the layer takes the LoRA's scaled bias:
    greedy tokens and logits equal eager PEFT's."""
    import onnxruntime as ort

    from flora_graph.model_export import export_model
    from flora_graph.serving.genai import export_genai

    model = small_model("LlamaForCausalLM")
    adapted = _biased(model, tmp_path, "biased", target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)
    export_genai(tmp_path / "base", tmp_path / "pkg", merge=tmp_path / "biased")
    got = Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, PROMPT, 8, min_new_tokens=8) != without_biases(adapted, PROMPT)
    report = export_model(str(tmp_path / "base"), tmp_path / "merged", adapter=tmp_path / "biased", preset="merged")
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    ids = np.array([PROMPT], np.int64)
    feed = {i.name: ids if i.name == "input_ids" else np.ones_like(ids) for i in sess.get_inputs()}
    with torch.no_grad():
        want = adapted(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(sess.run(None, feed)[0], want, rtol=1e-4, atol=1e-4)


def test_an_encoder_decoder_adapter_with_biases_decodes_as_eager_peft(tmp_path: Path) -> None:
    """BART with ``lora_bias`` on ``q_proj`` and ``fc1`` (encoder and decoder) and the base biases of ``v_proj``
    trained: the encoder-decoder package's greedy tokens equal eager PEFT ``generate``'s, alone and beside a row without
    an adapter."""
    import warnings

    from flora_graph.serving.seq2seq import Seq2SeqGenerator, export_seq2seq
    from tests.serving.seq2seq_package import PROMPTS, build, eager_tokens

    model = build("bart")
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    adapted = peft.get_peft_model(type(model).from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"], lora_bias=True,
                                                  bias="lora_only", init_lora_weights=False))
    with torch.no_grad():
        for pname, p in adapted.named_parameters():
            if pname.endswith(".bias") and p.requires_grad:
                p.add_(torch.randn_like(p) * 3)
    adapted.save_pretrained(tmp_path / "biased")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_seq2seq(tmp_path / "base", tmp_path / "pkg", {"biased": tmp_path / "biased"})
    gen = Seq2SeqGenerator(tmp_path / "pkg")
    kw = dict(max_new_tokens=8, min_new_tokens=8)
    want = eager_tokens(tmp_path, "bart", None, PROMPTS[:2], gen.pad, set(), model=adapted.eval(), **kw)
    assert gen.generate(PROMPTS[:2], adapters="biased", **kw) == want
    base = eager_tokens(tmp_path, "bart", None, PROMPTS[:2], gen.pad, set(), **kw)
    assert want != base
    assert gen.generate(PROMPTS[:2], adapters=["biased", None], **kw) == [want[0], base[1]]


def test_adding_a_biased_adapter_to_a_package_without_bias_slots_says_to_export_again(tmp_path: Path) -> None:
    """``add_adapters`` (``--adapters-only``) of an adapter with a LoRA bias to a package whose slots were made
    without one: refused naming the modules and what to do; the package is unchanged."""
    from flora_graph.serving.errors import AdapterFileError
    from flora_graph.serving.genai import add_adapters

    model = small_model("LlamaForCausalLM")
    small_adapters(model, tmp_path, {"attn": ["q_proj", "v_proj"]})
    export_small(model, tmp_path, {"attn": tmp_path / "attn"})
    before = sorted(p.name for p in (tmp_path / "pkg" / "adapters").iterdir())
    _biased(model, tmp_path, "biased", target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(AdapterFileError, match=r"adds a bias \(parameter\(s\) \['model\.layers\.0\.self_attn\.q_proj\."
                                               r"lora_bias'.*\) to 2 module\(s\) \(model\.layers\.0\.self_attn\.q_proj, "
                                               r".*export it again with this adapter among them"):
        add_adapters(tmp_path / "pkg", tmp_path / "base", {"biased": tmp_path / "biased"})
    assert sorted(p.name for p in (tmp_path / "pkg" / "adapters").iterdir()) == before
