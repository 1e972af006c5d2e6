"""Encoder-decoder packages (T5, BART, Marian, Whisper, TrOCR, Donut): export, generation against eager transformers + PEFT, errors."""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from flora_graph.errors import FloraGraphError
from flora_graph.serving.errors import AdapterFileError, ServingError, UnknownAdapterError
from flora_graph.serving.generate import GenerationError
from flora_graph.serving.seq2seq import SEQ2SEQ_CONFIG, Seq2SeqGenerator, export_seq2seq
from tests.serving.seq2seq_package import (
    ARCHITECTURES,
    NEW,
    PROMPTS,
    architecture_matches_eager,
    eager_model,
    eager_tokens,
)

pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["t5", "bart", "marian"])
@pytest.mark.parametrize("adapter", [None, "all", "some"])
def test_greedy_tokens_equal_eager_peft(seq2seq_packages: dict[str, Path], kind: str, adapter: str | None) -> None:
    """A padded batch of three inputs, 32 tokens a row (the end-of-text token held back until then, so every row
    runs every step): the tokens of eager transformers + PEFT ``generate`` (BART's forced first and last tokens and
    Marian's banned pad token included)."""
    root = seq2seq_packages[kind]
    gen = Seq2SeqGenerator(root / "pkg")
    ours = gen.generate(PROMPTS, adapters=adapter, max_new_tokens=NEW, min_new_tokens=NEW)
    ref = eager_tokens(root, kind, adapter, PROMPTS, gen.pad, set(), max_new_tokens=NEW, min_new_tokens=NEW)
    assert ours == ref
    assert all(len(row) == NEW for row in ours)
    if adapter == "all":  # the adapter changes the generation (nonzero B), so equality above is not the base's
        assert ours != gen.generate(PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW)


def test_bart_token_embeddings_are_slots_of_both_sides(seq2seq_packages: dict[str, Path]) -> None:
    """The BART adapter ``all`` adapts both stacks' token embeddings: each side's model has an embedding slot, and
    its adapter files hold their tables (the greedy tokens above are eager PEFT's with them)."""
    import onnx

    from flora_graph.serving.slots import slots_from_metadata

    root = seq2seq_packages["bart"]
    for side in ("encoder", "decoder"):
        model = onnx.load(str(root / "pkg" / f"{side}.onnx"), load_external_data=False)
        _, slots = slots_from_metadata({p.key: p.value for p in model.metadata_props}, side)
        assert [s.module for s in slots if s.kind == "embedding"] == [f"model.{side}.embed_tokens"], side


def _stop_tokens(rows: list[list[int]]) -> list[int]:
    """Two tokens the rows first reach at the most different steps (none at the first step)."""
    ranked = []
    for t in sorted({t for r in rows for t in r}):
        firsts = [r.index(t) if t in r else len(r) for r in rows]
        if min(firsts) > 0:
            ranked.append((len(set(firsts)), t))
    return sorted(t for _, t in sorted(ranked, reverse=True)[:2])


@pytest.mark.parametrize("kind", ["t5", "bart", "marian"])
def test_rows_stop_at_their_stop_tokens_and_leave(seq2seq_packages: dict[str, Path], kind: str) -> None:
    """Rows stop at their stop tokens (tokens the rows reach at different steps, so the batch shrinks as they
    leave), each row's tokens those of eager ``generate`` with the same end-of-text ids."""
    root = seq2seq_packages[kind]
    gen = Seq2SeqGenerator(root / "pkg")
    prompts = [*PROMPTS, [40, 41], [90, 2, 3, 4, 5, 6, 7, 8, 9]]
    full = gen.generate(prompts, adapters="all", max_new_tokens=NEW, stop_tokens=[])
    stops = _stop_tokens(full)
    ours = gen.generate(prompts, adapters="all", max_new_tokens=NEW, stop_tokens=stops)
    assert ours == eager_tokens(root, kind, "all", prompts, gen.pad, set(stops), max_new_tokens=NEW,
                                eos_token_id=stops)
    assert len({len(r) for r in ours}) > 1  # rows left at different steps
    assert all(r == f[:len(r)] and r[-1] in stops for r, f in zip(ours, full, strict=True) if len(r) < NEW)


