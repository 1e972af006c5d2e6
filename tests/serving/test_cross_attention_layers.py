"""A text decoder with cross-attention layers it skips without an image (Mllama's): those layers keep no cache, so the
export has keys and values for the self-attention layers alone, and a package decodes left-padded rows as eager
transformers decodes each row alone."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import cache_layout  # noqa: E402
from tests.serving.genai_package import assert_padded_rows_decode_as_eager  # noqa: E402
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

ARCH = "MllamaForCausalLM"


def test_layout_leaves_out_the_cross_attention_layers() -> None:
    layout = cache_layout(small_model(ARCH))  # layer 1 attends to the image
    assert layout.kv_layers == (0, 2) and layout.layers == 3 and layout.uncached_layers() == [1]
    assert layout.past_names() == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.2.key",
                                   "past_key_values.2.value"]


def test_package_decodes_left_padded_rows_as_eager(tmp_path: Path) -> None:
    import onnx

    from flora_graph.serving.genai import UNCACHED_KEY

    report = assert_padded_rows_decode_as_eager(small_model(ARCH), tmp_path)
    assert "layers [1] keep no cache" in report.not_for_genai
    props = {p.key: p.value for p in onnx.load(tmp_path / "pkg" / "model.onnx", load_external_data=False).metadata_props}
    assert props[UNCACHED_KEY] == "[1]"  # the Generator expects keys and values for layers 0 and 2 alone
