"""xLSTM (transformers' mLSTM blocks, xLSTM-7B's): each layer's matrix memory, normalizer and stabilizer kept in the
cache (``past.{i}.recurrent``, ``.recurrent.1``, ``.recurrent.2``) where transformers keeps an ``xLSTMCache`` of its own,
in one closed form for any number of tokens (:mod:`~flora_graph.frontend.xlstm`), padding adding and decaying nothing.
References: eager transformers (with PEFT for an adapter), unpadded, row by row, through its own cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.frontend.causal_lm import cache_layout  # noqa: E402
from flora_graph.frontend.xlstm import is_xlstm_lm, xlstm_cache, xlstm_forward  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_captured_without_cache_as_eager_peft,
    assert_mixed_rows_decode_as_eager_peft,
    assert_one_padded_call_gives_rows_alone,
    export_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

ARCH = "xLSTMForCausalLM"


@pytest.fixture(scope="module")
def model():
    """The family test's small xLSTM (hidden 128: 4 heads of keys 16 wide and values 32), its input gates' biases
    raised so that the stabilizer follows the input gate on some tokens and the decay on others."""
    model = small_model(ARCH)
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.mlstm_layer.igate_preact.bias.normal_(2.0, 3.0)
    return model


def test_forward_keeps_eager_logits_and_steps_from_the_cache(model) -> None:
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(0))  # past the chunk size (64)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        whole = xlstm_forward(model)(input_ids=ids).logits
        eager = model(input_ids=ids[:, :9], use_cache=True)
        forward, cache = xlstm_forward(model), xlstm_cache(model)
        prefill = forward(input_ids=ids[:, :5], past_key_values=cache).logits
        steps = [forward(input_ids=ids[:, t:t + 1], past_key_values=cache).logits for t in range(5, 9)]
    assert is_xlstm_lm(model)
    torch.testing.assert_close(whole, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), eager.logits, rtol=0, atol=1e-4)
    # the states are transformers' own, to float32 rounding through the exponential gates: up to 4e-5 on states as
    # large as 10.6 (1e-5 of each state's largest entry), which one small entry's relative error alone can exceed
    for j, state in enumerate(eager.cache.rnn_state[1]):
        torch.testing.assert_close(cache.layers[1].recurrent_states[j], state, rtol=1e-4, atol=1e-4)


def test_layout_names_each_layers_states(model) -> None:
    layout = cache_layout(model)
    cfg = model.config
    assert layout.past_names() == [f"past.{i}.{k}" for i in range(2) for k in ("recurrent", "recurrent.1", "recurrent.2")]
    assert layout.kv_layers == () and layout.state_shape(0, "recurrent") == (cfg.num_heads, 16, 32)
    assert layout.state_shape(1, "recurrent.1") == (cfg.num_heads, 16)
    assert layout.state_shape(1, "recurrent.2") == (cfg.num_heads, 1)


def test_left_padded_prefill_in_one_call_gives_each_rows_logits_alone(model, tmp_path: Path) -> None:
    """One call over a left-padded batch (transformers' xLSTM reads no mask and runs the padding as tokens)."""
    assert_one_padded_call_gives_rows_alone(model, tmp_path)


def test_package_with_adapters_decodes_padded_and_mixed_rows_as_eager_peft(model, tmp_path: Path) -> None:
    adapted = small_adapters(model, tmp_path, {"mix": ["q", "k", "v", "igate_preact"],
                                               "out": ["out_proj", "proj_down", "lm_head"]})
    report = export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert "it caches no keys or values" in report.not_for_genai
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "mix", "out", new=16)


def test_captured_without_the_cache_at_any_length_as_eager_peft(model) -> None:
    """``capture`` (no cache) swaps the forward in for the trace and out after: every length, against eager PEFT."""
    assert_captured_without_cache_as_eager_peft(model, ["q", "v", "out_proj"])
