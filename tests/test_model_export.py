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
from flora_graph.model_export import PARITY_TOLERANCE, ModelSpec, export_model, load_model
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


def test_the_parity_tolerance_scales_with_the_largest_output(tmp_path):
    """Outputs in the hundreds (a depth map in metres) are checked to 1e-4 of their largest value, not 1e-4 absolute;
    outputs under 1 to 1e-4."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight.mul_(400.0)
    x, check = torch.randn(2, 16), torch.randn(3, 16)
    report = export_model(ModelSpec(model, {"input": x}, {"input": {0: "batch"}}, {"input": check}, "big"), tmp_path / "big.onnx")
    with torch.no_grad():
        top = float(model(check).abs().max())
    assert top > 100 and report.tolerance == pytest.approx(PARITY_TOLERANCE * top) and report.ok
    with torch.no_grad():
        model[0].weight.div_(1e4)
        model[0].bias.zero_()
    small = export_model(ModelSpec(model, {"input": x}, {"input": {0: "batch"}}, {"input": check}, "small"), tmp_path / "s.onnx")
    assert small.tolerance == PARITY_TOLERANCE and small.ok


def test_export_cli_and_bad_sources(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "d"), "--backend", "torchscript", "--preset", "fused"]) == 0
    assert "parity: max |torchscript - eager torch|" in capsys.readouterr().out
    with pytest.raises(FloraGraphError, match=r"config\.json"):
        load_model(tmp_path)
    with pytest.raises(FloraGraphError, match="unknown export backend"):
        export_model(None, tmp_path / "x", backend="tflite")


@pytest.mark.slow
def test_a_state_space_hybrid_exports_for_lengths_past_its_scan_chunk(tmp_path):
    """Bamba's Mamba-2 scan pads the sequence to whole chunks of 256: an example shorter than a chunk would fix the
    export to one chunk, so the example spans two; the file matches eager torch at one chunk and at three."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BambaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16,
                                   mamba_d_state=8, attn_layer_indices=[1])
    assert cfg.mamba_chunk_size == 256
    model = transformers.BambaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "bamba")
    export_model(tmp_path / "bamba", tmp_path / "bamba.onnx")
    sess = ort.InferenceSession(str(tmp_path / "bamba.onnx"), providers=["CPUExecutionProvider"])
    for seq in (5, 600):
        ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits.numpy()
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        got = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]  # an all-ones mask: none needed
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
