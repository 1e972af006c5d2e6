"""Packages for every supported causal LM: GenAI (where it has a model type) and the Generator equal eager greedy."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")

from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import GENAI_TYPES, GENERATOR_ONLY, export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.frontend.test_causal_lm import tiny_causal_lm  # noqa: E402

PROMPT, NEW = [1, 5, 9, 33, 70], 8
FAST = {"Qwen3ForCausalLM", "GPT2LMHeadModel"}  # no BOS token id; a Generator-only architecture


@pytest.mark.parametrize("arch", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow)
                                  for a in [*GENAI_TYPES, *GENERATOR_ONLY]])
def test_package_generates_eager_greedy_tokens(arch: str, tmp_path: Path) -> None:
    model = tiny_causal_lm(arch)
    model.config.eos_token_id = 2
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_genai(tmp_path / "base", tmp_path / "pkg")
        with torch.no_grad():
            want = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                                  do_sample=False)[0, len(PROMPT):].tolist()
    assert report.genai == (arch in GENAI_TYPES)
    assert Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=NEW, stop_tokens=[])[0] == want
    if report.genai:
        gen_model = og.Model(str(tmp_path / "pkg"))
        params = og.GeneratorParams(gen_model)
        params.set_search_options(max_length=len(PROMPT) + NEW, min_length=len(PROMPT) + NEW, do_sample=False)
        gen = og.Generator(gen_model, params)
        gen.append_tokens(PROMPT)
        while not gen.is_done():
            gen.generate_next_token()
        assert [int(t) for t in gen.get_sequence(0)][len(PROMPT):] == want
