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
from tests.models.test_hf_peft_parity import MAX_POS, TOL, VOCAB, bert_model, gpt2_model, llama_model, peft_model


def save_folders(family: str, root: Path) -> tuple[Path, Path]:
    """``root/model`` (the random base model) and ``root/adapter`` (its PEFT LoRA, nonzero B, mixed ranks)."""
    pm = peft_model(family)
    pm.save_pretrained(root / "adapter")
    base = {"llama": llama_model, "gpt2": gpt2_model, "bert": bert_model}[family]()
    base.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                          for k, v in pm.state_dict().items() if "lora_" not in k})
    base.save_pretrained(root / "model")
    return root / "model", root / "adapter"


def save_with_adapter(model: torch.nn.Module, root: Path, **lora: object) -> tuple[Path, Path]:
    """``root/model`` (``model`` saved) and ``root/adapter``: a PEFT LoRA of ``lora`` (nonzero ``B``) over the saved
    model loaded back, as a fine-tune starts from a checkpoint."""
    model.save_pretrained(root / "model")
    base = type(model).from_pretrained(root / "model")
    peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora)).save_pretrained(root / "adapter")
    return root / "model", root / "adapter"


def exported_with_adapter(model: torch.nn.Module, root: Path, **lora: object
                          ) -> tuple[ort.InferenceSession, dict[str, torch.Tensor], torch.nn.Module]:
    """``model`` saved with a PEFT LoRA of ``lora`` (:func:`save_with_adapter`) and exported by the CLI with
    ``--attention-mask``: ``(its ONNX Runtime session, the check inputs load_model builds, eager PEFT)``."""
    save_with_adapter(model, root, **lora)
    out = root / "exported"
    assert main(["export", str(root / "model"), "--adapter", str(root / "adapter"), "--attention-mask",
                 "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    return sess, load_model(root / "model", attention_mask=True).check_inputs, eager_peft(root / "model", root / "adapter")


def assert_logits_match(sess: ort.InferenceSession, eager: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> None:
    """The session's first output on ``feeds`` within tolerance of eager PEFT's ``logits``, which the adapter moves
    (by more than 10 x the tolerance and a tenth of the logits' size: a tiny model's logits are small)."""
    with torch.no_grad():
        want = eager(**feeds).logits.numpy()
        with eager.disable_adapter():
            moved = np.abs(eager(**feeds).logits.numpy() - want).max()
    assert moved > 10 * TOL and moved > 0.1 * np.abs(want).max()
    got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


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


def _vit_folders(root: Path) -> tuple[Path, Path]:
    """A tiny ViT classifier (32x32 images) and its PEFT LoRA on every Linear (nonzero B)."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, num_labels=5)
    transformers.ViTForImageClassification(cfg).save_pretrained(root / "model")
    base = transformers.ViTForImageClassification.from_pretrained(root / "model")
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                              init_lora_weights=False)).save_pretrained(root / "adapter")
    return root / "model", root / "adapter"


def test_an_image_model_folder_exports_from_the_cli_on_pixel_values(tmp_path) -> None:
    """An image model takes ``pixel_values`` at its config's size, batch dynamic: the file runs at another batch."""
    model_dir, adapter_dir = _vit_folders(tmp_path)
    spec = load_model(model_dir)
    assert list(spec.example_inputs) == ["pixel_values"] and spec.dynamic_dims == {"pixel_values": {0: "batch"}}
    assert tuple(spec.example_inputs["pixel_values"].shape) == (2, 3, 32, 32)
    assert spec.check_inputs["pixel_values"].shape[0] == 3
    want, _ = cli_export_matches_eager(model_dir, adapter_dir, "merged", tmp_path / "vit")
    x = {"pixel_values": torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))}
    with torch.no_grad():
        want = eager_peft(model_dir, adapter_dir)(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(tmp_path / "vit.onnx", x), want, atol=TOL, rtol=TOL)


def test_an_image_model_whose_class_names_no_input_embeddings_exports_with_an_adapter(tmp_path) -> None:
    """DINOv3's ConvNeXt (as DETR's models) raises ``NotImplementedError`` from ``get_input_embeddings``: the adapter's
    reading takes that as no embedding layers, and the CLI's file gives eager PEFT's features at another batch."""
    torch.manual_seed(0)
    cfg = transformers.DINOv3ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 64], image_size=64,
                                            layer_scale_init_value=1.0)  # the blocks' outputs (and the adapter's) count
    transformers.DINOv3ConvNextModel(cfg).save_pretrained(tmp_path / "model")
    with pytest.raises(NotImplementedError):
        transformers.DINOv3ConvNextModel(cfg).get_input_embeddings()
    base = transformers.DINOv3ConvNextModel.from_pretrained(tmp_path / "model")
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["pointwise_conv1", "pointwise_conv2"],
                                              init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "convnext")]) == 0
    x = {"pixel_values": torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))}
    eager = eager_peft(tmp_path / "model", tmp_path / "adapter")
    with torch.no_grad():
        want = eager(**x).last_hidden_state.numpy()
        with eager.disable_adapter():
            assert np.abs(eager(**x).last_hidden_state.numpy() - want).max() > 10 * TOL  # the adapter moves them
    np.testing.assert_allclose(run_artifact(tmp_path / "convnext.onnx", x), want, atol=TOL, rtol=TOL)


