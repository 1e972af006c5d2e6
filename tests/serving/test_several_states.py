"""A layer that keeps several states of a kind (Inkling: four short convolutions a layer, beside windowed attention in
the same cache layer): ``past.{i}.conv``, ``past.{i}.conv.1``, ... and a package that decodes left-padded rows past
the window as eager transformers does, row by row."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import cache_layout, state_slot  # noqa: E402
from tests.serving.genai_package import assert_padded_rows_decode_as_eager  # noqa: E402
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
    assert_padded_rows_decode_as_eager(small_model("InklingForCausalLM"), tmp_path)  # a window of 4 on both layers


def test_looped_layers_keep_a_cache_layer_per_pass() -> None:
    """Inkling 2 Loop runs its last two layers twice: the second pass keeps keys, values and states of its own, in
    cache layers 4 and 5, of the kinds of layers 2 and 3 (a window, then full attention): those of layers 0 and 1."""
    layout = cache_layout(small_model("Inkling2LoopForCausalLM"))
    assert (layout.layers, layout.repeats) == (6, (0, 1))
    assert "past.5.conv.3" in layout.past_names() and "present.5.value" in layout.present_names()


@pytest.mark.slow  # 30 s: the longest of the default run
def test_looped_package_decodes_left_padded_rows_as_eager(tmp_path: Path) -> None:
    assert_padded_rows_decode_as_eager(small_model("Inkling2LoopForCausalLM"), tmp_path)
