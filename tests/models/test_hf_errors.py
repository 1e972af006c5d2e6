"""Real Hugging Face models: T5 (in-place ops, made functional at capture), and broken PEFT folders for a Llama."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from flora_graph.adapters import adapters_of
from flora_graph.adapters.peft import load_peft_adapter
from flora_graph.errors import AdapterError
from flora_graph.frontend import capture
from flora_graph.model_export import export_model
from flora_graph.runtimes.reference import run
from tests.models.test_hf_peft_parity import VOCAB, llama_model, peft_model
from tests.peft_folders import edit_peft_folder


def test_t5_encoder_with_in_place_adds_captures_and_matches_eager() -> None:
    """T5's relative-position buckets use an in-place ``add_``: capture functionalizes it and converts."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = transformers.T5EncoderModel(cfg).eval()
    g = capture(model, {"input_ids": torch.randint(0, VOCAB, (2, 8))}, {"input_ids": {0: "batch", 1: "seq"}})
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    got = next(iter(run(g, {"input_ids": ids.numpy()}).values()))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A plain random Llama and a PEFT folder for it (q/k/v/down, k of rank 2, nonzero B)."""
    pm = peft_model("llama")
    root = tmp_path_factory.mktemp("llama_adapter")
    pm.save_pretrained(root / "adapter")
    plain = llama_model()
    plain.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                           for k, v in pm.state_dict().items() if "lora_" not in k})
    return plain.eval(), root / "adapter"


def _broken_copy(src: Path, dst: Path, **edit: object) -> Path:
    """A copy of the PEFT folder ``src`` at ``dst``, edited by :func:`edit_peft_folder`."""
    dst.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(src / name, dst / name)
    return edit_peft_folder(dst, **edit)  # type: ignore[arg-type]


LAYER = r"base_model\.model\.model\.layers\.1\."


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"drop": "layers.1.self_attn.v_proj.lora_B"}, rf"missing key {LAYER}self_attn\.v_proj\.lora_B\.weight"),
        ({"reshape": "layers.1.mlp.up_proj.lora_A"}, rf"key {LAYER}mlp\.up_proj\.lora_A\.weight has shape \(4, 31\)"),
        ({"config": {"rank_pattern": {"k_proj": 3, "down_proj": 3, "model.layers.1.self_attn.q_proj": 6}}},
         r"key base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight has shape \(2, 32\).* r=3"),
    ],
    ids=["missing-key", "wrong-shape", "mismatched-r"],
)
def test_broken_llama_adapter_folders_name_the_key(llama_adapter, tmp_path, edit, match) -> None:
    plain, folder = llama_adapter
    broken = _broken_copy(folder, tmp_path / "broken", **edit)
    model = copy.deepcopy(plain)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=match):
        load_peft_adapter(model, broken)
    assert not adapters_of(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_of_a_hf_folder_with_a_broken_adapter_fails_before_writing(llama_adapter, tmp_path) -> None:
    plain, folder = llama_adapter
    plain.save_pretrained(tmp_path / "model")
    broken = _broken_copy(folder, tmp_path / "broken", drop="layers.0.mlp.gate_proj.lora_A")
    with pytest.raises(AdapterError, match=r"missing key base_model\.model\.model\.layers\.0\.mlp\.gate_proj\.lora_A\.weight"):
        export_model(tmp_path / "model", tmp_path / "out", adapter=broken)
    assert not (tmp_path / "out.onnx").exists()