def test_a_model_that_reads_its_adapted_convolution_s_stride_exports(tmp_path) -> None:
    """MobileNetV2's TF-style padding reads its convolutions' ``stride``, ``kernel_size`` and ``dilation``: flora_graph's
    LoRA layer on such a convolution answers with its base layer's (PEFT's own Conv2d layer does not, so the reference
    is PEFT's merged model), and the CLI's file gives its logits at another batch."""
    torch.manual_seed(0)
    model = transformers.MobileNetV2ForImageClassification(
        transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=5))
    with torch.no_grad():  # weights of a size that gives logits of a size (the default draw gives about 1e-20)
        for p in model.parameters():
            if p.ndim == 4:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "model")
    base = transformers.MobileNetV2ForImageClassification.from_pretrained(tmp_path / "model")
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*(first_conv|1x1)\.convolution",
                                              init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "mobilenet")]) == 0
    merged = eager_peft(tmp_path / "model", tmp_path / "adapter").merge_and_unload().eval()
    plain = transformers.MobileNetV2ForImageClassification.from_pretrained(tmp_path / "model").eval()
    x = {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        want = merged(**x).logits.numpy()
        assert np.abs(plain(**x).logits.numpy() - want).max() > 0.1 * np.abs(want).max()  # the adapter moves them
    np.testing.assert_allclose(run_artifact(tmp_path / "mobilenet.onnx", x), want, atol=TOL, rtol=TOL)


def test_an_audio_model_folder_exports_over_a_dynamic_number_of_samples(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, vocab_size=40)
    transformers.Wav2Vec2ForCTC(cfg).save_pretrained(tmp_path / "model")
    spec = load_model(tmp_path / "model")
    assert spec.dynamic_dims == {"input_values": {0: "batch", 1: "samples"}}
    assert spec.example_inputs["input_values"].shape[1] != spec.check_inputs["input_values"].shape[1]
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "w2v")]) == 0
    x = {"input_values": torch.randn(2, 1234, generator=torch.Generator().manual_seed(3))}
    model = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        want = model(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(tmp_path / "w2v.onnx", x), want, atol=TOL, rtol=TOL)


