"""RWKV (transformers' RWKV-4): its token-shift and WKV states kept in the cache (``past.{i}.conv``, ``past.{i}.conv.1``,
``past.{i}.recurrent``) where transformers passes a list of its own, the recurrence one scan for any number of tokens
(:mod:`~flora_graph.frontend.rwkv`), padding leaving every state as it was. References: eager transformers (with PEFT
for an adapter), unpadded, row by row, through its own ``state`` list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.frontend.causal_lm import cache_layout  # noqa: E402
from flora_graph.frontend.rwkv import is_rwkv_lm, rwkv_cache, rwkv_forward  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_captured_without_cache_as_eager_peft,
    assert_mixed_rows_decode_as_eager_peft,
    assert_one_padded_call_gives_rows_alone,
    export_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

ARCH = "RwkvForCausalLM"


@pytest.fixture
def model():
    """A fresh one for each test (its first forward in eval mode rescales its output layers in place, which a copy
    saved after would keep, and its folder's loader apply again): the family test's small RWKV with its output layers rescaled after every block (``rescale_every=1``: the
    hidden states halved after each, as a 6-block-period checkpoint does over its depth), and token keys spread wide
    (``time_first`` and the key projections scaled up: exponents past float32's range unless the recurrence scales
    them, as transformers' loop does with its running maximum)."""
    model = small_model(ARCH)
    model.config.rescale_every = 1
    with torch.no_grad():
        for block in model.rwkv.blocks:
            block.attention.key.weight.mul_(30)
            block.attention.time_first.add_(60)
    return model


def test_forward_keeps_eager_logits_and_steps_from_the_cache(model) -> None:
    ids = torch.tensor([[3, 17, 40, 9, 21, 7, 66]])
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=True)
        want, state = eager.logits, eager.state
        forward, cache = rwkv_forward(model), rwkv_cache(model)
        prefill = forward(input_ids=ids[:, :5], past_key_values=cache).logits
        steps = [forward(input_ids=ids[:, t:t + 1], past_key_values=cache).logits for t in (5, 6)]
    assert is_rwkv_lm(model) and model.rwkv.layers_are_rescaled
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), want, rtol=1e-5, atol=1e-5)
    layer = cache.layers[1]  # the token shifts are transformers' own; the WKV state the same values, scaled apart
    torch.testing.assert_close(layer.conv_states[0][..., 0], state[1][:, :, 1])
    torch.testing.assert_close(layer.conv_states[1][..., 0], state[0][:, :, 1])
    num, den, scale = layer.recurrent_states[0].unbind(1)
    ratio = state[2][:, :, 1] / state[3][:, :, 1]
    torch.testing.assert_close(num, ratio, rtol=1e-4, atol=1e-5)
    assert bool((den == 1).all()) and bool(torch.isfinite(scale).all())


def test_layout_names_each_blocks_states(model) -> None:
    layout = cache_layout(model)
    hidden, width = model.config.hidden_size, model.config.attention_hidden_size
    assert layout.past_names() == [f"past.{i}.{k}" for i in range(2) for k in ("conv", "conv.1", "recurrent")]
    assert layout.kv_layers == () and layout.state_shape(0, "conv") == (hidden, 1)
    assert layout.state_shape(1, "recurrent") == (3, width)


def test_left_padded_prefill_in_one_call_gives_each_rows_logits_alone(model, tmp_path: Path) -> None:
    """One call over a left-padded batch (transformers' RWKV ignores the mask and runs the padding as tokens)."""
    assert_one_padded_call_gives_rows_alone(model, tmp_path)


def test_package_with_adapters_decodes_padded_and_mixed_rows_as_eager_peft(model, tmp_path: Path) -> None:
    adapted = small_adapters(model, tmp_path, {"mix": ["key", "value", "receptance"], "out": ["output", "head"]})
    report = export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert "it caches no keys or values" in report.not_for_genai
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "mix", "out", new=16)


def test_captured_without_the_cache_at_any_length_as_eager_peft(model) -> None:
    """``capture`` (no cache) swaps the forward in for the trace and out after: every length, against eager PEFT."""
    assert_captured_without_cache_as_eager_peft(model, ["key", "value", "output"])
