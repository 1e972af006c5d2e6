"""Adapters on the output layer (``lm_head``), beside which PEFT saves the layer's whole weight
(``save_embedding_layers="auto"``): the package swaps the adapter and keeps the base weight, which the file holds
unchanged; a file whose saved weight differs (a fine-tune that changed it) is refused by name, since a swappable
adapter leaves the base model as it is. References: eager PEFT, row by row."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.errors import AdapterError  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.peft_folders import edit_peft_folder  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_mixed_rows_decode_as_eager_peft,
    export_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402


def test_package_with_an_output_layer_adapter_decodes_as_eager_peft(tmp_path: Path) -> None:
    model = small_model("LlamaForCausalLM")
    adapted = small_adapters(model, tmp_path, {"head": ["q_proj", "lm_head"], "attn": ["v_proj", "o_proj"]})
    export_small(model, tmp_path, {n: tmp_path / n for n in adapted})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "head", "attn")


def test_an_adapter_whose_saved_output_layer_differs_is_refused_by_name(tmp_path: Path) -> None:
    model = small_model("LlamaForCausalLM")
    small_adapters(model, tmp_path, {"head": ["q_proj", "lm_head"]})
    edit_peft_folder(tmp_path / "head", shift="lm_head.base_layer")
    with pytest.raises(AdapterError, match=r"lm_head\.weight replaces the base model's weight.*--merge-adapter"):
        export_small(model, tmp_path, {"head": tmp_path / "head"})
    assert not (tmp_path / "pkg").exists()