def test_a_perceiver_text_classifier_exports_on_token_ids_and_its_mask(tmp_path) -> None:
    """Perceiver's text models name their main input ``inputs`` and take the token ids as ``input_ids`` too: the
    CLI exports them as token models (``input_ids``, ``attention_mask``), as torch.onnx does given ``input_ids``."""
    cfg = transformers.PerceiverConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POS, d_model=32, d_latents=32,
                                       num_latents=8, num_blocks=1, num_self_attends_per_block=2,
                                       num_self_attention_heads=2, num_cross_attention_heads=2, num_labels=3)
    torch.manual_seed(0)
    sess, x, eager = exported_with_adapter(transformers.PerceiverForSequenceClassification(cfg), tmp_path, r=4,
                                           target_modules=["query", "value"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    assert (x["attention_mask"] == 0).any()  # the check exercises padding
    assert_logits_match(sess, eager, x)


@pytest.mark.parametrize("arch", ["BertForMultipleChoice", "RobertaForMultipleChoice"])
def test_a_multiple_choice_head_exports_on_tokens_per_choice(arch, tmp_path) -> None:
    """A multiple-choice head scores each of a row's choices: the CLI exports it on ``[batch, choices, seq]`` tokens
    and mask, all three dynamic (as Optimum's multiple-choice exports), ``logits`` ``[batch, choices]``, within
    tolerance of eager PEFT at other batch, choice and sequence sizes, a padded choice among them."""
    config_cls = transformers.BertConfig if arch.startswith("Bert") else transformers.RobertaConfig
    pad = {} if arch.startswith("Bert") else {"pad_token_id": 1}
    cfg = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=MAX_POS + 2, **pad)
    torch.manual_seed(0)
    sess, x, eager = exported_with_adapter(getattr(transformers, arch)(cfg), tmp_path, r=4, lora_alpha=256,
                                           target_modules=["query", "value"])
    assert {(i.name, tuple(i.shape)) for i in sess.get_inputs()} >= {("input_ids", ("batch", "choices", "seq")),
                                                                     ("attention_mask", ("batch", "choices", "seq"))}
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    assert x["input_ids"].shape[:2] == (3, 4) and (x["attention_mask"] == 0).any()
    for feeds in (x, {k: v[:2, :3, 1:].contiguous() for k, v in x.items()}):
        assert_logits_match(sess, eager, feeds)  # [batch, choices]


@pytest.mark.parametrize("arch", ["DebertaForTokenClassification", "DebertaForSequenceClassification"])
def test_deberta_with_relative_attention_exports_on_a_dynamic_sequence(arch, tmp_path) -> None:
    """DeBERTa's disentangled attention (``microsoft/deberta-base``'s configuration) cuts its relative embeddings by
    ``torch.tensor(min(seq, max_positions))``, read back as numbers: the CLI's file follows the sequence, within
    tolerance of eager PEFT at another batch and length, left-padded, as torch.onnx's does."""
    cfg = transformers.DebertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=MAX_POS, relative_attention=True,
                                     pos_att_type=["c2p", "p2c"], max_relative_positions=-1,
                                     position_biased_input=False, num_labels=3)
    torch.manual_seed(0)
    sess, x, eager = exported_with_adapter(getattr(transformers, arch)(cfg), tmp_path, r=4, lora_alpha=64,
                                           target_modules=["in_proj"])
    assert (x["attention_mask"] == 0).any()
    for feeds in (x, {k: v[:2, 3:] for k, v in x.items()}):
        assert_logits_match(sess, eager, feeds)


