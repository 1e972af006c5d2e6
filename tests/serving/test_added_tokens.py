"""A fine-tune that added tokens (its embedding layers resized, which PEFT saves whole beside the adapter): merged
into a package that takes its vocabulary and the tokenizer saved beside it, or into a plain export; refused by name
as a hot-swappable adapter. References: eager PEFT on the resized base (tokens with the new ids among the prompt and
the output), ONNX Runtime GenAI, the files written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from flora_graph.errors import AdapterError  # noqa: E402
from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import eager_greedy, genai_tokens, save_small  # noqa: E402
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

ADDED = 8
PROMPT = [1, 5, 130, 33, 133, 12]  # two of the added tokens


def _added_tokens(root: Path, tokenizer: bool = True):
    """A small Llama saved as ``root / "base"`` and a fine-tune of it that added :data:`ADDED` tokens: its embeddings
    resized and trained whole (``modules_to_save``, their new rows random) beside LoRA on ``q_proj``, saved as
    ``root / "ft"`` (with its word tokenizer of the new vocabulary where ``tokenizer``): the base model and the
    adapted one, in eval mode."""
    model = small_model("LlamaForCausalLM")
    base = save_small(model, root)
    resized = transformers.AutoModelForCausalLM.from_pretrained(base)
    vocab = resized.config.vocab_size + ADDED
    resized.resize_token_embeddings(vocab, mean_resizing=False)
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(resized, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               modules_to_save=["embed_tokens", "lm_head"],
                                                               init_lora_weights=False))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if ".modules_to_save." in name:
                    p[-ADDED:] = torch.randn_like(p[-ADDED:])  # the new tokens' rows, trained
        adapted.save_pretrained(root / "ft")
    if tokenizer:
        save_word_tokenizer(root / "ft", vocab)
    return model, adapted.eval()


def test_a_merged_fine_tune_that_added_tokens_takes_its_vocabulary_and_tokenizer(tmp_path: Path) -> None:
    """``--merge-adapter``: the package's vocabulary is the fine-tune's, its tokenizer the one saved beside the adapter,
    and greedy tokens over prompts with the added ids equal eager PEFT's, in the Generator and in GenAI."""
    import onnxruntime_genai as og

    _, adapted = _added_tokens(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_genai(tmp_path / "base", tmp_path / "pkg", merge=tmp_path / "ft")
    assert any("tokenizer files of" in n for n in report.notes), report.notes
    vocab = adapted.config.vocab_size
    assert vocab == 128 + ADDED
    assert json.loads((tmp_path / "pkg" / "genai_config.json").read_text())["model"]["vocab_size"] == vocab
    assert (tmp_path / "pkg" / "tokenizer.json").read_bytes() == (tmp_path / "ft" / "tokenizer.json").read_bytes()
    want = eager_greedy(adapted, PROMPT, 8, min_new_tokens=8)
    got = Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=8, min_new_tokens=8)[0]
    assert got == want and any(t >= 128 for t in want)  # the new rows are in the output layer too
    assert genai_tokens(og.Model(str(tmp_path / "pkg")), PROMPT, 8) == want


def test_without_its_tokenizer_the_package_says_the_added_tokens_are_missing(tmp_path: Path) -> None:
    """A fine-tune saved without its tokenizer: the package takes its vocabulary, and the export says the base's
    tokenizer lacks the added ids."""
    _, adapted = _added_tokens(tmp_path, tokenizer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_genai(tmp_path / "base", tmp_path / "pkg", merge=tmp_path / "ft")
    assert any("without the tokens" in n and "ids 128 and up" in n for n in report.notes), report.notes
    got = Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, PROMPT, 8, min_new_tokens=8)


def test_a_fine_tune_that_added_tokens_cannot_swap_and_says_to_merge(tmp_path: Path) -> None:
    """As a hot-swappable adapter the fine-tune is refused naming both vocabularies, ``--merge-adapter`` offered;
    nothing is written."""
    _added_tokens(tmp_path)
    with pytest.raises(AdapterError, match=r"holds? 136 tokens, the base model 128 .*--merge-adapter"):
        export_genai(tmp_path / "base", tmp_path / "pkg", {"ft": tmp_path / "ft"})
    assert not (tmp_path / "pkg").exists()


def test_a_plain_export_with_such_an_adapter_takes_its_vocabulary(tmp_path: Path) -> None:
    """``flora-graph export BASE --adapter DIR`` (merged and fused): the model takes the fine-tune's vocabulary; its
    logits over the added ids equal eager PEFT's."""
    import onnxruntime as ort

    from flora_graph.model_export import export_model

    _, adapted = _added_tokens(tmp_path)
    ids = np.array([PROMPT], np.int64)
    with torch.no_grad():
        want = adapted(input_ids=torch.from_numpy(ids)).logits.numpy()
    for preset in ("merged", "fused"):
        report = export_model(str(tmp_path / "base"), tmp_path / preset, adapter=tmp_path / "ft", preset=preset)
        sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input_ids": ids})[0]
        assert got.shape[-1] == 128 + ADDED
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
