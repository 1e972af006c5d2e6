"""``flora-graph export`` of contrastive text-and-image models (CLIP, SigLIP, ...): the file takes the texts' tokens
and the images, each count a dim of its own (``batch`` and ``images``), scores every text against every image
(``logits_per_image`` ``[images, batch]``) and matches eager PEFT, whose LoRA (nonzero ``B``) sits in both towers, at
counts other than the export's.
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

TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(TOWER, vocab_size=99, max_position_embeddings=64)
VISION = dict(TOWER, image_size=32, patch_size=8)

CASES = {
    "clip": ("CLIPConfig", "CLIPModel", dict(text_config=TEXT, vision_config=VISION, projection_dim=16)),
    "siglip": ("SiglipConfig", "SiglipModel", dict(text_config=TEXT, vision_config=VISION)),
}
DEFAULT = ("clip",)


def _folders(name: str, root: Path) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    config_cls, model_cls, cfg = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    model.save_pretrained(root / "base")
    base = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    base.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = peft.get_peft_model(model, lora).eval()
    adapted.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", adapted, base


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_texts_and_images_are_counted_apart_and_every_output_matches_eager_peft(name: str, tmp_path: Path) -> None:
    base_dir, adapter, adapted, base = _folders(name, tmp_path)
    spec = load_model(base_dir)
    assert spec.dynamic_dims["pixel_values"] == {0: "images"}
    assert spec.example_inputs["pixel_values"].shape[0] != spec.example_inputs["input_ids"].shape[0]
    report = export_model(base_dir, tmp_path / "m.onnx", adapter=adapter, attention_mask=True)
    assert report.ok, report.max_abs_diff
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    taken = {i.name: i.shape for i in sess.get_inputs()}
    assert taken["input_ids"] == taken["attention_mask"] == ["batch", "seq"]
    assert taken["pixel_values"] == ["images", 3, 32, 32]
    shapes = {o.name: o.shape for o in sess.get_outputs()}
    assert shapes["logits_per_image"] == ["images", "batch"] and shapes["logits_per_text"] == ["batch", "images"]

    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(4, 7, dtype=torch.int64)
    mask[1, 5:] = 0  # a shorter text, padded on the right as the tokenizers pad
    inputs = {"input_ids": torch.randint(0, 99, (4, 7), generator=gen), "attention_mask": mask,
              "pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}  # 4 texts, 1 image: neither the export's
    got = dict(zip(shapes, sess.run(None, {n: t.numpy() for n, t in inputs.items()}), strict=True))
    with torch.no_grad():
        want = adapted(**inputs)
        plain = base(**inputs)
    for key in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        np.testing.assert_allclose(got[key], want[key].numpy(), atol=1e-5, rtol=1e-4, err_msg=key)
    assert got["logits_per_image"].shape == (1, 4)
    for key in ("text_embeds", "image_embeds"):  # the adapter reaches both towers
        assert np.abs(got[key] - plain[key].numpy()).max() > 1e-3, key
    other = sess.run(["logits_per_image"], {**{n: t.numpy() for n, t in inputs.items()},
                                            "pixel_values": -inputs["pixel_values"].numpy()})[0]
    assert np.abs(other - got["logits_per_image"]).max() > 1e-3  # the images reach the scores


def test_the_images_are_counted_apart_from_the_texts_at_every_batch(tmp_path: Path) -> None:
    adapted = _folders("clip", tmp_path)[2].get_base_model()
    for texts, images in ((2, 3), (3, 2), (5, 3)):
        extras, dims = extras_module.token_extras(adapted, texts, 6, seed=0)
        assert extras["pixel_values"].shape == (images, 3, 32, 32) and dims["pixel_values"] == {0: "images"}


def test_a_contrastive_model_without_its_images_is_a_typed_error_naming_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir = _folders("clip", tmp_path)[0]
    monkeypatch.setattr(extras_module, "_paired_signals", lambda *a, **k: {})
    with pytest.raises(ModelFolderError, match=r"CLIPModel does not run on the inputs flora-graph export builds for "
                                               r"it \(input_ids \[2, 8\]\)"):
        load_model(base_dir)


PAIRED = {  # (config, model, its config's fields, LoRA targets, the signal input, its count's dim, the scores)
    "xclip": ("XCLIPConfig", "XCLIPModel", dict(
        text_config=TEXT, projection_dim=32, prompt_layers=1, prompt_attention_heads=2,
        vision_config=dict(VISION, num_frames=4, mit_hidden_size=32, mit_intermediate_size=48, mit_num_hidden_layers=1,
                           mit_num_attention_heads=2)), ["q_proj", "v_proj"], "pixel_values", "videos", "logits_per_video"),
    "videoprism": ("VideoPrismConfig", "VideoPrismClipModel", dict(
        text_config=TEXT, vision_config=dict(TOWER, image_size=32, num_frames=4, tubelet_size=[1, 8, 8],
                                             num_spatial_layers=2, num_temporal_layers=2, num_auxiliary_layers=1)),
        ["q_proj", "v_proj"], "pixel_values_videos", "videos", "logits_per_video"),
    "blip2-retrieval": ("Blip2Config", "Blip2ForImageTextRetrieval", dict(
        vision_config=VISION, num_query_tokens=4, image_text_hidden_size=16,
        qformer_config=dict(TEXT, encoder_hidden_size=32, use_qformer_text_input=True),
        text_config=dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64)),
        ["query", "value", "qkv"], "pixel_values", "images", "logits_per_image"),
    "pe-audio": ("PeAudioConfig", "PeAudioModel", dict(
        text_config=dict(TEXT, model_type="modernbert", num_attention_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, cls_token_id=1, sep_token_id=2),
        audio_config=dict(TOWER, num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          dac_config=dict(encoder_hidden_size=16, downsampling_ratios=[2, 4, 4], decoder_hidden_size=16,
                                          n_codebooks=6, codebook_size=512, codebook_dim=32))),
        ["q_proj", "v_proj", "Wqkv"], "input_values", "audio", "logits_audio_text"),
    "clap": ("ClapConfig", "ClapModel", dict(
        text_config=dict(TEXT, pad_token_id=1), projection_dim=32,
        audio_config=dict(spec_size=64, num_mel_bins=16, window_size=4, patch_size=2, patch_stride=2, hidden_size=32,
                          patch_embeds_hidden_size=16, projection_dim=32, depths=[2, 2], num_attention_heads=[2, 2],
                          intermediate_size=48)),
        ["query", "value"], "input_features", "audio", "logits_per_audio"),
}
"""Models whose signal is videos (X-CLIP's ``pixel_values``, VideoPrism's ``pixel_values_videos``) or audio (PE-Audio's
``input_values`` ``[audio, 1, samples]``, its DAC front end reading one channel; CLAP's spectrograms ``[audio, 1, frames,
mel bins]``), or whose main input is the signal and
which require texts too (VideoPrism's CLIP, BLIP-2's image-text retrieval)."""


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("pe-audio", "clap") else n for n in PAIRED])
def test_videos_and_signal_led_models_take_texts_and_signals_counted_apart(name: str, tmp_path: Path) -> None:
    config_cls, model_cls, cfg, targets, signal, count, scores = PAIRED[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    adapted = peft.get_peft_model(model, lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    report = export_model(tmp_path / "base", tmp_path / "m.onnx", adapter=tmp_path / "adapter")
    assert report.ok, report.max_abs_diff
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    taken = {i.name: i.shape for i in sess.get_inputs()}
    assert taken["input_ids"] == ["batch", "seq"] and taken[signal][0] == count
    assert {o.name: o.shape for o in sess.get_outputs()}[scores] == [count, "batch"]
    gen = torch.Generator().manual_seed(5)
    # 4 texts against 1 signal, neither the export's counts (PE-Audio's samples: another count than the export's too)
    shape = [1, *(d if isinstance(d, int) else 2400 for d in taken[signal][1:])]
    inputs = {"input_ids": torch.randint(0, 99, (4, 6), generator=gen), signal: torch.randn(*shape, generator=gen)}
    got = sess.run([scores], {n: t.numpy() for n, t in inputs.items()})[0]
    with torch.no_grad():
        want = getattr(adapted(**inputs), scores).numpy()
    assert got.shape == (1, 4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
