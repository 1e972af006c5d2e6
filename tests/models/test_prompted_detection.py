"""``flora-graph export`` of heads that find or segment what texts name in images: OWL-ViT's detection takes its queries
for each image (``input_ids`` ``[images*queries, seq]``), CLIPSeg's segmentation and Grounding DINO one text for each
image (``batch``; Grounding DINO and MM Grounding DINO, about 45 s each, run in the slow run), SAM 3 one text prompt
for each image (its main input the image, its texts optional, its decoder's feature sizes read back from a tensor,
:mod:`flora_graph.frontend.feature_sizes`). Each file matches eager PEFT, whose LoRA (nonzero ``B``) sits in the model, at counts other than the export's, a padded text among them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.model_export import export_model, load_model  # noqa: E402

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4)


def _grounding_dino(config: str = "GroundingDinoConfig") -> object:
    swin = transformers.SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=98, out_indices=[2, 3, 4])
    return getattr(transformers, config)(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=4, decoder_ffn_dim=4, num_queries=2, num_labels=3, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=6, use_timm_backbone=False, backbone_config=swin, max_text_len=16,
        text_config=dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
                         max_position_embeddings=16, model_type="bert", vocab_size=1100))  # [CLS] 101, "." 1012


def _sam3() -> object:
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    return transformers.Sam3Config(
        vision_config=dict(backbone_config=dict(small, model_type="sam3_vit_model", num_hidden_layers=2, image_size=112,
                                                patch_size=14, window_size=4, global_attn_indexes=[1],
                                                pretrain_image_size=56),
                           fpn_hidden_size=32, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]),
        text_config=dict(small, model_type="clip_text_model", vocab_size=99, projection_dim=32, num_hidden_layers=2,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        geometry_encoder_config=dict(small, num_layers=1), detr_encoder_config=dict(small, num_layers=1),
        detr_decoder_config=dict(small, num_layers=1, num_queries=8),
        mask_decoder_config=dict(hidden_size=32, num_upsampling_stages=2, num_attention_heads=2))


CASES = {  # model class, its config, LoRA targets, the texts' dim, (images, texts) of the check, the outputs compared
    "owlvit": ("OwlViTForObjectDetection", lambda: transformers.OwlViTConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=32), ["q_proj", "v_proj"], "images*queries", (1, 3),
        ("logits", "pred_boxes")),
    "owlv2": ("Owlv2ForObjectDetection", lambda: transformers.Owlv2Config(
        text_config=TEXT, vision_config=VISION, projection_dim=32), ["q_proj", "v_proj"], "images*queries", (2, 6),
        ("logits", "pred_boxes", "objectness_logits")),
    "clipseg": ("CLIPSegForImageSegmentation", lambda: transformers.CLIPSegConfig(
        text_config=dict(TEXT, max_position_embeddings=64), vision_config=VISION, projection_dim=32, reduce_dim=16,
        extract_layers=[0, 1], conditional_layer=0, decoder_num_attention_heads=2, decoder_intermediate_size=32),
        ["q_proj", "v_proj"], "batch", (4, 4), ("logits",)),
    "grounding-dino": ("GroundingDinoForObjectDetection", _grounding_dino, ["q_proj", "v_proj", "query", "value"],
                       "batch", (1, 1), ("logits", "pred_boxes")),
    "mm-grounding-dino": ("MMGroundingDinoForObjectDetection", lambda: _grounding_dino("MMGroundingDinoConfig"),
                          ["q_proj", "v_proj", "query", "value"], "batch", (2, 2), ("logits", "pred_boxes")),
    "sam3": ("Sam3Model", _sam3, ["q_proj", "v_proj"], "batch", (2, 2), ("pred_logits", "pred_boxes", "pred_masks")),
}
DEFAULT = ("owlvit", "clipseg")
"""The cases of the default run; the others (about 10 s for OWLv2, 25 s for SAM 3, 45 s for each Grounding DINO) run
in the slow run."""


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_a_text_prompted_head_takes_its_texts_laid_out_per_image_and_matches_eager_peft(name: str,
                                                                                      tmp_path: Path) -> None:
    model_cls, config, targets, texts_dim, (images, texts), compared = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config()).eval()
    model.save_pretrained(tmp_path / "base")
    base = getattr(transformers, model_cls)(config()).eval()
    base.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    try:
        model.get_input_embeddings()
    except NotImplementedError:  # Grounding DINO names no input embeddings, which PEFT asks for
        model.get_input_embeddings = torch.nn.Identity
    adapted = peft.get_peft_model(model, lora).eval()
    adapted.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)

    spec = load_model(tmp_path / "base", attention_mask=True)
    assert spec.dynamic_dims["input_ids"][0] == texts_dim
    report = export_model(tmp_path / "base", tmp_path / "m.onnx", adapter=tmp_path / "adapter", attention_mask=True)
    assert report.ok, report.max_abs_diff
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    taken = {i.name: i.shape for i in sess.get_inputs()}
    assert taken["input_ids"] == taken["attention_mask"] == [texts_dim, "seq"]
    assert taken["pixel_values"][0] == ("images" if texts_dim == "images*queries" else "batch")

    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(texts, 6, dtype=torch.int64)
    mask[-1, 4:] = 0  # a shorter text, padded on the right as the tokenizers pad
    size = taken["pixel_values"][2]
    inputs = {"input_ids": torch.randint(0, 99, (texts, 6), generator=gen), "attention_mask": mask,
              "pixel_values": torch.randn(images, 3, size, size, generator=gen)}
    if "grounding" in name:  # "[CLS] a b . c [SEP]": the phrases between the special tokens attend within themselves
        inputs["input_ids"][:, [0, 3, 5]] = torch.tensor([101, 1012, 102])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {n: t.numpy() for n, t in inputs.items()}), strict=True))
    with torch.no_grad():
        want, plain = adapted(**inputs), base(**inputs)
    for key in compared:
        finite = np.isfinite(want[key].numpy())
        np.testing.assert_array_equal(np.isfinite(got[key]), finite, err_msg=key)  # the masked logits' -inf too
        np.testing.assert_allclose(got[key][finite], want[key].numpy()[finite], atol=1e-4, rtol=1e-4, err_msg=key)
    first = want[compared[0]].numpy()
    finite = np.isfinite(first)
    assert np.abs(first[finite] - plain[compared[0]].numpy()[finite]).max() > 1e-4  # the adapter is in the file


def test_sam3_takes_its_text_prompts_beside_its_images_one_each(tmp_path: Path) -> None:
    """SAM 3's main input is the image and its texts are optional (``text_embeds`` may stand for them): asked for the
    texts' mask, or where the image alone does not run, the export takes one text prompt for each image."""
    torch.manual_seed(0)
    transformers.Sam3Model(_sam3()).eval().save_pretrained(tmp_path)
    for mask in (True, False):
        spec = load_model(tmp_path, attention_mask=mask)
        assert spec.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"} and spec.dynamic_dims["pixel_values"][0] == "batch"
        assert ("attention_mask" in spec.example_inputs) == mask
        assert spec.example_inputs["pixel_values"].shape[0] == spec.example_inputs["input_ids"].shape[0]
