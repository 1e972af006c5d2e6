"""MiniMax's lightning attention: the closed form (:mod:`flora_graph.frontend.lightning_attention`) against the
recurrence step by step in numpy and against transformers' own module (its loop over blocks without a state, over
tokens with one); a MiniMax package's left-padded rows against eager, row by row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flora_graph.frontend.lightning_attention import decayed_linear_attention, is_lightning_attention
from flora_graph.frontend.traceable import traceable_modules

transformers = pytest.importorskip("transformers")


def _recurrence(q, k, v, slope, state):
    """``S_t = exp(-slope) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, one token at a time (float64)."""
    q, k, v, s = (np.asarray(a, np.float64) for a in (q, k, v, state))
    lam = np.exp(-np.asarray(slope, np.float64))[None]  # [1, heads, 1, 1]
    out = np.zeros_like(q)
    for t in range(q.shape[2]):
        s = lam * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] = np.einsum("bhd,bhde->bhe", q[:, :, t], s)
    return out, s


@pytest.mark.parametrize("seq", [1, 5, 9])
@pytest.mark.parametrize("start", ["zeros", "state"])
def test_closed_form_equals_the_recurrence(seq: int, start: str) -> None:
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(2, 3, seq, 4, generator=g) for _ in range(3))
    slope = torch.tensor([0.05, 0.4, 1.5])[:, None, None]
    state = torch.randn(2, 3, 4, 4, generator=g) if start == "state" else torch.zeros(2, 3, 4, 4)
    out, final = decayed_linear_attention(q, k, v, slope, state)
    want_out, want_final = _recurrence(q, k, v, slope, state)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.numpy(), want_final, rtol=1e-5, atol=1e-5)


def _minimax():
    cfg = transformers.MiniMaxConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=256, block_size=4,
                                     layer_types=["linear_attention", "full_attention"], pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.MiniMaxForCausalLM(cfg).eval()


@pytest.mark.parametrize("seq", [3, 9])  # one block, and three blocks the last of them partial
def test_swapped_module_equals_transformers_prefill_and_decode(seq: int) -> None:
    model = _minimax()
    attn = model.model.layers[0].self_attn
    assert is_lightning_attention(attn) and not is_lightning_attention(model.model.layers[1].self_attn)
    ids = torch.arange(3, 3 + 2 * seq).reshape(2, seq)
    step = torch.tensor([[7], [11]])
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)  # transformers' loop over blocks
        want = model(input_ids=step, cache=first.past_key_values, use_cache=True).logits  # its loop over tokens
        with traceable_modules(model) as swapped:
            assert swapped == ["model.layers.0.self_attn"]
            again = model(input_ids=ids, use_cache=True)
            got = model(input_ids=step, cache=again.past_key_values, use_cache=True).logits
    assert "forward" not in vars(attn)  # restored
    np.testing.assert_allclose(again.logits.numpy(), first.logits.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(again.past_key_values.linear_cache[0].numpy(),
                               first.past_key_values.linear_cache[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)


def test_package_decodes_left_padded_rows_as_eager(tmp_path: Path) -> None:
    from tests.serving.genai_package import assert_padded_rows_decode_as_eager

    report = assert_padded_rows_decode_as_eager(_minimax(), tmp_path)
    assert "linear attention" in report.not_for_genai