@pytest.mark.parametrize("adapter", [None, "all", "some"])
def test_whisper_tokens_equal_eager_peft(seq2seq_packages: dict[str, Path], adapter: str | None) -> None:
    """Speech features in, the tokens of eager Whisper + PEFT ``generate``; the cross-attention's key and value
    projections (adapted in both adapters) run in the encoder model."""
    root = seq2seq_packages["whisper"]
    gen = Seq2SeqGenerator(root / "pkg")
    feats = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    ours = gen.generate(feats.numpy(), adapters=adapter, max_new_tokens=NEW, min_new_tokens=NEW)
    model = eager_model(root, "whisper", adapter)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(input_features=feats, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             num_beams=1)
    assert ours == ref.tolist()
    files = sorted(p.name for p in (root / "pkg" / "adapters").glob("*.onnx_adapter"))
    assert files == ["all.decoder.onnx_adapter", "all.encoder.onnx_adapter", "some.decoder.onnx_adapter",
                     "some.encoder.onnx_adapter"]


@pytest.mark.parametrize("kind", ["t5", "bart", "whisper"])
def test_rows_with_different_adapters_decode_as_each_alone(seq2seq_packages: dict[str, Path], kind: str) -> None:
    """One batch whose rows use different adapters (or none), two of them one adapter: the mixed-adapter encoder and
    decoder, one call a step, rows grouped by adapter; each row's tokens are those it gets in a batch of its own
    adapter (and eager PEFT's)."""
    root = seq2seq_packages[kind]
    gen = Seq2SeqGenerator(root / "pkg")
    names = ["all", None, "some", "all"]
    if kind == "whisper":
        inputs = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(3)).numpy()
    else:
        inputs = [*PROMPTS, [60, 61, 62]]
    mixed = gen.generate(inputs, adapters=names, max_new_tokens=NEW, min_new_tokens=NEW)
    assert gen._mixed["decoder"] is not None  # the mixed models ran
    from flora_graph.serving.grouped import PLACES_INPUT

    for part in ("encoder", "decoder"):  # the two rows of "all" ran together on its weights
        assert PLACES_INPUT in gen._mixed[part].model.inputs
    for i, name in enumerate(names):
        assert mixed[i] == gen.generate(inputs[i:i + 1], adapters=name, max_new_tokens=NEW, min_new_tokens=NEW)[0]
    assert len({tuple(r) for r in mixed}) > 1  # the adapters change the rows: a row with the wrong one would differ


