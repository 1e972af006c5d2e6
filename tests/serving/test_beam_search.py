"""Beam search and the generation config's score rules against transformers: its logits processors on the same
scores, and eager transformers + PEFT ``generate(num_beams=...)`` on the encoder-decoder packages."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from flora_graph.serving.beam import Rules, banned_ngram_tokens, log_softmax, process_scores
from flora_graph.serving.generate import GenerationError, RowSettings
from flora_graph.serving.seq2seq import SEQ2SEQ_CONFIG, Seq2SeqGenerator
from tests.serving.seq2seq_package import PROMPTS, _cut, eager_model, eager_tokens

transformers = pytest.importorskip("transformers")

SEARCHES = {  # each a different path through the search: the default stop rule, early stopping, "never", min length
    "beams4": dict(num_beams=4),
    "early": dict(num_beams=3, length_penalty=2.0, early_stopping=True),
    "never-ngram": dict(num_beams=4, length_penalty=0.5, early_stopping="never", no_repeat_ngram_size=2),
    "short-penalty": dict(num_beams=2, length_penalty=-1.0, repetition_penalty=1.3),
}


@pytest.mark.parametrize("kind", ["t5", "bart", pytest.param("marian", marks=pytest.mark.slow)])  # Marian: BART's layout
@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("adapter", [None, "all"])
def test_beam_search_equals_eager_generate(seq2seq_packages: dict[str, Path], kind: str, search: str,
                                           adapter: str | None) -> None:
    """A padded batch of three inputs, 24 new tokens at most: the tokens of eager transformers + PEFT
    ``generate`` with the same beam settings (BART's forced first and last tokens and Marian's banned pad token
    included), inputs leaving the batch as their searches stop."""
    root = seq2seq_packages[kind]
    gen = Seq2SeqGenerator(root / "pkg")
    kw = SEARCHES[search]
    ours = gen.generate(PROMPTS, adapters=adapter, max_new_tokens=24, **kw)
    assert ours == eager_tokens(root, kind, adapter, PROMPTS, gen.pad, set(gen.eos), max_new_tokens=24, **kw)
    if search == "beams4":  # the search finds other tokens than greedy decoding
        assert ours != gen.generate(PROMPTS, adapters=adapter, max_new_tokens=24)


def test_beam_search_stops_inputs_at_different_steps(seq2seq_packages: dict[str, Path]) -> None:
    """T5's inputs finish at different lengths (their best hypotheses end with the end-of-text token), as eager's."""
    root = seq2seq_packages["t5"]
    gen = Seq2SeqGenerator(root / "pkg")
    kw = SEARCHES["never-ngram"]
    ours = gen.generate(PROMPTS, adapters="all", max_new_tokens=24, **kw)
    assert len({len(r) for r in ours}) == 3 and sum(r[-1] in gen.eos for r in ours) == 2
    assert ours == eager_tokens(root, "t5", "all", PROMPTS, gen.pad, set(gen.eos), max_new_tokens=24, **kw)


def test_whisper_beam_search_equals_eager_generate(seq2seq_packages: dict[str, Path]) -> None:
    root = seq2seq_packages["whisper"]
    gen = Seq2SeqGenerator(root / "pkg")
    feats = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    ours = gen.generate(feats.numpy(), adapters="all", max_new_tokens=16, num_beams=3)
    model = eager_model(root, "whisper", "all")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(input_features=feats, max_new_tokens=16, do_sample=False, num_beams=3)
    assert ours == [_cut(row, set(gen.eos)) for row in ref.tolist()]


@pytest.mark.parametrize("kind", ["bart", "whisper"])
def test_beam_search_rows_with_different_adapters_search_as_each_alone(seq2seq_packages: dict[str, Path],
                                                                        kind: str) -> None:
    """Inputs with different adapters (or none) in one beam search: the mixed-adapter models run every input's
    beams with its adapter, each input's tokens those of a search of its own."""
    root = seq2seq_packages[kind]
    gen = Seq2SeqGenerator(root / "pkg")
    names = ["all", None, "some"]
    if kind == "whisper":
        inputs = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(3)).numpy()
    else:
        inputs = PROMPTS
    mixed = gen.generate(inputs, adapters=names, max_new_tokens=16, num_beams=3)
    assert gen._mixed["decoder"] is not None
    for i, name in enumerate(names):
        assert mixed[i] == gen.generate(inputs[i:i + 1], adapters=name, max_new_tokens=16, num_beams=3)[0]


