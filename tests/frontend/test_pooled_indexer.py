"""Kolibri 1.1's sparse attention indexer made traceable (:mod:`flora_graph.frontend.pooled_indexer`): the masks of
every query at once against transformers' own loops over rows and groups of queries, and a package that decodes
left-padded rows as eager transformers decodes each alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.pooled_indexer import is_pooled_indexer, pooled_indexer_forward  # noqa: E402
from tests.serving.genai_package import assert_padded_rows_decode_as_eager  # noqa: E402
from tests.serving.test_causal_lm_families import small_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return small_model("Kolibri1_1ForCausalLM")  # a pool source and a layer reading its pool; budgets of 6 keys


def test_masks_equal_transformers_loops_with_padding_and_ties(model) -> None:
    indexers = [m for m in model.modules() if is_pooled_indexer(m)]
    assert [m.is_pool_source for m in indexers] == [True, False]
    gen = torch.Generator().manual_seed(0)
    long_rows = 0
    for trial in range(60):
        queries = int(torch.randint(1, 24, (), generator=gen))
        keys = queries + int(torch.randint(0, 16, (), generator=gen))
        q = torch.randn(2, 4, queries, 16, generator=gen)
        k = torch.randn(2, 2, keys, 16, generator=gen)
        if trial % 3 == 0:  # whole numbers: scores that tie, which go to the earlier key
            q, k = q.round(), k.round()
        visible = torch.ones(2, queries, keys, dtype=torch.bool).tril(keys - queries)
        visible[0, :, : int(torch.randint(0, max(1, keys - queries), (), generator=gen))] = False  # left padding
        mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[:, None]
        for m in indexers:
            pool = None if m.is_pool_source else (torch.rand(2, queries, keys, generator=gen) > 0.3) & visible
            want = type(m).forward(m, q, k, mask, pool)
            got = pooled_indexer_forward(m)(q, k, mask, pool)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (trial, m.is_pool_source)
            long_rows += int((want[0] != visible[:, None]).any())  # the rule dropped keys somewhere
    assert long_rows > 30


def test_package_decodes_left_padded_rows_as_eager(model, tmp_path: Path) -> None:
    assert_padded_rows_decode_as_eager(model, tmp_path)