@pytest.mark.parametrize("kind", ["t5", "bart", "whisper"])
def test_the_mixed_models_alone_serve_every_row_as_eager_peft(seq2seq_packages: dict[str, Path], kind: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``mixed="only"``: neither part's own model is loaded; rows without an adapter, with one adapter for all and with
    different adapters generate eager PEFT's tokens (a padded batch); ``"auto"`` picks it for a package whose models
    and data reach ``MIXED_ONLY_BYTES`` and loads the mixed models lazily below that."""
    import flora_graph.serving.generate as generate

    root = seq2seq_packages[kind]
    only = Seq2SeqGenerator(root / "pkg", mixed="only")
    assert only.models == {"encoder": None, "decoder": None}
    assert set(only._mixed) == {"encoder", "decoder"}
    if kind == "whisper":
        inputs = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(3)).numpy()
    else:
        inputs = PROMPTS
    lazy = Seq2SeqGenerator(root / "pkg", mixed="lazy")
    for adapters in (None, "all", ["some", None, "all"]):
        got = only.generate(inputs, adapters=adapters, max_new_tokens=NEW, min_new_tokens=NEW)
        assert got == lazy.generate(inputs, adapters=adapters, max_new_tokens=NEW, min_new_tokens=NEW), adapters
        if kind != "whisper":
            per_row = adapters if isinstance(adapters, list) else [adapters] * len(PROMPTS)
            for i, name in enumerate(per_row):
                assert got[i] == eager_tokens(root, kind, name, [PROMPTS[i]], lazy.pad, set(), max_new_tokens=NEW,
                                              min_new_tokens=NEW)[0], (adapters, i)
    assert Seq2SeqGenerator(root / "pkg")._mixed == {}  # a tiny package: "lazy", nothing mixed loaded yet
    monkeypatch.setattr(generate, "MIXED_ONLY_BYTES", 1)
    assert Seq2SeqGenerator(root / "pkg").models == {"encoder": None, "decoder": None}
    with pytest.raises(ServingError, match="'only' or 'auto', got 'sometimes'"):
        Seq2SeqGenerator(root / "pkg", mixed="sometimes")


def test_mixed_modes_load_and_refuse_as_they_say(seq2seq_packages: dict[str, Path], tmp_path: Path) -> None:
    """``mixed=True`` loads both mixed models with the generator; ``False`` refuses rows with different adapters,
    naming the setting, and serves one adapter; ``"only"`` refuses a package without mixed models, naming them."""
    root = seq2seq_packages["t5"]
    assert set(Seq2SeqGenerator(root / "pkg", mixed=True)._mixed) == {"encoder", "decoder"}
    off = Seq2SeqGenerator(root / "pkg", mixed=False)
    with pytest.raises(ServingError, match=r"encoder\.mixed\.onnx.*made with mixed=False"):
        off.generate(PROMPTS[:2], adapters=["all", None])
    assert off.generate(PROMPTS[:2], adapters="all", max_new_tokens=3, min_new_tokens=3) == \
        Seq2SeqGenerator(root / "pkg").generate(PROMPTS[:2], adapters="all", max_new_tokens=3, min_new_tokens=3)
    export_seq2seq(root / "base", tmp_path / "pkg", {"all": root / "all"}, mixed=False)
    with pytest.raises(ServingError, match=r"mixed='only' serves every row through the package's "
                                           r"encoder\.mixed\.onnx / decoder\.mixed\.onnx, which it has not"):
        Seq2SeqGenerator(tmp_path / "pkg", mixed="only")


def test_a_package_without_mixed_models_refuses_mixed_rows(seq2seq_packages: dict[str, Path], tmp_path: Path) -> None:
    root = seq2seq_packages["t5"]
    report = export_seq2seq(root / "base", tmp_path / "pkg", {"all": root / "all"}, mixed=False)
    assert not list(report.path.glob("*.mixed.onnx"))
    gen = Seq2SeqGenerator(tmp_path / "pkg")
    with pytest.raises(ServingError, match=r"encoder\.mixed\.onnx.*without --no-mixed"):
        gen.generate(PROMPTS[:2], adapters=["all", None])
    assert gen.generate(PROMPTS[:2], adapters="all", max_new_tokens=3, min_new_tokens=3)  # one adapter still serves


def test_a_decoder_prompt_continues_as_eager_does(seq2seq_packages: dict[str, Path]) -> None:
    """Whisper's task tokens as the decoder prompt (three tokens in the first step): eager ``generate`` with the
    same ``decoder_input_ids``."""
    root = seq2seq_packages["whisper"]
    gen = Seq2SeqGenerator(root / "pkg")
    feats = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(5))
    prompt = [2, 40, 41]
    ours = gen.generate(feats.numpy(), adapters="all", decoder_prompt=prompt, max_new_tokens=12, min_new_tokens=12)
    model = eager_model(root, "whisper", "all")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(input_features=feats, decoder_input_ids=torch.tensor([prompt] * 2), max_new_tokens=12,
                             min_new_tokens=12, do_sample=False, num_beams=1)
    assert ours == [row[-12:] for row in ref.tolist()]


def test_seeded_sampling_draws_a_row_alike_in_any_batch(seq2seq_packages: dict[str, Path]) -> None:
    gen = Seq2SeqGenerator(seq2seq_packages["marian"] / "pkg")
    kw = dict(do_sample=True, temperature=1.5, top_k=20, seed=7, max_new_tokens=16, min_new_tokens=16)
    both = gen.generate(PROMPTS[:2], adapters="all", **kw)
    assert both[0] == gen.generate(PROMPTS[:1], adapters="all", **kw)[0]
    assert both == gen.generate(PROMPTS[:2], adapters="all", **kw)
    assert both[0] != gen.generate(PROMPTS[:1], adapters="all", **{**kw, "seed": 8})[0]
    greedy = gen.generate(PROMPTS[:1], adapters="all", max_new_tokens=16, min_new_tokens=16)[0]
    assert both[0] != greedy


def test_cache_shapes(seq2seq_packages: dict[str, Path]) -> None:
    """The encoder's cross keys/values are ``[batch, heads, enc_seq, head_dim]``; the decoder's presents grow by
    the step's tokens from an empty past."""
    import onnxruntime as ort

    pkg = seq2seq_packages["bart"] / "pkg"
    enc = ort.InferenceSession(str(pkg / "encoder.onnx"))
    dec = ort.InferenceSession(str(pkg / "decoder.onnx"))
    ids = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 1, 1]], np.int64)
    mask = np.array([[1] * 5, [1, 1, 1, 0, 0]], np.int64)
    cross = enc.run(None, {"input_ids": ids, "attention_mask": mask})
    assert [c.shape for c in cross] == [(2, 4, 5, 8)] * 4
    names = [o.name for o in enc.get_outputs()]
    feeds = {"input_ids": np.array([[2, 0, 7]] * 2, np.int64), "encoder_attention_mask": mask}
    for i in range(2):
        feeds[f"past_key_values.{i}.decoder.key"] = feeds[f"past_key_values.{i}.decoder.value"] = \
            np.zeros((2, 4, 0, 8), np.float32)
        feeds[f"past_key_values.{i}.encoder.key"] = cross[names.index(f"present.{i}.encoder.key")]
        feeds[f"past_key_values.{i}.encoder.value"] = cross[names.index(f"present.{i}.encoder.value")]
    out = dict(zip([o.name for o in dec.get_outputs()], dec.run(None, feeds), strict=True))
    assert out["logits"].shape == (2, 3, 100)
    assert out["present.1.decoder.value"].shape == (2, 4, 3, 8)
    feeds["input_ids"] = np.array([[9], [9]], np.int64)
    for i in range(2):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.decoder.{k}"] = out[f"present.{i}.decoder.{k}"]
    assert dec.run(["present.0.decoder.key"], feeds)[0].shape == (2, 4, 4, 8)


