"""A model that runs a section of its layers several times (Dory's recurrent loops) and caches each pass apart:
``per_loop`` in cache layers after its own, which the export carries as more layers; ``last_loop`` in the last
pass's layers alone, read by the earlier passes. References: eager transformers' greedy tokens, row by row."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import cache_layout  # noqa: E402
from tests.serving import test_causal_lm_families as families  # noqa: E402
from tests.serving.genai_package import assert_padded_rows_decode_as_eager  # noqa: E402


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
    assert_padded_rows_decode_as_eager(_dory("last_loop", monkeypatch), tmp_path)
