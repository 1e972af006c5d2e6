"""Adapters on the embedding layers: on the output layer (``lm_head``) and on the input embedding (``embed_tokens``,
PEFT's ``lora_embedding_A`` / ``_B``: a slot that reads the token ids), beside which PEFT saves the layer's whole weight
(``save_embedding_layers="auto"``): the package swaps the adapter and keeps the base weight, which the file holds
unchanged; a file whose saved weight differs (a fine-tune that changed it) is refused by name, since a swappable
adapter leaves the base model as it is. References: eager PEFT, row by row, and ONNX Runtime GenAI."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.errors import AdapterError  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.peft_folders import edit_peft_folder  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_mixed_rows_decode_as_eager_peft,
    export_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402


def test_package_with_an_output_layer_adapter_decodes_as_eager_peft(tmp_path: Path) -> None:
    model = small_model("LlamaForCausalLM")
    adapted = small_adapters(model, tmp_path, {"head": ["q_proj", "lm_head"], "attn": ["v_proj", "o_proj"]})
    export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "head", "attn")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", pytest.param("Qwen2ForCausalLM", marks=pytest.mark.slow),
                                  "Gemma3ForCausalLM"])
def test_package_with_an_input_embedding_adapter_decodes_as_eager_peft(tmp_path: Path, arch: str) -> None:
    """LoRA on ``embed_tokens`` (as continued-pretraining recipes target it) beside the projections: swappable in the
    package, one adapter per row in a mixed batch (the rows' ids index their own adapter's table), and in ONNX
    Runtime GenAI; the Qwen2 model ties its output layer to the embedding, which the adapter leaves alone, and Gemma 3's
    embedding scales its rows, which PEFT scales the adapter's by too."""
    import onnxruntime_genai as og

    from tests.serving.genai_package import eager_greedy, genai_tokens

    model = small_model(arch)
    if arch == "Qwen2ForCausalLM":  # the output layer tied to the embedding, as small Qwen2 checkpoints have it
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    adapted = small_adapters(model, tmp_path, {"emb": ["embed_tokens", "q_proj"], "attn": ["v_proj", "o_proj"]})
    if arch == "Qwen2ForCausalLM":
        assert adapted["emb"].get_output_embeddings().weight is adapted["emb"].get_input_embeddings().weight
    export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "emb", "attn")
    og_model = og.Model(str(tmp_path / "pkg"))
    og_adapters = og.Adapters(og_model)
    og_adapters.load(str(tmp_path / "pkg" / "adapters" / "emb.onnx_adapter"), "emb")
    prompt = [1, 5, 9, 33, 70, 12]
    assert genai_tokens(og_model, prompt, 8, og_adapters, "emb") == eager_greedy(adapted["emb"], prompt, 8,
                                                                                  min_new_tokens=8)


def test_an_input_embedding_adapter_alone_changes_the_tokens(tmp_path: Path) -> None:
    """An adapter on ``embed_tokens`` only: its slot alone carries it (nothing else of the adapter is fed), and the
    rows decode as eager PEFT's, other tokens than the base model's."""
    from tests.serving.genai_package import eager_greedy

    model = small_model("LlamaForCausalLM")
    adapted = small_adapters(model, tmp_path, {"emb": ["embed_tokens"]})
    export_small(model, tmp_path, {"emb": tmp_path / "emb"})
    prompt = [1, 5, 9, 33, 70, 12]
    got = Generator(tmp_path / "pkg").generate([prompt], adapters="emb", max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted["emb"], prompt, 8, min_new_tokens=8) != eager_greedy(model, prompt, 8,
                                                                                           min_new_tokens=8)


def test_an_adapter_whose_saved_output_layer_differs_is_refused_by_name(tmp_path: Path) -> None:
    model = small_model("LlamaForCausalLM")
    small_adapters(model, tmp_path, {"head": ["q_proj", "lm_head"]})
    edit_peft_folder(tmp_path / "head", shift="lm_head.base_layer")
    with pytest.raises(AdapterError, match=r"lm_head\.weight replaces the base model's weight.*--merge-adapter"):
        export_small(model, tmp_path, {"head": tmp_path / "head"})
    assert not (tmp_path / "pkg").exists()


def _trainable_tokens(model, folder: Path) -> object:
    """``model`` saved, and a PEFT adapter on ``q_proj`` with trainable tokens 5 and 9 (nonzero rows) saved as
    ``folder / "tokens"``: the adapted model, in eval mode."""
    import torch

    from tests.serving.genai_package import save_small

    base = save_small(model, folder)
    torch.manual_seed(0)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                  peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 9],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0, 1.0)
    adapted.save_pretrained(folder / "tokens")
    return adapted.eval()