def test_a_funnel_classifier_with_factorized_attention_exports_on_a_dynamic_sequence(tmp_path) -> None:
    """Funnel's factorized attention pools its position embeddings ``x[:-1:2]`` of ``seq + 1`` rows, and its states
    with a ceil-mode average over the sequence: sizes of a dynamic ``seq`` that the CLI's file keeps (torch.onnx
    exports it too), within tolerance of eager PEFT at another batch and an odd length, left-padded."""
    cfg = transformers.FunnelConfig(vocab_size=VOCAB, block_sizes=[1, 1], d_model=32, n_head=4, d_head=8, d_inner=64,
                                    num_decoder_layers=1, max_position_embeddings=MAX_POS, num_labels=3,
                                    attention_type="factorized")
    torch.manual_seed(0)
    sess, x, eager = exported_with_adapter(transformers.FunnelForSequenceClassification(cfg), tmp_path, r=4,
                                           target_modules=["q_head", "v_head"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("input_ids", ["batch", "seq"]),
                                                              ("attention_mask", ["batch", "seq"])]
    assert x["input_ids"].shape[1] % 2 and (x["attention_mask"] == 0).any()  # a short last window, and padding
    assert_logits_match(sess, eager, x)
    assert_logits_match(sess, eager, {k: v[:, :-1] for k, v in x.items()})  # an even length: every window whole


def test_a_perceiver_image_classifier_exports_on_pixels_named_inputs(tmp_path) -> None:
    """Perceiver's image classifiers take their pixels as ``inputs`` (``[batch, channels, size, size]`` at the
    config's image size): the CLI builds them, batch dynamic, and the file gives eager PEFT's logits at another batch."""
    cfg = transformers.PerceiverConfig(d_model=32, d_latents=32, num_latents=8, num_blocks=1,
                                       num_self_attends_per_block=2, num_self_attention_heads=2,
                                       num_cross_attention_heads=2, image_size=16, num_labels=3)
    torch.manual_seed(0)
    save_with_adapter(transformers.PerceiverForImageClassificationLearned(cfg), tmp_path, r=4,
                      target_modules=["query", "value"])
    out = tmp_path / "perceiver"
    assert main(["export", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("inputs", ["batch", 3, 16, 16])]
    x = {"inputs": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    eager = eager_peft(tmp_path / "model", tmp_path / "adapter")
    with torch.no_grad():
        want = eager(**x).logits.numpy()
        with eager.disable_adapter():
            assert np.abs(eager(**x).logits.numpy() - want).max() > 100 * TOL  # the adapter matters
    np.testing.assert_allclose(run_artifact(out.with_suffix(".onnx"), x), want, atol=TOL, rtol=TOL)


def _pair_ids(rows: int, seq: int, eos: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Premise/hypothesis pairs as BART's tokenizer writes them, ``<s> A </s></s> B </s>``, of different lengths,
    right-padded with ``pad`` and the mask zero there: three end-of-sequence marks in every row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, seq), pad)
    mask = torch.zeros(rows, seq, dtype=torch.int64)
    for r in range(rows):
        n = seq - 2 * r
        row = torch.randint(3, VOCAB, (n,), generator=gen)
        cut = 2 + r
        row[cut], row[cut + 1], row[n - 1] = eos, eos, eos
        ids[r, :n], mask[r, :n] = row, 1
    return ids, mask


@pytest.mark.parametrize("family", ["bart", pytest.param("t5", marks=pytest.mark.slow)])
def test_an_encoder_decoder_classifier_exports_on_its_tokens_alone(family, tmp_path) -> None:
    """BART's and T5's sequence classification (``facebook/bart-large-mnli``, the zero-shot classification model)
    read the decoder's state at each row's last end-of-sequence mark, picked by a bool mask and regrouped per row
    (where torch.onnx's dynamo export fails), with the decoder fed the encoder's tokens shifted: the CLI exports
    ``input_ids`` and ``attention_mask`` alone, as Optimum does, with a PEFT adapter trained for the task."""
    if family == "bart":
        cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=MAX_POS, num_labels=3)
        cls, targets = transformers.BartForSequenceClassification, ["q_proj", "v_proj"]
    else:
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0, num_labels=3)
        cls, targets = transformers.T5ForSequenceClassification, ["q", "v"]
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():  # logits of order 1 (its initial head gives about 0.01, below what the tolerance tells)
        model.classification_head.out_proj.weight.normal_(0, 2)
    save_with_adapter(model, tmp_path, task_type="SEQ_CLS", r=4, target_modules=targets)
    out = tmp_path / "classifier"
    assert main(["export", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--attention-mask",
                 "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert sess.get_outputs()[0].name == "logits"
    eager = eager_peft(tmp_path / "model", tmp_path / "adapter")
    spec = load_model(tmp_path / "model", attention_mask=True)
    assert (spec.check_inputs["input_ids"][:, -1] == cfg.eos_token_id).all()  # one mark a row, at its end
    for ids, mask in ((spec.check_inputs["input_ids"], spec.check_inputs["attention_mask"]),
                      _pair_ids(3, 12, cfg.eos_token_id, cfg.pad_token_id, 0),
                      _pair_ids(1, 9, cfg.eos_token_id, cfg.pad_token_id, 1)):
        with torch.no_grad():
            want = eager(input_ids=ids, attention_mask=mask).logits.numpy()
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
        with torch.no_grad(), eager.disable_adapter():
            assert np.abs(eager(input_ids=ids, attention_mask=mask).logits.numpy() - want).max() > 100 * TOL


def test_a_model_on_inputs_the_cli_cannot_build_is_refused_by_name(tmp_path, capsys) -> None:
    from flora_graph.errors import FloraGraphError
    from flora_graph.model_export import ModelFolderError

    cfg = transformers.PatchTSTConfig(num_input_channels=2, context_length=16, patch_length=4, patch_stride=4,
                                      d_model=16, num_attention_heads=2, num_hidden_layers=1, ffn_dim=32, num_targets=3)
    transformers.PatchTSTForClassification(cfg).save_pretrained(tmp_path / "ts")
    with pytest.raises(ModelFolderError, match="PatchTSTForClassification takes 'past_values'"):
        load_model(tmp_path / "ts")
    assert main(["export", str(tmp_path / "ts"), "--out", str(tmp_path / "ts.onnx")]) != 0
    assert "past_values" in capsys.readouterr().err
    vit_dir, _ = _vit_folders(tmp_path / "vit")
    with pytest.raises(FloraGraphError, match="takes pixel_values, not tokens"):
        load_model(vit_dir, attention_mask=True)


def test_a_video_model_folder_takes_frames_of_its_config(tmp_path) -> None:
    """A video classifier takes ``[batch, frames, channels, height, width]`` (its config's ``num_frames``); its
    tubelet embedding (a 3-D convolution) exports, and the file matches eager at another batch."""
    torch.manual_seed(0)
    cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    transformers.VideoMAEForVideoClassification(cfg).save_pretrained(tmp_path / "model")
    spec = load_model(tmp_path / "model")
    assert tuple(spec.example_inputs["pixel_values"].shape) == (2, 4, 3, 32, 32)
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "video")]) == 0
    x = {"pixel_values": torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(5))}
    model = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        want = model(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(tmp_path / "video.onnx", x), want, atol=TOL, rtol=TOL)


