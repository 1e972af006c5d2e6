"""ONNX Runtime GenAI packages from a model folder and PEFT folders: GenAI generates eager PEFT's greedy tokens."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")

from flora_graph.cli import main  # noqa: E402
from flora_graph.errors import AdapterError, FloraGraphError  # noqa: E402
from flora_graph.serving import read_adapter  # noqa: E402
from flora_graph.serving.genai import GENAI_CONFIG, export_genai  # noqa: E402

PROMPT = [1, 5, 9, 33, 70, 12]
NEW = 32
ADAPTERS = {
    "all7": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]),
    "qdown": dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]),  # a subset, another rank
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder and two PEFT adapter folders with nonzero ``B``."""
    root = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    for name, spec in ADAPTERS.items():
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"), peft.LoraConfig(**spec))
        for mod in model.modules():
            if hasattr(mod, "lora_B"):
                for k in mod.lora_B:
                    torch.nn.init.normal_(mod.lora_B[k].weight, std=0.2)
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def package(folders: Path) -> Path:
    out = folders / "pkg"
    args = ["export", str(folders / "base"), "--task", "text-generation-with-past", "--format", "genai",
            "--out", str(out), *(a for n in ADAPTERS for a in ("--adapter", f"{n}={folders / n}"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    return out


def _eager(folders: Path, adapter: str | None) -> list[int]:
    base = transformers.LlamaForCausalLM.from_pretrained(folders / "base").eval()
    model = peft.PeftModel.from_pretrained(base, folders / adapter).eval() if adapter else base
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def _genai(package: Path, adapter: str | None) -> list[int]:
    model = og.Model(str(package))
    adapters = og.Adapters(model)
    for name in ADAPTERS:
        adapters.load(str(package / "adapters" / f"{name}.onnx_adapter"), name)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    if adapter:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(PROMPT)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(PROMPT):]


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_genai_generates_eager_peft_greedy_tokens(folders: Path, package: Path, adapter: str | None) -> None:
    want = _eager(folders, adapter)
    assert len(want) == NEW
    assert _genai(package, adapter) == want


def test_package_layout_and_adapter_checksums(package: Path) -> None:
    doc = json.loads((package / GENAI_CONFIG).read_text())
    dec = doc["model"]["decoder"]
    assert doc["model"]["type"] == "llama" and dec["num_hidden_layers"] == 2 and dec["num_key_value_heads"] == 2
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["logits"] == "logits"
    assert (package / dec["filename"]).is_file()
    for name, spec in ADAPTERS.items():
        params = read_adapter(package / "adapters" / f"{name}.onnx_adapter", require_checksum=True).params
        ranks = {v.shape[0] for k, v in params.items() if k.endswith(".lora_A")}
        assert ranks == {spec["r"]}
        assert len(params) == 2 * 2 * len(spec["target_modules"])  # A and B per module per layer
    assert not [p for p in package.parent.iterdir() if p.name.startswith(".pkg")]  # no staging leftovers


def test_adapters_that_cannot_be_swapped_are_refused_before_anything_is_written(folders: Path, tmp_path: Path) -> None:
    import shutil

    from tests.peft_folders import edit_peft_folder

    saved = edit_peft_folder(shutil.copytree(folders / "qdown", tmp_path / "saved"), config={"modules_to_save": ["lm_head"]})
    with pytest.raises(AdapterError, match="modules_to_save"):
        export_genai(folders / "base", tmp_path / "out", {"saved": saved})
    with pytest.raises(AdapterError, match="adapter name"):
        export_genai(folders / "base", tmp_path / "out", {"../x": folders / "qdown"})
    assert not (tmp_path / "out").exists()


def test_model_class_without_a_genai_type_is_refused(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(FloraGraphError, match="no model type for BertForMaskedLM"):
        export_genai(tmp_path / "bert", tmp_path / "out")