def test_trainable_tokens_merged_on_request_decode_as_eager_peft(tmp_path: Path) -> None:
    """``--merge-adapter`` bakes trainable tokens into the package's base model, where it decodes as eager PEFT."""
    from flora_graph.serving.genai import export_genai
    from tests.serving.genai_package import eager_greedy

    model = small_model("LlamaForCausalLM")
    adapted = _trainable_tokens(model, tmp_path)
    export_genai(tmp_path / "base", tmp_path / "pkg", merge=tmp_path / "tokens")
    prompt = [1, 5, 9, 33, 9]
    got = Generator(tmp_path / "pkg").generate([prompt], max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, prompt, 8, min_new_tokens=8) != eager_greedy(model, prompt, 8, min_new_tokens=8)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", pytest.param("Qwen2ForCausalLM", marks=pytest.mark.slow),
                                  "Gemma3ForCausalLM"])
def test_trainable_tokens_are_hot_swappable(tmp_path: Path, arch: str) -> None:
    """Trainable tokens (new embedding rows for the tokens named) as a LoRA of their count's rank on the embedding:
    one-hot ``A`` picks each token's id, ``B`` holds its new row less its old; on an output layer tied to the
    embedding (Qwen2 here), the same rows on their tokens' logits; Gemma 3's scaled embedding scales them. Greedy
    tokens equal eager PEFT's alone, beside a plain row, and in ONNX Runtime GenAI; the file's embedding product is
    PEFT's new rows less the old ones."""
    import numpy as np
    import onnxruntime_genai as og
    import torch

    from flora_graph.serving.adapter_file import read_adapter
    from tests.serving.genai_package import eager_greedy, genai_tokens

    model = small_model(arch)
    if arch == "Qwen2ForCausalLM":  # the output layer tied to the embedding: PEFT gives it the new rows too
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    adapted = _trainable_tokens(model, tmp_path)
    export_small(model, tmp_path, {"tokens": tmp_path / "tokens"})
    prompt = [1, 5, 9, 33, 9]
    want, plain = eager_greedy(adapted, prompt, 8, min_new_tokens=8), eager_greedy(model, prompt, 8, min_new_tokens=8)
    tied = arch == "Qwen2ForCausalLM"
    assert tied or want != plain  # (the tied model's own tokens are its new token's already)
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([prompt], adapters="tokens", max_new_tokens=8, min_new_tokens=8)[0] == want
    assert gen.generate([prompt, prompt], adapters=[None, "tokens"], max_new_tokens=8, min_new_tokens=8) == [plain, want]
    og_model = og.Model(str(tmp_path / "pkg"))
    loaded = og.Adapters(og_model)
    loaded.load(str(tmp_path / "pkg" / "adapters" / "tokens.onnx_adapter"), "tokens")
    assert genai_tokens(og_model, prompt, 8, loaded, "tokens") == want
    params = read_adapter(tmp_path / "pkg" / "adapters" / "tokens.onnx_adapter").params
    a, b = params["model.embed_tokens.lora_A"], params["model.embed_tokens.lora_B"]
    layer = next(m for n, m in adapted.named_modules() if n.endswith("embed_tokens.token_adapter"))
    scale = layer._get_embed_scale()
    with torch.no_grad():
        rows = (layer.trainable_tokens_delta["default"] - model.model.embed_tokens.weight[[5, 9]]).numpy()
    np.testing.assert_allclose((b @ a).T[[5, 9]], rows * (1.0 if scale is None else float(scale)), rtol=1e-5, atol=1e-5)
    assert not np.any((b @ a).T[[0, 1, 33]])  # the other tokens' rows are left alone
    assert ("lm_head.lora_A" in params) == tied  # a tied output layer carries the rows too
    if tied:  # each named token's logit row moves by its new row less its old, no other row
        head = params["lm_head.lora_B"] @ params["lm_head.lora_A"]
        np.testing.assert_allclose(head[[5, 9]], rows, rtol=1e-5, atol=1e-5)
        assert not np.any(head[[0, 1, 33]])


def test_trainable_tokens_export_through_peft_and_the_loader_names_the_option(tmp_path: Path) -> None:
    """``export_model`` installs the folder through PEFT (checked against eager there); flora_graph's own loader,
    which holds LoRA layers only, refuses it by the option's name."""
    import copy

    from flora_graph.adapters.peft import load_peft_adapter
    from flora_graph.model_export import export_model

    model = small_model("LlamaForCausalLM")
    _trainable_tokens(model, tmp_path)
    assert export_model(str(tmp_path / "base"), tmp_path / "m", adapter=tmp_path / "tokens", preset="fused").ok
    with pytest.raises(AdapterError, match=r"trainable_token_indices=\[5, 9\].*flora-graph export MODEL --adapter"):
        load_peft_adapter(copy.deepcopy(model), tmp_path / "tokens")