def test_a_vivit_folder_exports_on_frames(tmp_path) -> None:
    """ViViT's class name does not say video: the CLI gave it images, which its tubelet embedding refused; it takes
    ``[batch, frames, channels, height, width]`` and the file matches eager at another batch."""
    torch.manual_seed(0)
    cfg = transformers.VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    transformers.VivitModel(cfg).save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "video")]) == 0
    x = {"pixel_values": torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(5))}
    model = transformers.VivitModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        want = model(**x)
    np.testing.assert_allclose(run_artifact(tmp_path / "video.onnx", x), want.last_hidden_state.numpy(), atol=TOL,
                               rtol=TOL)


def test_an_audio_codec_folder_exports_on_channels_and_any_number_of_samples(tmp_path) -> None:
    """DAC takes ``[batch, channels, samples]`` (the CLI gave it ``[batch, samples]``), and cuts its decoded audio,
    ``hop * (samples // hop)`` long, back to ``samples``, which keeps all of it: capture refused that slice (no IR dim
    is the smaller of the two). Every output matches eager at a length that is not a multiple of the hop."""
    import onnxruntime as ort

    torch.manual_seed(0)
    cfg = transformers.DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4], decoder_hidden_size=16,
                                 upsampling_ratios=[4, 2], hidden_size=16, n_codebooks=2, codebook_size=16,
                                 codebook_dim=4, hop_length=8)
    transformers.DacModel(cfg).save_pretrained(tmp_path / "model")
    spec = load_model(tmp_path / "model")
    assert spec.dynamic_dims == {"input_values": {0: "batch", 2: "samples"}}
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "codec")]) == 0
    x = torch.randn(3, 1, 1003, generator=torch.Generator().manual_seed(5))
    model = transformers.DacModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        want = model(input_values=x)
    sess = ort.InferenceSession(str(tmp_path / "codec.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_values": x.numpy()}), strict=True))
    assert got["audio_values"].shape == tuple(want.audio_values.shape) == (3, 1000)
    for name in ("audio_values", "quantized_representation", "audio_codes", "projected_latents"):
        np.testing.assert_allclose(got[name], getattr(want, name).numpy(), atol=TOL, rtol=TOL, err_msg=name)


