"""Dynamic NTK rotary (``rope_scaling={"rope_type": "dynamic"}``): captured (torch.export could not trace its
frequency update) and decoding as a fresh eager model does, below and past the original length."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import dynamic_ntk_per_row  # noqa: E402
from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402

ORIGINAL = 16


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL,
                                   rope_scaling={"rope_type": "dynamic", "factor": 4.0}, initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _fresh_eager(folder: Path, prompt: list[int], new: int) -> list[int]:
    """Eager greedy tokens of a model loaded afresh: transformers keeps the grown frequencies between calls."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()


def test_dynamic_rotary_is_switched_and_restored() -> None:
    model = _model()
    rotary = model.model.rotary_emb
    with dynamic_ntk_per_row(model) as paths:
        assert paths == ["model.rotary_emb"] and "forward" in vars(rotary)
    assert "forward" not in vars(rotary) and torch.equal(rotary.inv_freq, rotary.original_inv_freq)


def test_package_decodes_past_the_original_length_as_a_fresh_eager_model(tmp_path: Path) -> None:
    model = _model()
    model.config.eos_token_id = 2
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg")
    gen = Generator(tmp_path / "pkg")
    below, past = [1, *range(5, 15)], [1, *range(5, 25)]  # 11 tokens crossing 16 while decoding; 21 in the prompt
    cfg = transformers.LlamaConfig.from_pretrained(tmp_path / "base")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", config=cfg).eval()  # no scaling
    for prompt in (below, past):
        want = _fresh_eager(tmp_path / "base", prompt, 12)
        with torch.no_grad():  # the scaling shows in the tokens
            unscaled = plain.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      eos_token_id=None)[0, len(prompt):].tolist()
        assert unscaled != want or prompt is below
        assert gen.generate([prompt], max_new_tokens=12, stop_tokens=[])[0] == want
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")
    from tests.serving.genai_package import genai_tokens

    assert genai_tokens(og.Model(str(tmp_path / "pkg")), past, 12) == _fresh_eager(tmp_path / "base", past, 12)
    # a row past the original length next to one below it: each takes its own frequencies
    got = gen.generate([below, past], max_new_tokens=12, stop_tokens=[])
    assert got == [_fresh_eager(tmp_path / "base", p, 12) for p in (below, past)]


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "dynamic", "factor": 4.0},
])
def test_rotary_scalings_capture_as_eager_at_prefill_and_decode(rope: dict) -> None:
    """Positions past the original length (8 or 16) at prefill and at one decode step, left padding included."""
    import numpy as np

    from flora_graph.frontend.causal_lm import (
        CausalLMWithPast,
        cache_layout,
        capture_causal_lm,
        example_inputs,
        past_names,
    )
    from flora_graph.runtimes import compile

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL,
                                   rope_scaling=rope)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(model)
    layout = cache_layout(model)
    exe = compile(graph, "onnxruntime")
    for batch, seq, past, pad in [(2, 20, 0, 3), (2, 1, 24, 2)]:
        x = example_inputs(layout, 128, batch, seq, past, seed=batch, left_pad=pad)
        feed = {k: v.numpy() for k, v in x.items() if k != "past_key_values"}
        feed.update({n: t.numpy() for n, t in zip(past_names(layout.layers), x["past_key_values"], strict=True)})
        if rope["rope_type"] == "dynamic":  # eager row by row, each from a fresh state (the graph's rule)
            want = []
            for r in range(batch):
                model.model.rotary_emb.register_buffer("inv_freq", model.model.rotary_emb.original_inv_freq.clone(),
                                                       persistent=False)
                model.model.rotary_emb.max_seq_len_cached = model.model.rotary_emb.original_max_seq_len
                row = {k: (v[r:r + 1] if isinstance(v, torch.Tensor) else [t[r:r + 1] for t in v]) for k, v in x.items()}
                with torch.no_grad():
                    want.append(CausalLMWithPast(model, layout)(**row)[0].numpy())
            want = np.concatenate(want)
        else:
            with torch.no_grad():
                want = CausalLMWithPast(model, layout)(**x)[0].numpy()
        got = exe(feed)["logits"]
        rows = [r for r in range(batch) if not (r == 0 and seq > 1)]  # a padded query row is not compared
        np.testing.assert_allclose(got[rows], want[rows], atol=3e-5, rtol=1e-4, err_msg=str(rope))