def test_bad_requests_are_refused_naming_the_culprit(seq2seq_packages: dict[str, Path]) -> None:
    gen = Seq2SeqGenerator(seq2seq_packages["bart"] / "pkg")
    with pytest.raises(UnknownAdapterError, match=r"'nope'.*serves \['all', 'some'\]"):
        gen.generate(PROMPTS, adapters="nope")
    with pytest.raises(GenerationError, match="input 1 is empty"):
        gen.generate([[5, 6], []])
    with pytest.raises(GenerationError, match="input 0: token ids \\[100\\] outside the vocabulary of 100"):
        gen.generate([[5, 100]])
    with pytest.raises(GenerationError, match="input 0 of 70 tokens is past the encoder's 64 positions"):
        gen.generate([[5] * 70])
    with pytest.raises(GenerationError, match="max_new_tokens 80 is past the decoder's 64 positions"):
        gen.generate(PROMPTS, max_new_tokens=80)
    with pytest.raises(GenerationError, match="unknown generation setting"):
        gen.generate(PROMPTS, beams=4)
    with pytest.raises(GenerationError, match="max_new_tokens must be"):
        gen.generate(PROMPTS, max_new_tokens=0)
    assert len(gen.generate([[5, 6]], max_new_tokens=3, min_new_tokens=3)[0]) == 3  # still serving
    speech = Seq2SeqGenerator(seq2seq_packages["whisper"] / "pkg")
    with pytest.raises(GenerationError, match=r"input_features must be \[batch, 8, 32\], got \[2, 8, 30\]"):
        speech.generate(np.zeros((2, 8, 30), np.float32))


def test_an_adapter_file_of_another_model_is_refused(seq2seq_packages: dict[str, Path], tmp_path: Path) -> None:
    """Marian's adapter file put in BART's package: its layout is another model's, refused on load naming it."""
    pkg = tmp_path / "pkg"
    shutil.copytree(seq2seq_packages["bart"] / "pkg", pkg)
    for suffix in ("", ".sha256"):
        shutil.copyfile(seq2seq_packages["t5"] / "pkg" / "adapters" / f"all.decoder.onnx_adapter{suffix}",
                        pkg / "adapters" / f"x.decoder.onnx_adapter{suffix}")
    with pytest.raises(AdapterFileError, match="'x'"):
        Seq2SeqGenerator(pkg)


