"""``flora-graph export`` of sentence-transformers folders (``modules.json``: a transformers model, then pooling,
dense and normalize modules): the file is the whole pipeline, ``token_embeddings`` and ``sentence_embedding`` out,
and matches sentence-transformers itself with the same PEFT adapter loaded by it (``SentenceTransformer.load_adapter``),
on a padded batch of another shape than the export's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
st = pytest.importorskip("sentence_transformers")

from flora_graph.errors import ModelFolderError  # noqa: E402
from flora_graph.frontend.sentence_embedding import transformer_folder  # noqa: E402
from flora_graph.model_export import export_model, load_model  # noqa: E402

BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=64)
QWEN3 = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _folder(root: Path, pooling: str = "mean", dense: bool = True, decoder: bool = False) -> Path:
    """A sentence-transformers folder at ``root / "base"``: a tiny BERT (a Qwen3 with ``decoder``), ``pooling``, then a
    Dense (tanh, 32 -> 16) and Normalize where ``dense``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    torch.manual_seed(0)
    model = transformers.Qwen3Model(transformers.Qwen3Config(**QWEN3)) if decoder else \
        transformers.BertModel(transformers.BertConfig(**BERT))
    model.save_pretrained(root / "hf")
    parts = [modules.Transformer(str(root / "hf")), modules.Pooling(32, pooling_mode=pooling)]
    if dense:
        parts += [modules.Dense(32, 16, activation_function=torch.nn.Tanh()), modules.Normalize()]
    SentenceTransformer(modules=parts, device="cpu").save(str(root / "base"))
    return root / "base"


def _adapter(base: Path, root: Path, targets: list[str]) -> Path:
    """A PEFT LoRA (nonzero ``B``) on the folder's transformers model, saved at ``root / "adapter"``."""
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(1)
    inner = SentenceTransformer(str(base), device="cpu")[0].auto_model
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(inner, lora).save_pretrained(root / "adapter")
    return root / "adapter"


def _check(base: Path, adapter: Path | None, path: Path, with_types: bool) -> None:
    """The exported file against sentence-transformers with ``adapter`` loaded, on 3 texts of 9 tokens, one padded."""
    from sentence_transformers import SentenceTransformer

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids", "attention_mask", *(["token_type_ids"] if with_types else [])]
    assert [o.name for o in sess.get_outputs()] == ["token_embeddings", "sentence_embedding"]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 100, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[1, 6:] = 0  # a shorter text, padded on the right as sentence-transformers' tokenizers pad
    feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    reference = SentenceTransformer(str(base), device="cpu")
    if adapter is not None:
        reference.load_adapter(str(adapter))
    with torch.no_grad():
        want = reference({k: feats[k] for k in names})
    tokens, sentences = sess.run(None, {k: feats[k].numpy() for k in names})
    np.testing.assert_allclose(sentences, want["sentence_embedding"].numpy(), atol=1e-5, rtol=1e-4)
    kept = mask.bool().numpy()  # padding's token states are whatever the model leaves there: compared where kept
    np.testing.assert_allclose(tokens[kept], want["token_embeddings"].numpy()[kept], atol=1e-5, rtol=1e-4)


def test_the_file_is_the_pipeline_and_matches_sentence_transformers_with_the_adapter(tmp_path: Path) -> None:
    base = _folder(tmp_path)
    adapter = _adapter(base, tmp_path, ["query", "value"])
    spec = load_model(base)
    assert spec.output_names == ["token_embeddings", "sentence_embedding"] and spec.adapter_root == "model"
    report = export_model(base, tmp_path / "m.onnx", adapter=adapter)
    assert report.ok, report.max_abs_diff
    _check(base, adapter, report.path, with_types=True)
    plain = export_model(base, tmp_path / "plain.onnx")
    feeds = {k: v.numpy() for k, v in spec.check_inputs.items()}
    with_adapter = ort.InferenceSession(str(report.path)).run(["sentence_embedding"], feeds)[0]
    without = ort.InferenceSession(str(plain.path)).run(["sentence_embedding"], feeds)[0]
    assert np.abs(with_adapter - without).max() > 1e-3  # the adapter reaches the embedding
    np.testing.assert_allclose(np.linalg.norm(with_adapter, axis=1), 1.0, atol=1e-5)  # Normalize kept