def test_a_package_searches_as_its_generation_config_says(tmp_path: Path) -> None:
    """A BART whose generation config asks for beams, a length penalty, early stopping, no repeated trigram and a
    minimum length (as bart-large-cnn's does): the package carries them, and its ``generate()`` with no settings
    gives eager ``generate()``'s tokens with none."""
    from flora_graph.cli import main
    from tests.serving.seq2seq_package import make_folders

    root = make_folders(tmp_path, "bart")
    base = transformers.BartForConditionalGeneration.from_pretrained(root / "base")
    base.generation_config.update(num_beams=4, length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=3,
                                  min_length=12, max_length=20, forced_bos_token_id=0)
    base.save_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(root / "base"), "--task", "text2text-generation-with-past", "--out",
                     str(root / "pkg"), "--adapter", f"all={root / 'all'}"]) == 0
    search = json.loads((root / "pkg" / SEQ2SEQ_CONFIG).read_text())["search"]
    assert {k: search[k] for k in ("num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size",
                                   "min_length")} == dict(num_beams=4, length_penalty=2.0, early_stopping=True,
                                                          no_repeat_ngram_size=3, min_length=12)
    gen = Seq2SeqGenerator(root / "pkg")
    assert gen.defaults["num_beams"] == 4 and gen.rules.min_length == 12
    import peft

    for adapter in (None, "all"):
        model = transformers.BartForConditionalGeneration.from_pretrained(root / "base").eval()
        if adapter:
            model = peft.PeftModel.from_pretrained(model, root / adapter).eval()
        ids = torch.tensor([PROMPTS[0]])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = model.generate(input_ids=ids, max_new_tokens=19).tolist()[0][1:]
        got = gen.generate([PROMPTS[0]], adapters=adapter, max_new_tokens=19)[0]
        assert got == _cut(want, set(gen.eos))
        assert len(got) >= 11  # min_length counts the decoder start token


def _settings(**kw) -> RowSettings:
    return RowSettings(**{"max_new_tokens": 8, "stop_tokens": frozenset({2}), **kw})


def test_score_rules_equal_transformers_processors() -> None:
    """:func:`process_scores` against transformers' own logits processors on the same scores and sequences: the
    repetition penalty, no repeated n-grams, the minimum length, forced first and last tokens, suppressed tokens."""
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(0)
    vocab = 30
    seq = [0, 5, 6, 7, 5, 6, 9, 5]
    scores = rng.standard_normal(vocab).astype(np.float32)

    def theirs(*procs) -> np.ndarray:
        out = torch.tensor(scores)[None]
        ids = torch.tensor([seq])
        for p in procs:
            out = p(ids, out)
        return out[0].numpy()

    s = _settings(repetition_penalty=1.5, no_repeat_ngram_size=3)
    want = theirs(lp.RepetitionPenaltyLogitsProcessor(1.5), lp.NoRepeatNGramLogitsProcessor(3))
    np.testing.assert_array_equal(process_scores(scores, seq, 1, s, {2}), want)
    for n in (1, 2, 3, 9, 10):
        want = theirs(lp.NoRepeatNGramLogitsProcessor(n))
        assert banned_ngram_tokens(seq, n) == np.flatnonzero(np.isinf(want)).tolist()
    rules = Rules(min_length=9, suppress=np.array([3, 4]))
    want = theirs(lp.MinLengthLogitsProcessor(9, [2, 11]), lp.SuppressTokensLogitsProcessor([3, 4]))
    np.testing.assert_array_equal(process_scores(scores, seq, 1, _settings(), {2, 11}, rules), want)
    # the last of max_new_tokens: 7 new tokens after a 1-token prompt, 8 at most (transformers: max_length 9)
    want = theirs(lp.ForcedEOSTokenLogitsProcessor(9, 2))
    got = process_scores(scores, seq, 1, _settings(max_new_tokens=8), {2}, Rules(forced_eos=2))
    np.testing.assert_array_equal(got, want)
    want = theirs(lp.ForcedBOSTokenLogitsProcessor(7))
    assert np.array_equal(want, scores)  # not the first step: nothing forced
    got = process_scores(scores, [0], 1, _settings(), {2}, Rules(forced_bos=7))
    assert got.argmax() == 7 and np.isinf(np.delete(got, 7)).all()
    untouched = process_scores(scores, seq, 1, _settings(), {2})
    assert untouched is scores  # nothing to change: no copy


