"""Qwen4-Exp's QSA token indexer made traceable (:mod:`flora_graph.frontend.qsa_indexer`): the mask of every query at
once against transformers' own loops over rows and queries, from a cache of past indexer keys and from none, and a
package that decodes left-padded rows as eager transformers decodes each alone (its cache layout rebuilding the
indexer's past positions from the attention mask), with PEFT adapters on its attention, its delta-rule layer and its
indexer, rows of different adapters in one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import cache_layout, positions_from_mask  # noqa: E402
from flora_graph.frontend.qsa_indexer import is_qsa_indexer, qsa_indexer_forward  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_mixed_rows_decode_as_eager_peft,
    assert_padded_rows_decode_as_eager,
    export_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return small_model("Qwen4ExpForCausalLM")  # an indexed layer keeping 2 blocks of 2 keys, 16 indexer heads


def _cache(model, layer: int, past: torch.Tensor):
    """A cache whose indexed ``layer`` holds the indexer keys ``past`` (``[batch, keys, dim]``)."""
    cache = transformers.DynamicCache(config=model.config)
    if past.shape[1]:
        cache.update_indexer(past, layer)
    return cache


def test_masks_equal_transformers_loops_with_padding(model) -> None:
    indexers = [m for m in model.modules() if is_qsa_indexer(m)]
    assert len(indexers) == 1 and not any(is_qsa_indexer(m) for m in model.modules() if m not in indexers)
    m = indexers[0]
    rotary = model.model.rotary_emb
    gen = torch.Generator().manual_seed(0)
    dropped = 0
    for trial in range(40):
        queries = int(torch.randint(1, 12, (), generator=gen))
        keys = queries + int(torch.randint(0, 14, (), generator=gen))
        pad = int(torch.randint(0, keys - queries + 1, (), generator=gen))  # row 0's left padding
        mask2d = torch.ones(2, keys, dtype=torch.long)
        mask2d[0, :pad] = 0
        visible = torch.ones(2, queries, keys, dtype=torch.bool).tril(keys - queries) & mask2d[:, None].bool()
        mask = visible[:, None] if trial % 2 else torch.where(visible, 0.0, torch.finfo(torch.float32).min)[:, None]
        hidden = torch.randn(2, queries, model.config.hidden_size, generator=gen)
        past = torch.randn(2, keys - queries, m.index_head_dim, generator=gen)
        positions = positions_from_mask(mask2d)[None].expand(3, -1, -1)
        cos_sin = rotary(hidden, positions)
        with torch.no_grad():
            want = type(m).forward(m, hidden, cos_sin, mask, _cache(model, m.layer_idx, past))
            got = qsa_indexer_forward(m)(hidden, cos_sin, mask, _cache(model, m.layer_idx, past))
        assert "_select_tokens" not in vars(m)  # the loops' replacement lasts for the call alone
        assert torch.equal(got, want), trial
        dropped += int((want[:, 0] != visible).any())  # the indexer left out visible keys somewhere
    assert dropped > 20


def test_layout_rebuilds_the_indexer_positions(model) -> None:
    layout = cache_layout(model)
    assert layout.indexer_positions == ((1, 3),)  # the indexed layer keeps [3, batch, seq] positions
    assert layout.indexed == ((1, 16),)


def test_package_decodes_left_padded_rows_as_eager(model, tmp_path: Path) -> None:
    assert_padded_rows_decode_as_eager(model, tmp_path)


def test_package_with_adapters_decodes_padded_and_mixed_rows_as_eager_peft(model, tmp_path: Path) -> None:
    adapted = small_adapters(model, tmp_path, {"attn": ["q_proj", "v_proj", "o_proj", "in_proj_qkv", "out_proj"],
                                                  "index": ["index_qk_proj", "k_proj", "in_proj_z"]})  # the indexer's projection too
    export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "attn", "index")