def test_a_changed_adapter_file_fails_its_checksum(seq2seq_packages: dict[str, Path], tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(seq2seq_packages["t5"] / "pkg", pkg)
    f = pkg / "adapters" / "some.encoder.onnx_adapter"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="some"):
        Seq2SeqGenerator(pkg)


def test_export_refusals_leave_nothing(seq2seq_packages: dict[str, Path], tmp_path: Path) -> None:
    root = seq2seq_packages["t5"]
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(FloraGraphError, match="LlamaForCausalLM is not an encoder-decoder generation model"):
        export_seq2seq(tmp_path / "llama", tmp_path / "out")
    with pytest.raises(FloraGraphError, match="adapter name"):
        export_seq2seq(root / "base", tmp_path / "out", {"../x": root / "all"})
    with pytest.raises(FloraGraphError, match=r"adapter_config\.json"):
        export_seq2seq(root / "base", tmp_path / "out", {"x": root / "base"})
    assert not (tmp_path / "out").exists()


def test_package_config_and_cli_generate(seq2seq_packages: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from flora_graph.cli import main

    root = seq2seq_packages["bart"]
    doc = json.loads((root / "pkg" / SEQ2SEQ_CONFIG).read_text())
    assert doc["search"]["forced_bos_token_id"] == 0 and doc["search"]["forced_eos_token_id"] == 2
    assert doc["max_source_positions"] == doc["max_target_positions"] == 64
    marian = json.loads((seq2seq_packages["marian"] / "pkg" / SEQ2SEQ_CONFIG).read_text())
    assert marian["search"]["suppress_tokens"] == [99] and marian["decoder_start_token_id"] == 99
    assert main(["generate", str(root / "pkg"), "--ids", "5,9,33", "--adapter", "all", "--max-new-tokens", "8",
                 "--min-new-tokens", "8"]) == 0
    want = Seq2SeqGenerator(root / "pkg").generate([[5, 9, 33]], adapters="all", max_new_tokens=8, min_new_tokens=8)[0]
    out = capsys.readouterr().out
    assert " ".join(map(str, want)) in out and "8 tokens in" in out
    assert main(["generate", str(root / "pkg"), "--ids", "5,9", "--ids", "4,4", "--adapter", "all", "--adapter", "",
                 "--max-new-tokens", "4", "--min-new-tokens", "4"]) == 0
    rows = Seq2SeqGenerator(root / "pkg").generate([[5, 9], [4, 4]], adapters=["all", None], max_new_tokens=4,
                                                   min_new_tokens=4)
    out = capsys.readouterr().out
    assert f"[0] adapter all: {' '.join(map(str, rows[0]))}" in out and f"[1] adapter none: {' '.join(map(str, rows[1]))}" in out
    assert main(["generate", str(seq2seq_packages["whisper"] / "pkg"), "--ids", "5,9"]) == 2
    assert "speech model's package" in capsys.readouterr().out


QUICK = ("mbart",)
"""The family the default run decodes; the others (10-16 s each) run with the slow tests."""


@pytest.mark.parametrize("kind", [pytest.param(k, marks=() if k in QUICK else pytest.mark.slow) for k in ARCHITECTURES])
def test_more_families_generate_eager_peft_tokens(kind: str, tmp_path: Path) -> None:
    """mT5, UMT5, LongT5, mBART, Pegasus, PEGASUS-X (its projections run on local and global tokens), Blenderbot,
    M2M100, PLBart, FSMT, BigBird-Pegasus, NLLB-MoE (dense layers alone, and with expert layers: top-2 routing, its
    capacity a fraction of the tokens), Speech2Text (features, frames free), Moonshine (raw samples):
    PEFT's all-linear LoRA, the package's greedy tokens equal eager's, base and adapter."""
    architecture_matches_eager(tmp_path, kind)


def test_an_image_to_text_package_from_the_cli_reads_images_as_eager_peft(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """``flora-graph export BASE --task image-to-text-with-past``: Donut's layout (a Swin encoder over windows of the
    image, an mBART decoder), an adapter on every Linear; the package's greedy tokens for a batch of images equal eager
    transformers + PEFT ``generate`` on ``pixel_values``, base and adapter. The encoder's windows put the rows
    of 16 windows in its batch, where rows cannot pick adapters: the package has no mixed-adapter encoder, says why,
    and a batch mixing adapters is refused naming that. ``flora-graph generate PKG --image FILE`` reads an image file
    through the package's image processor."""
    import peft
    import transformers

    from flora_graph.cli import main
    from tests.serving.seq2seq_package import nonzero_b

    config_cls, model_cls, cfg = ARCHITECTURES["donut"]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    model.save_pretrained(tmp_path / "base")
    processor = transformers.DonutImageProcessor(size={"height": 32, "width": 32}, do_align_long_axis=False)
    processor.save_pretrained(tmp_path / "base")  # the package carries it: generate --image makes its pixels
    adapted = {}
    for name, targets in (("all", "all-linear"),):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one = peft.get_peft_model(getattr(transformers, model_cls).from_pretrained(tmp_path / "base"),
                                      peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        nonzero_b(one, seed=len(name))
        one.save_pretrained(tmp_path / name)
        adapted[name] = one.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(tmp_path / "base"), "--task", "image-to-text-with-past", "--adapter",
                     f"all={tmp_path / 'all'}", "--out",
                     str(tmp_path / "pkg")]) == 0
    doc = json.loads((tmp_path / "pkg" / SEQ2SEQ_CONFIG).read_text())
    assert doc["main_input"] == "pixel_values" and doc["feature_shape"] == [3, 32, 32]
    assert "encoder" in doc["unmixed"] and not (tmp_path / "pkg" / "encoder.mixed.onnx").exists()
    served = Seq2SeqGenerator(tmp_path / "pkg")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=NEW, min_new_tokens=NEW)
    rows = {}
    for name in (None, "all"):
        rows[name] = served.generate(images.numpy(), adapters=name, num_beams=1, **settings)
        eager = adapted[name or "all"]  # the base: PEFT's model with its adapter off
        with torch.no_grad(), warnings.catch_warnings(), (eager.disable_adapter() if name is None else nullcontext()):
            warnings.simplefilter("ignore")
            want = eager.generate(pixel_values=images, do_sample=False, num_beams=1, **settings)
        assert rows[name] == [r[-NEW:] for r in want.tolist()], name
    assert rows["all"] != rows[None]
    with pytest.raises(ServingError, match=r"encoder\.mixed\.onnx.*its encoder has none.*batch"):
        served.generate(images.numpy(), adapters=["all", None], max_new_tokens=2)
    # generate --image: a PNG file through the package's image processor, as transformers' processor reads it
    from PIL import Image

    page = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    page.save(tmp_path / "page.png")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "pkg"), "--image", str(tmp_path / "page.png"), "--adapter", "all",
                 "--max-new-tokens", "6", "--min-new-tokens", "6"]) == 0
    pixels = processor(images=page.convert("RGB"), return_tensors="np")["pixel_values"]
    want = served.generate(pixels, adapters="all", max_new_tokens=6, min_new_tokens=6)[0]
    out = capsys.readouterr().out
    assert f"page.png (adapter all): {' '.join(map(str, want))}" in out and "1 image, features included" in out
    assert main(["generate", str(tmp_path / "pkg"), "--ids", "5,9"]) == 2
    assert "an image model's package: give --image FILE" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "pkg"), "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "ServingError" in err and "No such file" in err