def test_log_softmax_equals_torch() -> None:
    x = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32) * 8
    np.testing.assert_allclose(log_softmax(x), torch.log_softmax(torch.tensor(x), -1).numpy(), rtol=0, atol=2e-6)


def test_bad_beam_settings_are_refused_naming_them(seq2seq_packages: dict[str, Path]) -> None:
    gen = Seq2SeqGenerator(seq2seq_packages["bart"] / "pkg")
    for kw, msg in [(dict(num_beams=0), "num_beams must be an int >= 1"),
                    (dict(num_beams=2.5), "num_beams must be an int"),
                    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an int >= 0"),
                    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
                    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
                    (dict(num_beams=2, do_sample=True), "beam search here is greedy")]:
        with pytest.raises(GenerationError, match=msg):
            gen.generate(PROMPTS, **kw)
    assert len(gen.generate(PROMPTS[:1], num_beams=2, max_new_tokens=3)[0]) == 3  # still serving



def _eager_causal(model, prompt: list[int], stops: list[int], **kwargs) -> list[int]:
    """Eager ``generate`` after ``prompt`` stopping on ``stops``, cut after the first of them."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, eos_token_id=stops, **kwargs)
    return _cut(out[0, len(prompt):].tolist(), set(stops))


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("adapter", [None, "all7", "qdown"])
def test_decoder_beam_search_equals_eager_generate(folders: Path, package: Path, search: str,
                                                   adapter: str | None) -> None:
    """The GenAI package's Llama (its caches right-padded buffers that ``GroupQueryAttention`` appends to): eager
    transformers + PEFT ``generate`` with the same beam settings, stopping on a token its hypotheses reach."""
    import peft

    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import PROMPT

    gen = Generator(package)
    kw = SEARCHES[search]
    full = gen.generate([PROMPT], adapters=adapter, max_new_tokens=20, stop_tokens=[], **kw)[0]
    stops = [full[len(full) // 2]]  # a token the best hypothesis reaches half-way
    model = transformers.LlamaForCausalLM.from_pretrained(folders / "base").eval()
    if adapter:
        model = peft.PeftModel.from_pretrained(model, folders / adapter).eval()
    want = _eager_causal(model, PROMPT, stops, max_new_tokens=20, **kw)
    assert gen.generate([PROMPT], adapters=adapter, max_new_tokens=20, stop_tokens=stops, **kw)[0] == want
    assert gen.generate([PROMPT], adapters=adapter, max_new_tokens=20, min_new_tokens=20, **kw)[0] == \
        _eager_causal(model, PROMPT, [2], max_new_tokens=20, min_new_tokens=20, **kw)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "Lfm2ForCausalLM"])
def test_decoder_beam_search_reorders_every_kind_of_cache(arch: str, tmp_path: Path) -> None:
    """GPT-2 (a left-padded cache) and LFM2 (short-convolution states beside its keys and values): two prompts,
    each its own search, as eager PEFT ``generate``."""
    from flora_graph.cli import main
    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import tiny_with_adapter

    model, adapted = tiny_with_adapter(arch, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(tmp_path / "base"), "--task", "text-generation-with-past", "--format", "genai",
                     "--adapter", f"a={tmp_path / 'ad'}", "--out", str(tmp_path / "pkg")]) == 0
    gen = Generator(tmp_path / "pkg")
    prompts = [[1, 5, 9, 33, 70, 12], [4, 8]]
    got = gen.generate(prompts, adapters=["a", None], max_new_tokens=16, stop_tokens=[2], **SEARCHES["never-ngram"])
    for prompt, row, eager in zip(prompts, got, [adapted, model], strict=True):
        assert row == _eager_causal(eager, prompt, [2], max_new_tokens=16, **SEARCHES["never-ngram"])


def test_a_batch_refuses_beams_and_generate_checks_every_prompt_first(package: Path) -> None:
    from flora_graph.serving.errors import UnknownAdapterError
    from flora_graph.serving.generate import Generator

    gen = Generator(package)
    batch = gen.batch()
    with pytest.raises(GenerationError, match="a Batch steps each row on its own"):
        batch.add([1, 5, 9], num_beams=2)
    with pytest.raises(UnknownAdapterError, match=r"prompt 1: .*'nope'"):
        gen.generate([[1, 5], [1, 6]], adapters=["all7", "nope"], num_beams=2)
    with pytest.raises(GenerationError, match="prompt 0: prompt of 250 tokens"):
        gen.generate([[1] * 250], num_beams=2, max_new_tokens=10)
    assert not batch.active


def test_cli_generate_with_beams(package: Path, capsys: pytest.CaptureFixture) -> None:
    """``flora-graph generate --num-beams ...`` prints each prompt's best hypothesis, the Generator's."""
    from flora_graph.cli import main
    from flora_graph.serving.generate import Generator

    flags = ["--num-beams", "3", "--length-penalty", "0.5", "--early-stopping", "never", "--no-repeat-ngram-size", "2",
             "--max-new-tokens", "12", "--ignore-eos"]
    assert main(["generate", str(package), "--ids", "1,5,9,33", "--ids", "1,7", "--adapter", "all7", *flags]) == 0
    want = Generator(package).generate([[1, 5, 9, 33], [1, 7]], adapters="all7", num_beams=3, length_penalty=0.5,
                                       early_stopping="never", no_repeat_ngram_size=2, max_new_tokens=12,
                                       stop_tokens=[])
    out = capsys.readouterr().out
    for i, row in enumerate(want):  # token ids in, token ids out
        assert f"[{i}] adapter all7: {' '.join(map(str, row))}" in out
    assert "24 tokens in" in out
    assert want[0] != Generator(package).generate([[1, 5, 9, 33]], adapters="all7", max_new_tokens=12,
                                                  stop_tokens=[])[0]
    with pytest.raises(SystemExit):
        main(["generate", str(package), "--ids", "1,5", "--early-stopping", "maybe"])
    assert main(["generate", str(package), "--ids", "1,5,9,33", "--adapter", "all7", *flags,
                 "--num-return-sequences", "2"]) == 0
    out = capsys.readouterr().out
    two = Generator(package).generate([[1, 5, 9, 33]], adapters="all7", num_beams=3, length_penalty=0.5,
                                      early_stopping="never", no_repeat_ngram_size=2, max_new_tokens=12,
                                      stop_tokens=[], num_return_sequences=2)
    assert two[0] == want[0] and two[1] != two[0]
    for j, row in enumerate(two):
        assert f"[0.{j}] adapter all7: {' '.join(map(str, row))}" in out
    assert "2 rows, prompt 4 tokens" in out


@pytest.mark.parametrize("adapter", [None, "all7"])
def test_decoder_beam_search_equals_onnxruntime_genai(package: Path, adapter: str | None) -> None:
    """ONNX Runtime GenAI's own beam search on the same package (the adapter loaded from its file): the same tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai does not import on this platform")
    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import PROMPT, genai_tokens

    model = og.Model(str(package))
    adapters = og.Adapters(model)
    adapters.load(str(package / "adapters" / "all7.onnx_adapter"), "all7")
    for kw in (dict(num_beams=4), dict(num_beams=3, length_penalty=2.0, early_stopping=True)):
        theirs = genai_tokens(model, PROMPT, 16, adapters, adapter, **kw)
        ours = Generator(package).generate([PROMPT], adapters=adapter, max_new_tokens=16, min_new_tokens=16, **kw)[0]
        assert ours == theirs


