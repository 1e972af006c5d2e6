"""Token ids in a recurrent state (:mod:`flora_graph.frontend.token_context`): Qwen4-Exp's n-gram embeddings through
float states of id + 1, their restarts after end-of-text found without ``cummax``, give eager's embeddings from an
empty cache and across steps; the encoding itself; a vocabulary
float32 cannot hold exactly is refused by name. (Its package decodes padded rows as eager: ``test_qsa_indexer``, whose
model has these embeddings too.)"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.errors import GraphError  # noqa: E402
from flora_graph.frontend.token_context import (  # noqa: E402
    EXACT_IDS,
    TokenStates,
    is_token_context_embedding,
    token_context_forward,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return small_model("Qwen4ExpForCausalLM")  # per-layer n-gram embeddings on layer 0


class _States:
    """A cache of one layer's conv states, kept as given (a transformers cache's ``get`` / ``update`` in short)."""

    def __init__(self) -> None:
        self.held: dict[int, torch.Tensor] = {}

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.held.get(state_idx)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **_) -> torch.Tensor:
        self.held[state_idx] = conv_states
        return conv_states


def test_states_hold_id_plus_one_and_read_no_token_as_the_filler() -> None:
    inner = _States()
    seen = TokenStates(inner, filler=7)
    assert seen.get_conv_state(0, 2) is None  # nothing cached: the module fills in itself
    seen.update_conv_state(torch.tensor([[0, 5, 123456]]), 0, state_idx=2)
    assert inner.held[2].dtype == torch.float32 and inner.held[2].tolist() == [[1.0, 6.0, 123457.0]]
    assert seen.get_conv_state(0, 2).tolist() == [[0, 5, 123456]]
    inner.held[2] = torch.zeros(2, 3)  # an empty cache's state, as a runtime gives it
    assert seen.get_conv_state(0, 2).tolist() == [[7, 7, 7], [7, 7, 7]]


def test_embeddings_through_float_states_equal_eager(model) -> None:
    found = [(p, m) for p, m in model.named_modules() if is_token_context_embedding(m)]
    assert [p for p, _ in found] == ["model.layers.0.ple.ple_embedding"]
    path, module = found[0]
    swapped = token_context_forward(module, path)
    gen = torch.Generator().manual_seed(0)
    for steps in ([5, 1, 1], [1, 1, 3], [2, 4]):
        eager, flat = transformers.DynamicCache(config=model.config), transformers.DynamicCache(config=model.config)
        for n in steps:  # a prefill and decode steps, end-of-text tokens among them (the n-grams restart there)
            ids = torch.randint(0, 6, (2, n), generator=gen)
            with torch.no_grad():
                want = module(ids, eager)
                with mock.patch.object(torch, "cummax", side_effect=AssertionError("a scan")):  # none in the swap's
                    got = swapped(ids, flat)
            assert torch.equal(got, want), steps
        state = flat.layers[0].conv_states[2]
        assert state.dtype == torch.float32 and torch.equal(state.long() - 1, eager.layers[0].conv_states[2])


def test_a_vocabulary_past_float32s_whole_numbers_is_refused_by_name(model) -> None:
    module = next(m for m in model.modules() if is_token_context_embedding(m))
    size = module.unigram_vocab_size
    module.unigram_vocab_size = EXACT_IDS
    try:
        with pytest.raises(GraphError, match=r"layers\.0\.ple.*16777215"):
            token_context_forward(module, "model.layers.0.ple.ple_embedding")
    finally:
        module.unigram_vocab_size = size