def test_an_older_folder_with_its_transformer_in_a_subfolder(tmp_path: Path) -> None:
    base = _folder(tmp_path, dense=False)
    old = tmp_path / "old"
    (old / "0_Transformer").mkdir(parents=True)
    shutil.copytree(base / "1_Pooling", old / "1_Pooling")
    for f in ("config.json", "model.safetensors", "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, old / "0_Transformer" / f)
    (old / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    assert transformer_folder(old) == old / "0_Transformer"
    report = export_model(old, tmp_path / "m.onnx")
    assert report.ok, report.max_abs_diff
    _check(old, None, report.path, with_types=True)


@pytest.mark.parametrize("pooling", ["cls", "max", "lasttoken", *(pytest.param(p, marks=pytest.mark.slow)
                                                         for p in ("weightedmean", "mean_sqrt_len_tokens"))])
def test_each_pooling_mode_matches_sentence_transformers(pooling: str, tmp_path: Path) -> None:
    base = _folder(tmp_path, pooling=pooling)
    adapter = _adapter(base, tmp_path, ["query", "value"])
    report = export_model(base, tmp_path / "m.onnx", adapter=adapter)
    assert report.ok, report.max_abs_diff
    _check(base, adapter, report.path, with_types=True)


def test_a_decoder_embedding_model_pooled_at_its_last_token(tmp_path: Path) -> None:
    base = _folder(tmp_path, pooling="lasttoken", dense=False, decoder=True)
    adapter = _adapter(base, tmp_path, ["q_proj", "v_proj", "down_proj"])
    report = export_model(base, tmp_path / "m.onnx", adapter=adapter)
    assert report.ok, report.max_abs_diff
    _check(base, adapter, report.path, with_types=False)


@pytest.mark.parametrize("fault", ["first module", "outside", "pickle", "not json"])
def test_a_bad_sentence_transformers_folder_is_a_typed_error_naming_the_culprit(fault: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "1_Pooling").mkdir(parents=True)
    entries = [{"path": "", "type": "sentence_transformers.models.Transformer"},
               {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if fault == "first module":
        entries.reverse()
    elif fault == "outside":
        entries[1]["path"] = "../elsewhere"
    elif fault == "pickle":
        (folder / "1_Pooling" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (folder / "modules.json").write_text("[{" if fault == "not json" else json.dumps(entries))
    match = {"first module": r"first module is 'sentence_transformers.models.Pooling'", "outside": r"'\.\./elsewhere' "
             r"leaves the folder", "pickle": r"pytorch_model.bin: the module's weights are a pickle",
             "not json": r"modules.json: cannot read it as JSON"}[fault]
    with pytest.raises(ModelFolderError, match=match):
        transformer_folder(folder)


@pytest.mark.parametrize("preset", ["merged", pytest.param("fused", marks=pytest.mark.slow)])
def test_a_dora_adapter_installs_through_peft_inside_the_pipeline(preset: str, tmp_path: Path) -> None:
    """DoRA goes through PEFT's own layers, installed on the pipeline's transformers model (``adapter_root``); the
    reference is sentence-transformers with PEFT's model of that adapter in place of its transformer's."""
    from sentence_transformers import SentenceTransformer

    base = _folder(tmp_path)
    torch.manual_seed(2)
    inner = SentenceTransformer(str(base), device="cpu")[0].auto_model
    lora = peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False, use_dora=True)
    peft.get_peft_model(inner, lora).save_pretrained(tmp_path / "dora")
    report = export_model(base, tmp_path / "m.onnx", adapter=tmp_path / "dora", preset=preset)
    assert report.ok, report.max_abs_diff
    reference = SentenceTransformer(str(base), device="cpu")
    reference[0].auto_model = peft.PeftModel.from_pretrained(reference[0].auto_model, tmp_path / "dora").eval()
    plain = SentenceTransformer(str(base), device="cpu")
    gen = torch.Generator().manual_seed(4)
    feats = {"input_ids": torch.randint(5, 100, (3, 9), generator=gen), "attention_mask": torch.ones(3, 9, dtype=torch.int64)}
    feats["attention_mask"][2, 4:] = 0
    feats["token_type_ids"] = torch.zeros_like(feats["input_ids"])
    got = ort.InferenceSession(str(report.path)).run(["sentence_embedding"], {k: v.numpy() for k, v in feats.items()})[0]
    with torch.no_grad():
        want = reference(dict(feats))["sentence_embedding"].numpy()
        without = plain(dict(feats))["sentence_embedding"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    assert np.abs(want - without).max() > 1e-3  # the adapter moves the embedding