def _omniasr() -> object:
    audio = dict(hidden_size=32, conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 2], num_attention_heads=4,
                 num_hidden_layers=2, intermediate_size=64, num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4)
    return transformers.OmniASRCTCModel(transformers.OmniASRCTCConfig(vocab_size=40, audio_config=audio))


def _glmasr() -> object:
    return transformers.GlmAsrEncoder(transformers.GlmAsrEncoderConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
        num_mel_bins=16, max_position_embeddings=256))


@pytest.mark.parametrize(("build", "name", "dims", "example", "check"), [
    # OmniASR's first convolution reads one channel: [batch, 1, samples]
    (_omniasr, "input_values", {0: "batch", 2: "samples"}, (2, 1, 1600), (3, 1, 2345)),
    # GLM-ASR's encoder convolves over frames, as Whisper's does, but names no max_source_positions
    (_glmasr, "input_features", {0: "batch", 2: "frames"}, (2, 16, 64), (3, 16, 90)),
], ids=["omniasr-one-channel", "glmasr-channels-first"])
def test_the_other_audio_layout_is_tried_where_the_first_is_refused(tmp_path, build, name, dims, example,
                                                                     check) -> None:
    """No config field says these models' input layout: the first one fails in eager, so load_model tries the other
    (raw audio of one channel; features channels-first), and the file matches eager at another batch and length."""
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path / "model")
    spec = load_model(tmp_path / "model")
    assert spec.dynamic_dims == {name: dims}
    assert tuple(spec.example_inputs[name].shape) == example
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "asr")]) == 0
    x = {name: torch.randn(*check, generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        want = type(model).from_pretrained(tmp_path / "model").eval()(**x).last_hidden_state.numpy()
    np.testing.assert_allclose(run_artifact(tmp_path / "asr.onnx", x), want, atol=TOL, rtol=TOL)


def test_a_speech_model_on_feature_frames_exports_over_a_dynamic_frame_count(tmp_path) -> None:
    """Parakeet's CTC model takes ``input_features`` ``[batch, frames, mel bins]`` (its encoder config's
    ``num_mel_bins``), frames dynamic; its relative positions count down past zero (``arange(n - 1, -n, -1)``).
    The CLI refused the input before; the file matches eager at another batch and frame count."""
    torch.manual_seed(0)
    enc = transformers.ParakeetEncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, subsampling_conv_channels=8, num_mel_bins=16,
                                             conv_kernel_size=3, max_position_embeddings=256)
    cfg = transformers.ParakeetCTCConfig(vocab_size=40, pad_token_id=39, encoder_config=enc.to_dict())
    transformers.ParakeetForCTC(cfg).save_pretrained(tmp_path / "model")
    spec = load_model(tmp_path / "model")
    assert spec.dynamic_dims == {"input_features": {0: "batch", 1: "frames"}}
    assert tuple(spec.example_inputs["input_features"].shape) == (2, 64, 16)
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "asr")]) == 0
    x = {"input_features": torch.randn(3, 123, 16, generator=torch.Generator().manual_seed(4))}
    model = transformers.ParakeetForCTC.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        want = model(**x).logits.numpy()
    np.testing.assert_allclose(run_artifact(tmp_path / "asr.onnx", x), want, atol=TOL, rtol=TOL)


def test_video_inputs_read_the_frame_count_and_size_each_config_names() -> None:
    from flora_graph.frontend.signal_inputs import signal_inputs

    cases = [(transformers.VJEPA2Config(crop_size=32, frames_per_clip=4), "VJEPA2ForVideoClassification",
              "pixel_values_videos", (2, 4, 3, 32, 32)),
             (transformers.VideoPrismVisionConfig(image_size=48, num_frames=6), "VideoPrismForVideoClassification",
              "pixel_values_videos", (2, 6, 3, 48, 48)),
             (transformers.VideoMAEConfig(image_size=32, num_frames=4), "VideoMAEForVideoClassification",
              "pixel_values", (2, 4, 3, 32, 32)),
             # class names that do not say video; X-CLIP's vision model names frames but takes them as images
             (transformers.VivitConfig(image_size=32, num_frames=4), "VivitModel", "pixel_values", (2, 4, 3, 32, 32)),
             (transformers.TimesformerConfig(image_size=32, num_frames=4), "TimesformerForVideoClassification",
              "pixel_values", (2, 4, 3, 32, 32)),
             (transformers.XCLIPVisionConfig(image_size=32, num_frames=4), "XCLIPVisionModel", "pixel_values",
              (2, 3, 32, 32))]
    for config, arch, main_input, shape in cases:
        example, dims, check = signal_inputs(config, arch, main_input)
        assert tuple(example[main_input].shape) == shape and dims == {main_input: {0: "batch"}}, arch
        assert tuple(check[main_input].shape) == (3, *shape[1:]), arch


