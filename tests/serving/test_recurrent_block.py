"""Griffin's recurrent block (RecurrentGemma): its convolution's last inputs and its recurrence's state kept in the
cache (``past.{i}.conv``, ``past.{i}.recurrent``) where transformers keeps them in attributes of the block, for any
number of tokens (:mod:`~flora_graph.frontend.recurrent_block`), padding entering the convolution as zeros.
References: eager transformers (with PEFT for an adapter), unpadded, row by row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.frontend.causal_lm import cache_layout  # noqa: E402
from flora_graph.frontend.traceable import traceable_modules  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    PADDED_PROMPTS,
    assert_mixed_rows_decode_as_eager_peft,
    export_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

ARCH = "RecurrentGemmaForCausalLM"


@pytest.fixture(scope="module")
def model():
    """The family test's small RecurrentGemma (two recurrent blocks, then windowed attention), the blocks' input
    projection and convolution given nonzero biases: the padding's projections are then nonzero, as in a trained
    model (transformers initializes them to zeros)."""
    model = small_model(ARCH)
    with torch.no_grad():
        for layer in model.model.layers[:2]:
            layer.temporal_block.linear_x.bias.normal_(0, 0.5)
            layer.temporal_block.conv_1d.bias.normal_(0, 0.5)
    return model


def test_swap_keeps_eager_logits_and_steps_from_the_cache(model) -> None:
    ids = torch.tensor([[3, 17, 40, 9, 21, 7, 66]])
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        with traceable_modules(model) as swapped:
            cache = transformers.DynamicCache(config=model.config)
            prefill = model(input_ids=ids[:, :5], use_cache=True, cache=cache).logits
            steps = [model(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t]]), use_cache=True,
                           cache=cache).logits for t in (5, 6)]
    assert swapped == ["model.layers.0.temporal_block", "model.layers.1.temporal_block"]
    assert cache.get_recurrent_state(1).shape == (1, model.config.lru_width)  # the states are the cache's now
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), want, rtol=0, atol=1e-6)


def test_layout_names_each_blocks_states(model) -> None:
    layout = cache_layout(model)
    width, taps = model.config.lru_width, model.config.conv1d_width
    assert layout.past_names() == ["past.0.conv", "past.0.recurrent", "past.1.conv", "past.1.recurrent",
                                   "past_key_values.2.key", "past_key_values.2.value"]
    assert layout.state_shape(0, "conv") == (width, taps) and layout.state_shape(1, "recurrent") == (width,)


def test_left_padded_prefill_in_one_call_gives_each_rows_logits_alone(model, tmp_path: Path) -> None:
    """One call over a left-padded batch, as any ONNX Runtime caller may make it (the Generator prefills rows apart)."""
    import onnxruntime as ort

    export_small(model, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "pkg" / "model.onnx"), providers=["CPUExecutionProvider"])

    def logits(rows: list[list[int]], mask: list[list[int]], positions: list[list[int]]) -> np.ndarray:
        feeds = {"input_ids": np.array(rows), "attention_mask": np.array(mask), "position_ids": np.array(positions)}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((len(rows), i.shape[1], 0, i.shape[3]), np.float32)
            elif i.name.startswith("past."):
                feeds[i.name] = np.zeros((len(rows), *i.shape[1:]), np.float32)
        return session.run(["logits"], feeds)[0]

    long, short = PADDED_PROMPTS
    pad = len(long) - len(short)
    both = logits([long, [0] * pad + short], [[1] * len(long), [0] * pad + [1] * len(short)],
                  [list(range(len(long))), [1] * pad + list(range(len(short)))])
    np.testing.assert_allclose(both[1, pad:], logits([short], [[1] * len(short)], [list(range(len(short)))])[0],
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[0], logits([long], [[1] * len(long)], [list(range(len(long)))])[0], rtol=0,
                               atol=1e-5)


def test_package_with_adapters_decodes_padded_and_mixed_rows_as_eager_peft(model, tmp_path: Path) -> None:
    adapted = small_adapters(model, tmp_path, {"block": ["linear_x", "linear_y", "linear_out"],
                                                  "attn": ["q_proj", "v_proj", "o_proj", "down_proj"]})
    report = export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert "recurrent" in report.not_for_genai
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "block", "attn")
