"""A deep decoder's GenAI package, its layers stamped from three traced ones, decodes as eager PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("peft")

import flora_graph.frontend.causal_lm as causal_lm
from flora_graph.serving.generate import Generator
from tests.frontend.test_layer_stamp import deep
from tests.serving.genai_package import (
    assert_mixed_rows_decode_as_eager_peft,
    export_small,
    small_adapters,
)


def test_a_package_of_a_deep_model_with_adapters_is_stamped_and_decodes_as_eager_peft(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Seven Llama layers and two adapters on every layer (other modules, other ranks): the export traces three
    layers (tracing all of them is refused here), and the Generator's greedy tokens alone and in a mixed batch equal
    eager PEFT's."""
    model = deep("LlamaForCausalLM")
    adapted = small_adapters(model, tmp_path, {"attn": ["q_proj", "v_proj", "o_proj"], "mlp": ["up_proj", "down_proj"]})

    def refuse(*args, **kwargs):
        raise AssertionError("every layer traced")

    monkeypatch.setattr(causal_lm, "capture", refuse)
    export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "attn", "mlp")
