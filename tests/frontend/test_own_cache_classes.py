"""A causal LM whose cache layers keep state of their own class beyond keys, values and fixed-size states
(DeepSeek-V4's compressors: buffered tokens, counts of compressed entries): its export with the key/value cache is
refused naming the method and the classes; captured without the cache, its compressed attention gives eager's logits
at any length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.errors import GraphError  # noqa: E402
from flora_graph.frontend import capture  # noqa: E402
from flora_graph.frontend.causal_lm import capture_causal_lm  # noqa: E402
from flora_graph.runtimes import compile, run  # noqa: E402
from tests.serving import test_causal_lm_families as families  # noqa: E402

WINDOWS = dict(layer_types=["compressed_sparse_attention", "heavily_compressed_attention"], sliding_window=4,
               compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4})
"""Both kinds of compressed layers, with windows and rates shorter than the test's tokens, so that they compress.
(Without the cache, the sparse layers' indexer keeps ``min(index_topk, entries)`` entries, a size torch.export fixes:
the heavily compressed layers alone are captured below.)"""


@pytest.fixture(scope="module")
def model():
    return _with(WINDOWS)


def _with(overrides: dict):
    """The small DeepSeek-V4 of the families' test with ``overrides`` on its config."""
    saved = families.OVERRIDES.get("DeepseekV4ForCausalLM")
    families.OVERRIDES["DeepseekV4ForCausalLM"] = overrides
    try:
        return families.small_model("DeepseekV4ForCausalLM")
    finally:
        if saved is None:
            del families.OVERRIDES["DeepseekV4ForCausalLM"]
        else:
            families.OVERRIDES["DeepseekV4ForCausalLM"] = saved


def test_the_cache_export_is_refused_naming_the_method_and_its_class(model) -> None:
    with pytest.raises(GraphError, match=r"DeepseekV4ForCausalLM: its forward calls 'store_compression_weights' on "
                                         r"its cache layers, a method of its own cache layer classes "
                                         r"DeepseekV4CSACache, DeepseekV4HCACache, which keep state"):
        capture_causal_lm(model)


@pytest.mark.slow
def test_without_the_cache_its_heavily_compressed_attention_captures_as_eager() -> None:
    model = _with({**WINDOWS, "layer_types": ["heavily_compressed_attention"] * 2})
    assert model.config.compress_rates["heavily_compressed_attention"] == 4
    gen = torch.Generator().manual_seed(0)
    graph = capture(model, (torch.randint(3, 100, (2, 9), generator=gen),), {"input_ids": {0: "batch", 1: "seq"}})
    onnx = compile(graph, "onnxruntime")
    name = graph.inputs[0].name
    for n in (8, 19):  # whole windows, and a part of one (the capture takes 8 tokens and more: graph.dim_min)
        ids = torch.randint(3, 100, (3, n), generator=gen)
        with torch.no_grad():
            want = model(input_ids=ids).logits.numpy()
        for got in (run(graph, {name: ids.numpy()}), onnx(**{name: ids.numpy()})):
            np.testing.assert_allclose(next(iter(got.values())), want, rtol=0, atol=1e-4)
