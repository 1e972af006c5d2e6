"""Sliding windows count token positions: padding between a row's tokens (GenAI's right-padded batches) is not
inside its window."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import cache_layout, capture_causal_lm, past_names  # noqa: E402
from flora_graph.frontend.sliding_window import windows_by_position  # noqa: E402
from flora_graph.ir import Op  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _model(arch: str):
    torch.manual_seed(0)
    cfg = {"MistralForCausalLM": lambda: transformers.MistralConfig(**COMMON, sliding_window=3),
           "Gemma3ForCausalLM": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=3)}[arch]()
    return getattr(transformers, arch)(cfg).eval()


@pytest.mark.parametrize("arch", ["MistralForCausalLM", pytest.param("Gemma3ForCausalLM", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_a_token_after_padding_sees_the_window_of_its_row(arch: str, backend: str) -> None:
    """A prompt of 3 tokens right-padded by 2 slots, then one token decoded after the padding: its logits are
    those of the 4 tokens alone (a window of 3 reaches back to the second prompt token, not into the padding)."""
    model = _model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(model)
    layout = cache_layout(model)
    exe = compile(graph, backend)
    prompt, token = [5, 9, 33], 70
    empty = {n: np.zeros((1, layout.kv_heads, 0, layout.head_dim), np.float32) for n in past_names(layout.layers)}

    def feed(ids: list[int], mask: list[int], positions: list[int], past: dict) -> dict:
        f = {"input_ids": np.array([ids]), "attention_mask": np.array([mask]), **past}
        if layout.takes_position_ids:
            f["position_ids"] = np.array([positions])
        return f

    first = exe(feed([*prompt, 0, 0], [1, 1, 1, 0, 0], [0, 1, 2, 1, 1], empty))
    past = {p: first[p.replace("past_key_values", "present")] for p in empty}
    got = exe(feed([token], [1, 1, 1, 0, 0, 1], [3], past))["logits"][0, -1]
    with torch.no_grad():
        want = model(torch.tensor([[*prompt, token]])).logits[0, -1].numpy()
        assert not np.allclose(model(torch.tensor([[token]])).logits[0, -1].numpy(), want, atol=1e-3)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_each_band_is_rewritten_once_and_a_model_without_windows_is_left_alone() -> None:
    model = _model("MistralForCausalLM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(model)  # rewritten during capture
        llama = capture_causal_lm(transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval())
    bands = [n for n in graph.nodes if n.op is Op.GREATER]
    assert bands and all(n.name.endswith(".by_position") for n in bands)
    assert any(n.op is Op.CUMSUM for n in graph.nodes)
    assert windows_by_position(graph) == 0  # nothing left to rewrite
    assert windows_by_position(llama) == 0 and not any(n.op is Op.CUMSUM for n in llama.nodes)