def test_a_package_without_adapters_generates_the_base(seq2seq_packages: dict[str, Path], tmp_path: Path) -> None:
    """``flora-graph export BASE --task text2text-generation-with-past`` with no ``--adapter``: its models have no
    LoRA inputs, and the package still serves the base (the Generator refused such a package before), with eager
    ``generate``'s tokens; naming an adapter is refused by name. An adapter file for a model without slots is an
    error naming the file."""
    from flora_graph.cli import main

    root = seq2seq_packages["t5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(root / "base"), "--task", "text2text-generation-with-past",
                     "--out", str(tmp_path / "plain")]) == 0
    gen = Seq2SeqGenerator(tmp_path / "plain")
    assert gen.adapter_names == []
    ours = gen.generate(PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW)
    assert ours == eager_tokens(root, "t5", None, PROMPTS, gen.pad, set(), max_new_tokens=NEW, min_new_tokens=NEW)
    with pytest.raises(UnknownAdapterError, match="'all'"):
        gen.generate(PROMPTS, adapters="all", max_new_tokens=2)
    (tmp_path / "plain" / "adapters").mkdir(exist_ok=True)
    shutil.copyfile(root / "pkg" / "adapters" / "all.decoder.onnx_adapter",
                    tmp_path / "plain" / "adapters" / "all.decoder.onnx_adapter")
    with pytest.raises(ServingError, match=r"no LoRA inputs.*all\.decoder\.onnx_adapter"):
        Seq2SeqGenerator(tmp_path / "plain")