def test_several_sequences_per_input_as_eager_returns_them(seq2seq_packages: dict[str, Path], folders: Path,
                                                           package: Path) -> None:
    """``num_return_sequences``: beam search's best hypotheses per input, best first, as eager ``generate`` returns
    them (encoder-decoder and decoder); sampling draws that many rows per input; greedy search refuses more than one."""
    import peft

    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import PROMPT

    root = seq2seq_packages["t5"]
    gen = Seq2SeqGenerator(root / "pkg")
    kw = dict(num_beams=4, num_return_sequences=3, max_new_tokens=12)
    ours = gen.generate(PROMPTS, adapters="all", **kw)
    assert len(ours) == 3 * len(PROMPTS) and len({tuple(r) for r in ours[:3]}) == 3
    assert ours == eager_tokens(root, "t5", "all", PROMPTS, gen.pad, set(gen.eos), **kw)
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(folders / "base"),
                                           folders / "all7").eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                              do_sample=False, min_new_tokens=10, **{**kw, "max_new_tokens": 10})
    got = Generator(package).generate([PROMPT], adapters="all7", min_new_tokens=10, **{**kw, "max_new_tokens": 10})
    assert got == want[:, len(PROMPT):].tolist()
    drawn = gen.generate(PROMPTS[:2], do_sample=True, num_return_sequences=3, seed=1, max_new_tokens=6, top_k=20)
    assert len(drawn) == 6 and drawn[3:] == gen.generate(PROMPTS[1:2], do_sample=True, num_return_sequences=3, seed=4,
                                                         max_new_tokens=6, top_k=20)
    with pytest.raises(GenerationError, match="at most num_beams=1"):
        gen.generate(PROMPTS, num_return_sequences=2)
    with pytest.raises(GenerationError, match="at most num_beams=2"):
        Generator(package).generate([PROMPT], num_beams=2, num_return_sequences=3)
    with pytest.raises(GenerationError, match="a Batch row is one sequence"):
        Generator(package).batch().add(PROMPT, do_sample=True, num_return_sequences=2)
    assert len(Generator(package).generate([PROMPT, PROMPT[:3]], do_sample=True, num_return_sequences=2,
                                           max_new_tokens=4)) == 4


