"""``flora-graph export`` of token models that read inputs beside their ids (``flora_graph.frontend.token_extras``):
document models' word boxes (and LayoutLMv3's page image), MarkupLM's XPaths, TAPAS' cell coordinates, LXMERT's regions. Each tiny model carries a
PEFT LoRA with a nonzero ``B``; its file takes those inputs by their transformers names, with the batch (and the
sequence, or LXMERT's region count) dynamic, matches eager PEFT on inputs of another shape, and its outputs move with
the extra input (a file that dropped it would not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.errors import ModelFolderError  # noqa: E402
from flora_graph.frontend import token_extras as extras_module  # noqa: E402
from flora_graph.model_export import export_model, load_model  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
"""Tiny sizes; weights drawn wider than the checkpoints' 0.02, so that every input moves the outputs well past the
check's tolerance."""

CASES = {
    "layoutlm": ("LayoutLMConfig", "LayoutLMForTokenClassification", dict(SMALL), "bbox"),
    "lxmert": ("LxmertConfig", "LxmertForQuestionAnswering",
               dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                    x_layers=1, r_layers=1, visual_feat_dim=16, visual_pos_dim=4, num_qa_labels=3,
                    max_position_embeddings=64, pad_token_id=0, initializer_range=0.2), "visual_feats"),
    "markuplm": ("MarkupLMConfig", "MarkupLMForSequenceClassification", dict(SMALL, max_depth=4), "xpath_tags_seq"),
    "tapas": ("TapasConfig", "TapasForSequenceClassification", dict(SMALL), "token_type_ids"),
    "bros": ("BrosConfig", "BrosForTokenClassification", dict(SMALL, hidden_size=64, num_attention_heads=4), "bbox"),
    "lilt": ("LiltConfig", "LiltForSequenceClassification", dict(SMALL, hidden_size=24, channel_shrink_ratio=4),
             "bbox"),
    "layoutlmv3": ("LayoutLMv3Config", "LayoutLMv3ForTokenClassification",
                   dict(SMALL, coordinate_size=5, shape_size=6, input_size=32, patch_size=16), "pixel_values"),
}
DEFAULT = ("layoutlm", "lxmert")  # word boxes beside the tokens; regions of a dim of their own


def _folders(name: str, root: Path) -> tuple[Path, Path, torch.nn.Module]:
    config_cls, model_cls, cfg, _ = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=3, **cfg)).eval()
    model.save_pretrained(root / "base")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    adapted = peft.get_peft_model(model, lora).eval()
    adapted.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", adapted


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_the_file_takes_the_inputs_beside_the_ids_and_matches_eager_peft(name: str, tmp_path: Path) -> None:
    base, adapter, adapted = _folders(name, tmp_path)
    report = export_model(base, tmp_path / "m.onnx", adapter=adapter, attention_mask=True)
    assert report.ok, report.max_abs_diff
    extra = CASES[name][3]
    spec = load_model(base, attention_mask=True)
    assert extra in spec.example_inputs and spec.check_inputs[extra].shape[0] == 3
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    taken = {i.name: i.shape for i in sess.get_inputs()}
    assert extra in taken and taken[extra][0] == "batch"
    assert taken[extra][1] == {"visual_feats": "boxes", "pixel_values": 3}.get(extra, "seq")

    def both(inputs: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        got = sess.run(None, {n: inputs[n].numpy() for n in taken})[0]
        with torch.no_grad():
            want = adapted(**inputs)[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        return got, want

    got, _ = both(spec.check_inputs)
    moved = dict(spec.check_inputs)
    moved[extra] = extras_module.token_extras(adapted.get_base_model(), *spec.check_inputs["input_ids"].shape,
                                              seed=7)[0][extra]
    if extra == "visual_feats":
        moved["visual_pos"] = extras_module.token_extras(adapted.get_base_model(), 3, 1, seed=7)[0]["visual_pos"]
    other, _ = both(moved)
    assert np.abs(other - got).max() > 1e-2 * np.abs(got).max()  # the extra input reaches the outputs


def test_boxes_are_ordered_corners_within_the_models_table(tmp_path: Path) -> None:
    _, _, adapted = _folders("layoutlm", tmp_path)
    inputs, dims = extras_module.token_extras(adapted.get_base_model(), 4, 9, seed=0)
    box = inputs["bbox"]
    assert box.dtype == torch.int64 and box.shape == (4, 9, 4) and dims["bbox"] == {0: "batch", 1: "seq"}
    assert (box[..., 0] <= box[..., 2]).all() and (box[..., 1] <= box[..., 3]).all()
    assert 0 <= int(box.min()) and int(box.max()) <= 1000
    bros = extras_module.token_extras(_folders("bros", tmp_path / "b")[2].get_base_model(), 2, 5, seed=0)[0]["bbox"]
    assert bros.is_floating_point() and 0 <= float(bros.min()) and float(bros.max()) <= 1  # fractions of the page


def test_a_model_that_does_not_run_on_the_built_inputs_names_itself(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, _ = _folders("lxmert", tmp_path)
    monkeypatch.setattr("flora_graph.model_export.token_extras", lambda *a, **k: ({}, {}))
    with pytest.raises(ModelFolderError, match=r"LxmertForQuestionAnswering does not run on the inputs .*input_ids.*"
                                               r"visual_feats"):
        load_model(base)
