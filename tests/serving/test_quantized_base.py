"""A QLoRA adapter's base: a bitsandbytes 4-bit (or 8-bit) checkpoint, dequantized as it loads. References: eager
PEFT on the same checkpoint, as transformers loads it (bitsandbytes' own layers; their CPU kernels round their
products about 1e-3 apart from a plain float product) and on its dequantized weights (exact greedy tokens); other
quantized checkpoints are refused by name before anything loads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
import bitsandbytes  # noqa: E402, F401  (a test dependency: transformers reads the checkpoints through it)

from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.model_export import ModelFolderError, check_model_folder  # noqa: E402
from flora_graph.serving.genai import export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import eager_greedy  # noqa: E402

PROMPT = [1, 5, 9, 33, 70, 12]


def _quantized(root: Path, bits: int) -> Path:
    """A small Llama (sizes bitsandbytes' CPU kernels take: multiples of its 64-value blocks) saved as a bitsandbytes
    ``bits``-bit checkpoint (NF4 for 4 bits) with a word tokenizer: its folder."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "float")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if bits == 4 else \
        transformers.BitsAndBytesConfig(load_in_8bit=True)
    folder = root / f"q{bits}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=quant,
                                                          device_map="cpu").save_pretrained(folder)
    save_word_tokenizer(folder, cfg.vocab_size)
    return folder


def _qlora(base: Path, folder: Path, *, dequantize: bool = False):
    """Eager PEFT (seeded, nonzero ``B``) on the checkpoint ``base`` as transformers loads it (its bitsandbytes layers;
    ``dequantize``: on their float weights), saved as ``folder`` unless it exists: the adapted model, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        if dequantize:
            model = model.dequantize()
        torch.manual_seed(4)
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    if not folder.exists():
        adapted.save_pretrained(folder)
    else:
        adapted.load_adapter(folder, "default", is_trainable=False)
    return adapted.eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_qlora_adapter_on_its_bitsandbytes_base_decodes_as_eager_peft(tmp_path: Path, bits: int) -> None:
    """The package of a bitsandbytes checkpoint and a QLoRA adapter trained on it: greedy tokens equal eager PEFT's on
    the dequantized weights; its logits are those of eager PEFT on the checkpoint's own layers within their kernels'
    rounding; the export says the checkpoint was dequantized."""
    base = _quantized(tmp_path, bits)
    on_layers = _qlora(base, tmp_path / "qlora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_genai(base, tmp_path / "pkg", {"qlora": tmp_path / "qlora"})
    assert any(f"bitsandbytes {bits}-bit" in n and "dequantized" in n for n in report.notes), report.notes
    gen = Generator(tmp_path / "pkg")
    exact = _qlora(base, tmp_path / "qlora", dequantize=True)
    got = gen.generate([PROMPT], adapters="qlora", max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(exact, PROMPT, 8, min_new_tokens=8)
    assert got != gen.generate([PROMPT], max_new_tokens=8, min_new_tokens=8)[0]  # the adapter is fed
    from flora_graph.serving.session import AdapterSession

    session = AdapterSession(tmp_path / "pkg" / "model.onnx")
    session.load_adapter("qlora", tmp_path / "pkg" / "adapters" / "qlora.onnx_adapter")
    ids = np.array([PROMPT], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    heads, dim = 2, 16  # the prefill: every layer's past keys and values empty
    feed.update({n: np.zeros((1, heads, 0, dim), np.float32) for n in session.input_names if n.startswith("past_")})
    logits = session.run(feed, adapter="qlora")["logits"]
    with torch.no_grad():
        want = on_layers(input_ids=torch.from_numpy(ids)).logits.numpy()
        float_want = exact(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, float_want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, want, rtol=0, atol=2e-2)  # bitsandbytes' CPU kernels' rounding


def test_other_quantized_checkpoints_are_refused_by_name_before_loading(tmp_path: Path, monkeypatch) -> None:
    """An HQQ checkpoint's weights flora_graph does not read: refused naming the method, the ones it reads, the float
    checkpoint and ``--precision int4`` offered; a bitsandbytes one without the package: refused naming it."""
    folder = tmp_path / "m"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "quantization_config": {"quant_method": "hqq", "bits": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFolderError,
                       match=r"a hqq checkpoint .*bitsandbytes, GPTQ, AWQ, compressed-tensors and FP8 .*float checkpoint .*--precision int4"):
        check_model_folder(folder)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelFolderError, match=r"a bitsandbytes 4-bit \(nf4\) checkpoint.*pip install bitsandbytes"):
        check_model_folder(folder)
    config["quantization_config"] = {"bits": 4}  # no quant_method: refused, saying so
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"unnamed method \(quantization_config has no quant_method\)"):
        check_model_folder(folder)