@pytest.mark.parametrize("family", ["t5", "bart", pytest.param("switch", marks=pytest.mark.slow)])  # switch: 5 s
def test_an_encoder_decoder_folder_exports_on_decoder_input_ids_with_its_adapter(family, tmp_path) -> None:
    """``flora-graph export FOLDER`` on a T5 / BART folder without a task: the model takes ``attention_mask`` and
    ``decoder_input_ids`` ``[batch, dec_seq]`` beside ``input_ids`` (as Optimum's exports without a cache do; the CLI
    raised an untyped error before) and gives eager PEFT's logits at another batch, encoder and decoder length,
    a row padded."""
    torch.manual_seed(0)
    if family == "t5":
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0, pad_token_id=0)
        base, targets = transformers.T5ForConditionalGeneration(cfg), ["q", "v", "wo"]
    elif family == "switch":  # every layer a mixture of experts; LoRA on the router and the experts too
        cfg = transformers.SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_decoder_layers=2, num_heads=4, num_experts=4,
                                                    expert_capacity=4, encoder_sparse_step=1, decoder_sparse_step=1,
                                                    decoder_start_token_id=0, pad_token_id=0)
        base, targets = transformers.SwitchTransformersForConditionalGeneration(cfg), ["q", "classifier", "wi", "wo"]
    else:
        cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=MAX_POS)
        base, targets = transformers.BartForConditionalGeneration(cfg), ["q_proj", "v_proj", "fc2"]
    base.save_pretrained(tmp_path / "model")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    pm.save_pretrained(tmp_path / "adapter")
    spec = load_model(tmp_path / "model")
    assert spec.dynamic_dims["decoder_input_ids"] == {0: "batch", 1: "dec_seq"}
    assert main(["export", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "s2s")]) == 0
    sess = ort.InferenceSession(str(tmp_path / "s2s.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == {"input_ids", "attention_mask", "decoder_input_ids"}
    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[0, 6:] = 0  # a padded row
    x = {"input_ids": torch.randint(0, VOCAB, (3, 9), generator=gen), "attention_mask": mask,
         "decoder_input_ids": torch.randint(0, VOCAB, (3, 6), generator=gen)}
    with torch.no_grad():
        want = eager_peft(tmp_path / "model", tmp_path / "adapter")(**x).logits.numpy()
    got = sess.run(["logits"], {k: v.numpy() for k, v in x.items()})[0]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", ["fsmt", "encoder-decoder", pytest.param("t5gemma2", marks=pytest.mark.slow)])
def test_more_encoder_decoder_folders_export_with_parity(kind, tmp_path) -> None:
    """FSMT (its decoder padding mask is dropped where no token pads: a branch on the data, swapped for the mask
    itself while tracing), BERT2BERT (each side's vocabulary) and T5Gemma 2 (a mask built by vmap): the CLI's export
    gives eager's logits at another batch and lengths, a decoder row holding the pad token."""
    from tests.serving.seq2seq_package import ARCHITECTURES

    config_cls, model_cls, cfg = ARCHITECTURES[kind]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "plain")]) == 0
    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[1, 5:] = 0
    dec = torch.randint(3, 100, (3, 6), generator=gen)
    dec[2, 4:] = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    x = {"input_ids": torch.randint(3, 100, (3, 9), generator=gen), "attention_mask": mask, "decoder_input_ids": dec}
    with torch.no_grad():
        want = model(**x, use_cache=False).logits.numpy()
    sess = ort.InferenceSession(str(tmp_path / "plain.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], {k: v.numpy() for k, v in x.items()})[0], want, atol=TOL, rtol=TOL)
