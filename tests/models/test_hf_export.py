"""``export_model`` on Hugging Face folders (``save_pretrained`` of tiny random models) + PEFT adapter folders.

The artifact is checked twice: by ``export_model`` itself (``report.max_abs_diff``) and here,
loaded without flora_graph (``onnxruntime.InferenceSession`` / ``torch.jit.load``) and run
against eager PEFT (``PeftModel.from_pretrained`` over the same folders).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import peft
import pytest
import torch
import transformers

from flora_graph.cli import main
from flora_graph.model_export import export_model, load_model
from tests.models.test_hf_peft_parity import MAX_POS, TOL, bert_model, gpt2_model, llama_model, peft_model


def save_folders(family: str, root: Path) -> tuple[Path, Path]:
    """``root/model`` (the random base model) and ``root/adapter`` (its PEFT LoRA, nonzero B, mixed ranks)."""
    pm = peft_model(family)
    pm.save_pretrained(root / "adapter")
    base = {"llama": llama_model, "gpt2": gpt2_model, "bert": bert_model}[family]()
    base.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                          for k, v in pm.state_dict().items() if "lora_" not in k})
    base.save_pretrained(root / "model")
    return root / "model", root / "adapter"


def eager_peft(model_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    """PEFT's own model over the saved folders: the reference the artifact must match."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    base = getattr(transformers, config.architectures[0]).from_pretrained(model_dir)
    base.config.use_cache = False
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def run_artifact(path: Path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    """The artifact's first output, run without flora_graph."""
    if path.suffix == ".onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(*feeds.values())[0].numpy()


def cli_export_matches_eager(model_dir: Path, adapter_dir: Path, preset: str, out: Path) -> tuple[np.ndarray, set[str]]:
    """``flora-graph export MODEL --adapter ADAPTER --preset PRESET --out OUT`` exits 0 and its ONNX file gives eager
    PEFT's logits (within ``TOL``) at the model's check inputs; ``(those logits, the file's initializer names)``."""
    assert main(["export", str(model_dir), "--adapter", str(adapter_dir), "--preset", preset, "--out", str(out)]) == 0
    x = load_model(model_dir).check_inputs
    with torch.no_grad():
        want = eager_peft(model_dir, adapter_dir)(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(out.with_suffix(".onnx"), x), want, atol=TOL, rtol=TOL)
    return want, {i.name for i in onnx.load(str(out.with_suffix(".onnx"))).graph.initializer}


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_folders("llama", tmp_path_factory.mktemp("llama"))


def test_llama_folder_with_peft_adapter_exports_with_parity(llama_folders, tmp_path) -> None:
    model_dir, adapter_dir = llama_folders
    report = export_model(model_dir, tmp_path / "llama", adapter=adapter_dir, backend="torchscript", preset="fused")
    assert report.ok and report.max_abs_diff < TOL, report
    spec = load_model(model_dir)
    assert spec.dim_max == {"seq": MAX_POS} and not spec.model.config.use_cache
    x = spec.check_inputs
    with torch.no_grad():
        want = eager_peft(model_dir, adapter_dir)(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(report.path, x), want, atol=TOL, rtol=TOL)


def test_export_cli_on_a_hf_folder_prints_parity(llama_folders, tmp_path, capsys) -> None:
    """``flora-graph export <folder> --adapter <peft folder>``: ONNX Runtime, merged (the defaults)."""
    model_dir, adapter_dir = llama_folders
    out = tmp_path / "cli"
    assert main(["export", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity: max |onnxruntime - eager torch|" in text and "ok" in text
    x = load_model(model_dir).check_inputs
    with torch.no_grad():
        want = eager_peft(model_dir, adapter_dir)(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(out.with_suffix(".onnx"), x), want, atol=TOL, rtol=TOL)


def test_gpt2_folder_with_fan_in_fan_out_adapter(tmp_path) -> None:
    model_dir, adapter_dir = save_folders("gpt2", tmp_path)
    report = export_model(model_dir, tmp_path / "gpt2", adapter=adapter_dir, backend="onnxruntime", preset="fused")
    assert report.ok, report
    x = load_model(model_dir).check_inputs
    with torch.no_grad():
        want = eager_peft(model_dir, adapter_dir)(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(report.path, x), want, atol=TOL, rtol=TOL)


def test_bert_folder_with_attention_mask_on_torch_export(tmp_path) -> None:
    model_dir, adapter_dir = save_folders("bert", tmp_path)
    spec = load_model(model_dir, attention_mask=True)
    assert list(spec.example_inputs) == ["input_ids", "attention_mask", "token_type_ids"]  # BERT has segments
    assert spec.dim_max == {"seq": MAX_POS}
    assert (spec.check_inputs["attention_mask"] == 0).any()  # the check exercises padding
    report = export_model(spec, tmp_path / "bert", adapter=adapter_dir, backend="torch-export", preset="merged")
    assert report.ok and report.path.suffix == ".pt2", report
    with torch.no_grad():
        want = eager_peft(model_dir, adapter_dir)(**spec.check_inputs).last_hidden_state.numpy()
    got = torch.export.load(str(report.path)).module()(*spec.check_inputs.values())[0].numpy()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    plain = load_model(model_dir)  # input_ids only by default
    assert list(plain.example_inputs) == ["input_ids"]


def test_bert_encoder_takes_mask_and_segments_and_names_outputs_as_transformers(tmp_path) -> None:
    model_dir, adapter_dir = save_folders("bert", tmp_path)
    out = tmp_path / "bert_cli"
    assert main(["export", str(model_dir), "--adapter", str(adapter_dir), "--attention-mask", "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    spec = load_model(model_dir, attention_mask=True)
    x = spec.check_inputs
    assert (x["token_type_ids"] == 1).any() and (x["attention_mask"] == 0).any()
    with torch.no_grad():
        want = eager_peft(model_dir, adapter_dir)(**x)
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})
    np.testing.assert_allclose(got[0], want.last_hidden_state.numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got[1], want.pooler_output.numpy(), atol=TOL, rtol=TOL)


def test_llama_logits_keep_their_name(llama_folders, tmp_path) -> None:
    model_dir, adapter_dir = llama_folders
    report = export_model(model_dir, tmp_path / "named", adapter=adapter_dir)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits"]