def _wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    """``samples`` (floats in [-1, 1], each repeated on every channel) as a 16-bit PCM WAV file."""
    import wave

    pcm = np.repeat((samples * 32767).astype("<i2")[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return path


def test_cli_transcribes_wav_files_with_a_speech_package(seq2seq_packages: dict[str, Path], tmp_path: Path,
                                                         capsys) -> None:
    """``flora-graph generate PKG --audio F.wav``: the package's feature extractor (its preprocessor_config.json)
    turns each file into Whisper's frames, and each row's tokens are the Generator's on those frames (stereo read as
    the mean of its channels); a file at another rate, a text package and a speech package without audio are
    refused by name."""
    import transformers

    from flora_graph.cli import main
    from flora_graph.serving.audio import read_wav, speech_inputs

    pkg = tmp_path / "pkg"
    shutil.copytree(seq2seq_packages["whisper"] / "pkg", pkg)
    # the tiny model's 8 mel bins and 32 frames (16 positions, two frames each): one second at 500 samples a frame
    transformers.WhisperFeatureExtractor(feature_size=8, sampling_rate=16000, hop_length=500, chunk_length=1,
                                         n_fft=400).save_pretrained(pkg)
    t = np.arange(9000) / 16000
    mono = _wav(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 440 * t))
    stereo = _wav(tmp_path / "b.wav", 0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-3 * t), channels=2)
    samples, rate = read_wav(stereo)
    assert rate == 16000 and samples.shape == (9000,)
    assert main(["generate", str(pkg), "--audio", str(mono), "--audio", str(stereo), "--adapter", "", "--adapter",
                 "all", "--max-new-tokens", "6", "--min-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    gen = Seq2SeqGenerator(pkg)
    for i, (path, adapter) in enumerate([(mono, None), (stereo, "all")]):
        feats = speech_inputs(pkg, "input_features", *read_wav(path))
        assert feats.shape == (1, 8, 32)
        tokens = gen.generate(feats, adapters=adapter, max_new_tokens=6, min_new_tokens=6)[0]
        assert f"[{i}] {path} (adapter {adapter or 'none'}): {' '.join(map(str, tokens))}" in out
    # beam search, two hypotheses a file, printed as [file.hypothesis]
    assert main(["generate", str(pkg), "--audio", str(mono), "--adapter", "all", "--max-new-tokens", "6",
                 "--num-beams", "3", "--num-return-sequences", "2"]) == 0
    out = capsys.readouterr().out
    feats = speech_inputs(pkg, "input_features", *read_wav(mono))
    two = gen.generate(feats, adapters="all", max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert len(two) == 2 and two[0] != two[1]
    for j, tokens in enumerate(two):
        assert f"[0.{j}] {mono} (adapter all): {' '.join(map(str, tokens))}" in out
    _wav(tmp_path / "c.wav", 0.1 * np.sin(2 * np.pi * 440 * t), rate=8000)
    assert main(["generate", str(pkg), "--audio", str(tmp_path / "c.wav")]) == 2
    said = capsys.readouterr()
    assert "8000 Hz" in said.out + said.err and "16000 Hz" in said.out + said.err
    assert main(["generate", str(pkg), "--ids", "5,6"]) == 2
    assert main(["generate", str(seq2seq_packages["t5"] / "pkg"), "--audio", str(mono)]) == 2
    assert main(["generate", str(pkg), "--decoder-ids", "2", "--ids", "5"]) == 2
