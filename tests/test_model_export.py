"""flora-graph export: model (+ PEFT folder) -> optimized artifact, parity against eager."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import peft
import pytest
import torch

from flora_graph.cli import main
from flora_graph.errors import FloraGraphError
from flora_graph.model_export import export_model, load_model
from flora_graph.models.decoder import build_decoder


@pytest.mark.parametrize(("backend", "suffix"), [("onnxruntime", ".onnx"), ("torchscript", ".pt")])
def test_default_model_exports_with_parity(tmp_path, backend, suffix):
    report = export_model(None, tmp_path / "m", backend=backend)
    assert report.path == tmp_path / f"m{suffix}" and report.path.is_file()
    assert report.ok and report.max_abs_diff < 1e-4
    assert set(report.seconds) == {"load", "capture", "optimize", "lower+save"}


def test_peft_folder_on_the_builtin_decoder_matches_eager_peft(tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                          init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(build_decoder()), cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    report = export_model(None, tmp_path / "m.onnx", adapter=tmp_path / "adapter", preset="merged")
    assert report.ok
    ids = load_model(None, lora_rank=None).check_inputs["input_ids"]
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = pm(ids).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_export_cli_and_bad_sources(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "d"), "--backend", "torchscript", "--preset", "fused"]) == 0
    assert "parity: max |torchscript - eager torch|" in capsys.readouterr().out
    with pytest.raises(FloraGraphError, match=r"config\.json"):
        load_model(tmp_path)
    with pytest.raises(FloraGraphError, match="unknown export backend"):
        export_model(None, tmp_path / "x", backend="tflite")
