"""A model that runs a section of its layers several times (Dory's recurrent loops) and caches each pass apart:
``per_loop`` in cache layers after its own, which the export carries as more layers; ``last_loop`` in the last
pass's layers alone, read by the earlier passes. References: eager transformers' greedy tokens, row by row."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import cache_layout  # noqa: E402
from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving import test_causal_lm_families as families  # noqa: E402
from tests.serving.genai_package import eager_greedy  # noqa: E402


def _dory(mode: str, monkeypatch: pytest.MonkeyPatch):
    """The family test's small Dory (4 layers: 1 input, 2 looped twice, 1 output) in cache mode ``mode``."""
    monkeypatch.setitem(families.OVERRIDES, "DoryForCausalLM",
                        {**families.OVERRIDES["DoryForCausalLM"], "recurrent_kv_cache_mode": mode})
    return families.small_model("DoryForCausalLM")


@pytest.mark.parametrize(("mode", "layers"), [("per_loop", 6), ("last_loop", 4)])
def test_layout_counts_a_cache_layer_per_pass(mode: str, layers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = cache_layout(_dory(mode, monkeypatch))
    assert layout.layers == layers  # per_loop: the second pass of the 2 looped layers in 2 layers more
    assert layout.past_names()[-1] == f"past_key_values.{layers - 1}.value"


def test_last_loop_package_decodes_left_padded_rows_as_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _dory("last_loop", monkeypatch)
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg")
    prompts = [[1, 5, 9, 33, 70, 12, 40, 41, 7], [1, 8, 3]]
    got = Generator(tmp_path / "pkg").generate(prompts, max_new_tokens=8, min_new_tokens=8)
    assert got == [eager_greedy(model, p, 8, min_new_tokens=8) for p in prompts]
