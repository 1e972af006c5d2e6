"""DeepSeek Sparse Attention (DeepSeek-V3.2's): the indexer's top-k keys for any number of keys, and its key cache.

The indexer keeps the best ``index_topk`` keys of each query, ``min(index_topk, keys)`` of them, which torch.export
would fix from the example's length; while capturing it sorts every key and keeps the first ``index_topk`` instead
(:func:`~flora_graph.frontend.traceable.traceable_modules`). Its keys are cached beside the keys and values as
``past_key_values.{i}.indexer_key``. References: eager transformers (with PEFT for an adapter), unpadded, row by row.
"""

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

ARCH = "DeepseekV32ForCausalLM"


@pytest.fixture(scope="module")
def model():
    """The family test's small DeepSeek-V3.2, its padding token's embedding made nonzero: a zero embedding (transformers
    zeroes ``padding_idx``'s) scores every key 0 in the indexer, a tie that each runtime breaks its own way."""
    model = small_model(ARCH)
    with torch.no_grad():
        model.model.embed_tokens.weight[model.config.pad_token_id].normal_(0, 0.5)
    return model


@pytest.mark.parametrize("length", [3, 4, 11])
def test_indexer_swap_keeps_eager_outputs_below_and_above_top_k(model, length: int) -> None:
    ids = torch.arange(3, 3 + 2 * length).reshape(2, length)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        with traceable_modules(model) as swapped:
            got = model(input_ids=ids, use_cache=False).logits
    assert swapped == [f"model.layers.{i}.self_attn.indexer" for i in range(model.config.num_hidden_layers)]
    assert model.config.index_topk == 4 and "forward" not in vars(model.model.layers[0].self_attn.indexer)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_indexer_swap_returns_top_k_indices_for_fewer_keys(model) -> None:
    indexer = model.model.layers[0].self_attn.indexer
    seen = []
    hook = indexer.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad(), traceable_modules(model):
            model(input_ids=torch.tensor([[3, 4]]), use_cache=False)
    finally:
        hook.remove()
    # two keys: the best key repeated past them, every index a real key's
    assert seen[0].shape == (1, 2, 4) and int(seen[0].max()) <= 1


def test_layout_names_the_indexer_keys(model) -> None:
    layout = cache_layout(model)
    head = model.config.index_head_dim
    assert layout.indexed == ((0, head), (1, head))
    assert layout.past_names()[:3] == ["past_key_values.0.key", "past_key_values.0.value",
                                       "past_key_values.0.indexer_key"]
    assert layout.present_names()[5] == "present.1.indexer_key"
    assert layout.growing_shape(1, "indexer_key", 7) == (1, 7, head)


def test_package_with_adapters_decodes_padded_and_mixed_rows_as_eager_peft(model, tmp_path: Path) -> None:
    adapted = small_adapters(model, tmp_path, {"attn": ["q_b_proj", "kv_b_proj", "o_proj"],
                                                  "index": ["wq_b", "wk", "o_proj"]})  # the indexer's own
    report = export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert "indexer" in report.not_for_genai
    gen = Generator(tmp_path / "pkg")
    import onnxruntime as ort

    inputs = {i.name: i.shape for i in ort.InferenceSession(str(tmp_path / "pkg" / "model.onnx"),
                                                            providers=["CPUExecutionProvider"]).get_inputs()}
    assert inputs["past_key_values.1.indexer_key"][1:] == [1, "past_seq", model.config.index_head_dim]
    base = assert_mixed_rows_decode_as_eager_peft(gen, model, adapted, "attn", "index")
    np.testing.assert_array_equal(gen.generate([PADDED_PROMPTS[1]], max_new_tokens=8, min_new_tokens=8)[0], base[1])