def test_an_adapter_that_trained_every_bias_swaps_them_beside_its_lora(tmp_path: Path) -> None:
    """``bias="all"`` trains every bias, which PEFT saves whole: Qwen2's ``q``/``k``/``v`` biases, also in the layers
    (``k_proj``) its LoRA leaves alone, where the package puts a slot of its bias alone; greedy tokens equal eager
    PEFT's (it dropped them once, and decoded other tokens)."""
    import torch

    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import eager_greedy, save_small
    from tests.serving.test_adapter_biases import without_biases

    model = small_model("Qwen2ForCausalLM")
    base = save_small(model, tmp_path)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                  peft.LoraConfig(r=4, target_modules=["q_proj"], bias="all",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("k_proj.bias") or name.endswith("v_proj.bias"):
                p.add_(torch.randn_like(p) * 3)
    adapted.save_pretrained(tmp_path / "biased")
    export_small(model, tmp_path, {"biased": tmp_path / "biased"})
    prompt = [1, 5, 9, 33, 70, 12]
    got = Generator(tmp_path / "pkg").generate([prompt], adapters="biased", max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted.eval(), prompt, 8, min_new_tokens=8) != without_biases(adapted, prompt)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_an_input_embedding_adapter_read_through_peft_s_layers_keeps_its_rows(tmp_path: Path, arch: str) -> None:
    """LoRA on ``embed_tokens`` in a folder read through PEFT's own layers (it also trains ``lm_head`` whole, and
    biases): the embedding's LoRA is read there too (Gemma 3's rows scaled, as PEFT scales them), not dropped; greedy
    tokens equal eager PEFT's alone and per row of a mixed batch, and differ from the same adapter without the
    embedding's LoRA."""
    import copy

    import torch

    from tests.serving.genai_package import eager_greedy, save_small

    model = small_model(arch)
    adapted = small_adapters(model, tmp_path, {"attn": ["v_proj", "o_proj"]})
    base = save_small(model, tmp_path)
    torch.manual_seed(6)
    emb = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                              modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        head = emb.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(torch.randn_like(head) * float(head.std()))
    emb.save_pretrained(tmp_path / "emb")
    adapted["emb"] = emb.eval()
    export_small(model, tmp_path, {n: tmp_path / n for n in ("attn", "emb")})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "emb", "attn")
    without = copy.deepcopy(adapted["emb"])
    with torch.no_grad():
        without.base_model.model.model.embed_tokens.lora_embedding_B["default"].zero_()
    prompt = [1, 5, 9, 33, 70, 12]
    assert eager_greedy(adapted["emb"], prompt, 8, min_new_tokens=8) != eager_greedy(without, prompt, 8,
                                                                                      min_new_tokens=8)


def test_dora_on_an_input_embedding_is_refused_by_name(tmp_path: Path) -> None:
    """DoRA on ``embed_tokens``, which no slot carries: refused naming the module, ``--merge-adapter`` offered."""
    from tests.serving.genai_package import save_small

    model = small_model("LlamaForCausalLM")
    base = save_small(model, tmp_path)
    peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                        peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True,
                                        init_lora_weights=False)).save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterError, match=r"'model\.embed_tokens': DoRA on an embedding layer.*--merge-adapter"):
        export_small(model, tmp_path, {"dora": tmp_path / "dora"})
    assert not (tmp_path / "pkg").exists()


def test_a_part_of_an_adapter_that_reading_it_loses_is_refused_not_served(tmp_path: Path, monkeypatch) -> None:
    """The slots read through PEFT's layers are checked module by module against PEFT's own outputs: with the
    embedding's LoRA lost in reading (as it once was), the export refuses naming the module instead of serving other
    tokens than eager PEFT; nothing is written."""
    import torch

    import flora_graph.serving.slots as slots
    from tests.serving.genai_package import save_small

    model = small_model("LlamaForCausalLM")
    base = save_small(model, tmp_path)
    torch.manual_seed(6)
    peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                        peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"],
                                        init_lora_weights=False)).save_pretrained(tmp_path / "emb")
    monkeypatch.setattr(slots, "_embedding_rows", lambda *args, **kw: None)
    with pytest.raises(AdapterError, match=r"module 'model\.embed_tokens': the adapter as read for its slots gives "
                                           r"other outputs than PEFT's own layer"):
        export_small(model, tmp_path, {"emb": tmp_path / "emb"})
    assert not (tmp_path / "pkg").exists()