def test_generation_settings_a_package_does_not_apply_are_reported(tmp_path: Path) -> None:
    """Settings of the generation config that change the tokens and that the package does not carry (group beam
    search, typical sampling, a banned word of two tokens) are named in the export's notes; those it carries are
    not."""
    from flora_graph.serving.beam import unapplied_settings
    from flora_graph.serving.seq2seq import SEQ2SEQ_APPLIED, export_seq2seq
    from tests.serving.seq2seq_package import make_folders

    gc = transformers.GenerationConfig(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, typical_p=0.9,
                                       no_repeat_ngram_size=3, bad_words_ids=[[5], [6, 7]], max_length=40)
    assert unapplied_settings(gc, SEQ2SEQ_APPLIED) == ["typical_p=0.9", "num_beam_groups=2", "diversity_penalty=0.5",
                                                       "bad_words_ids=[[6, 7]] (sequences of several tokens)"]
    assert unapplied_settings(transformers.GenerationConfig(), SEQ2SEQ_APPLIED) == []
    assert unapplied_settings(None, SEQ2SEQ_APPLIED) == []
    root = make_folders(tmp_path, "marian")
    model = transformers.MarianMTModel.from_pretrained(root / "base")
    model.generation_config.update(typical_p=0.9, do_sample=True, num_beams=4)
    model.save_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_seq2seq(root / "base", tmp_path / "pkg")
    assert any("typical_p=0.9" in n and "not applied" in n for n in report.notes)
    assert any("num_beams=4 with do_sample=True (beam sampling" in n for n in report.notes)
    gen = Seq2SeqGenerator(tmp_path / "pkg")
    assert gen.defaults["num_beams"] == 1 and gen.defaults["do_sample"]  # it samples by default, one hypothesis
    assert len(gen.generate(PROMPTS[:1], max_new_tokens=4, min_new_tokens=4, seed=0)[0]) == 4


