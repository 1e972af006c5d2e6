"""A layer that keeps several states of a kind (Inkling: four short convolutions a layer, beside windowed attention in
the same cache layer): ``past.{i}.conv``, ``past.{i}.conv.1``, ... and a package that decodes left-padded rows past
the window as eager transformers does, row by row."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import cache_layout, state_slot  # noqa: E402
from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import eager_greedy  # noqa: E402
from tests.serving.test_causal_lm_families import small_model  # noqa: E402


def test_state_slot_reads_the_index() -> None:
    assert state_slot("conv") == ("conv", 0)
    assert state_slot("recurrent.3") == ("recurrent", 3)


def test_layout_names_every_state_of_a_layer() -> None:
    layout = cache_layout(small_model("InklingForCausalLM"))
    assert layout.past_names()[:6] == ["past_key_values.0.key", "past_key_values.0.value", "past.0.conv", "past.0.conv.1",
                                       "past.0.conv.2", "past.0.conv.3"]
    assert layout.present_names()[-1] == "present.1.conv.3"


def test_package_decodes_left_padded_rows_past_the_window_as_eager(tmp_path: Path) -> None:
    model = small_model("InklingForCausalLM")  # a window of 4 positions on both layers
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg")
    prompts = [[1, 5, 9, 33, 70, 12, 40, 41, 7], [1, 8, 3]]
    got = Generator(tmp_path / "pkg").generate(prompts, max_new_tokens=8, min_new_tokens=8)
    assert got == [eager_greedy(model, p, 8, min_new_tokens=8) for p in prompts]