@pytest.mark.parametrize("mixed", [True, False])
def test_decoder_prompts_search_together_as_each_alone(package: Path, mixed: bool) -> None:
    """Prompts of different lengths and adapters searching in one call a step (the right-padded Llama's caches; with
    ``mixed=False`` one call per adapter): each prompt's hypotheses those of its search alone, stopping at different
    steps."""
    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import PROMPT

    gen = Generator(package, mixed=mixed)
    prompts = [PROMPT, [1, 7], [1, 9, 4, 4, 8, 30, 31, 2, 5, 6], PROMPT[:4]]
    names = ["all7", None, "qdown", "all7"]
    kw = dict(SEARCHES["never-ngram"], max_new_tokens=14, num_return_sequences=2)
    alone = [gen.generate([p], adapters=a, **kw) for p, a in zip(prompts, names, strict=True)]
    stops = [alone[0][0][5], alone[2][0][3]]
    alone = [gen.generate([p], adapters=a, stop_tokens=stops, **kw) for p, a in zip(prompts, names, strict=True)]
    together = gen.generate(prompts, adapters=names, stop_tokens=stops, **kw)
    assert together == [h for hyps in alone for h in hyps]
    assert len({len(hyps[0]) for hyps in alone}) > 1  # the searches stopped at different steps


def test_top_continuations_equal_a_full_sort() -> None:
    """The top ``k`` of each row, by every path (a full sort, a partition, the blocks of highest maximum over a long
    row): a stable full sort's, values and indices (ties kept off the cut)."""
    from flora_graph.serving.beam import _top

    rng = np.random.default_rng(0)
    for n, k in [(7, 5), (300, 8), (2048, 8), (4 * 32128, 8), (5000, 16), (70000, 2)]:
        x = rng.permutation(n * 3).reshape(3, n).astype(np.float32)  # distinct values
        x[:, 1] = x[:, 0]  # a tie, kept first if among the top: lowest index first
        np.testing.assert_array_equal(_top(x, k), np.argsort(-x, axis=1, kind="stable")[:, :k])


def test_cli_generate_searches_an_encoder_decoder_package(seq2seq_packages: dict[str, Path],
                                                          capsys: pytest.CaptureFixture) -> None:
    """``flora-graph generate`` with beam search flags on a text encoder-decoder package: each input's best
    hypothesis, the Seq2SeqGenerator's (``--encoder-no-repeat-ngram-size`` included)."""
    from flora_graph.cli import main

    pkg = seq2seq_packages["bart"] / "pkg"
    assert main(["generate", str(pkg), "--ids", "5,9,33,70", "--ids", "7,3", "--adapter", "all", "--num-beams", "3",
                 "--no-repeat-ngram-size", "2", "--encoder-no-repeat-ngram-size", "2", "--max-new-tokens", "10"]) == 0
    want = Seq2SeqGenerator(pkg).generate([[5, 9, 33, 70], [7, 3]], adapters="all", num_beams=3, no_repeat_ngram_size=2,
                                          encoder_no_repeat_ngram_size=2, max_new_tokens=10)
    out = capsys.readouterr().out
    for i, row in enumerate(want):
        assert f"[{i}] adapter all: {' '.join(map(str, row))}" in out
