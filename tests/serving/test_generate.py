"""The Generator on plain ONNX Runtime: eager PEFT's greedy tokens per row, mixed adapters, rows joining and leaving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from flora_graph.serving import INDEX_INPUT
from flora_graph.serving.errors import UnknownAdapterError
from flora_graph.serving.generate import GenerationError, Generator
from tests.serving.genai_package import eager_tokens

PROMPTS = [[1, 5, 9, 33, 70, 12], [1, 7, 3], [1, 100, 101, 102, 103, 104, 105, 106, 107]]


@pytest.fixture(scope="module")
def gen(package: Path) -> Generator:
    return Generator(package)


def test_mixed_adapter_batch_of_prompts_of_different_lengths_equals_eager_rows(gen: Generator, folders: Path) -> None:
    adapters = [None, "all7", "qdown"]
    got = gen.generate(PROMPTS, adapters=adapters, max_new_tokens=32, stop_tokens=[])
    for prompt, adapter, tokens in zip(PROMPTS, adapters, got, strict=True):
        assert tokens == eager_tokens(folders, adapter, prompt), adapter


def test_mixed_rows_gathered_in_every_step_give_the_same_tokens(gen: Generator, package: Path, folders: Path) -> None:
    every_step = Generator(package, per_row_weights=False, group_rows=False)
    assert INDEX_INPUT in every_step._mixed.model.inputs and INDEX_INPUT not in gen._mixed.model.inputs
    adapters = ["qdown", None, "all7"]
    got = every_step.generate(PROMPTS[:2] + PROMPTS[:1], adapters=adapters, max_new_tokens=12, stop_tokens=[])
    assert got == gen.generate(PROMPTS[:2] + PROMPTS[:1], adapters=adapters, max_new_tokens=12, stop_tokens=[])
    assert got[2] == eager_tokens(folders, "all7", PROMPTS[0], 12)


def test_rows_sharing_adapters_decode_alike_grouped_or_per_row(gen: Generator, package: Path, folders: Path) -> None:
    """The default mixed model runs the rows of one adapter together (``group_rows``); per-row weights give the same
    tokens, each row eager PEFT's, with rows of no adapter among them and prompts of different lengths."""
    from flora_graph.serving.grouped import PLACES_INPUT

    per_row = Generator(package, group_rows=False)
    assert PLACES_INPUT in gen._mixed.model.inputs and PLACES_INPUT not in per_row._mixed.model.inputs
    prompts = [PROMPTS[i % 3] for i in range(7)]
    adapters = ["all7", None, "all7", "qdown", "all7", None, "qdown"]
    got = gen.generate(prompts, adapters=adapters, max_new_tokens=10, min_new_tokens=10)  # eos held back, as eager
    assert got == per_row.generate(prompts, adapters=adapters, max_new_tokens=10, min_new_tokens=10)
    for prompt, adapter, tokens in zip(prompts[:4], adapters[:4], got[:4], strict=True):
        assert tokens == eager_tokens(folders, adapter, prompt, 10), adapter


def test_step_arrays_in_huge_page_mappings_give_eager_tokens(package: Path, folders: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step array laid out by ``huge_pages.zeros`` (its threshold at 0 here: this package's arrays are far under
    a huge page) in mappings of their own: the rows' adapter weights and the caches there, each row's tokens are
    eager PEFT's, as with ``huge_pages=False`` (plain numpy arrays)."""
    import mmap

    from flora_graph.runtimes import huge_pages

    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    backed, plain = Generator(package), Generator(package, huge_pages=False)
    adapters = ["qdown", None, "all7"]  # no two rows share an adapter: the mixed model's per-row session serves them
    assert backed._mixed.model_for(adapters) is not backed._mixed.model
    assert not any(m.huge_pages.reason == "not asked for"
                   for m in (backed._single.model, backed._mixed.model, backed._mixed.model_for(adapters)))
    assert all(m.huge_pages.reason == "not asked for"
               for m in (plain._single.model, plain._mixed.model, plain._mixed.model_for(adapters)))
    batch = backed.batch()
    batch.add_many(PROMPTS, adapters=adapters, max_new_tokens=9, min_new_tokens=9)  # eos held back, as eager
    _, inputs = backed._mixed.adapter_inputs(adapters)

    def mapped(a) -> bool:
        while a.base is not None and not isinstance(a.base, memoryview):
            a = a.base
        return isinstance(a.base, memoryview) and isinstance(a.base.obj, mmap.mmap)

    weights = [v for k, v in inputs.items() if k.endswith(".rows")]
    assert weights and all(mapped(v) for v in weights) and all(mapped(c) for c in batch.shared.arrays)
    _, sharing = backed._mixed.adapter_inputs(["all7", None, "all7"])  # rows that share one: grouped, once each
    groups = [v for k, v in sharing.items() if k.endswith(".groups")]
    assert groups and all(mapped(v) for v in groups)
    _, single = backed._single.adapter_inputs("all7")  # one adapter's weights for the one-adapter model: one block
    ptrs = sorted(v.data_ptr() for v in single.values())
    assert len(ptrs) > 2 and ptrs[-1] - ptrs[0] < sum(int(np.prod(v.shape())) * 4 + 64 for v in single.values())
    while batch.active:
        batch.step()
    got = [batch.row(r).generated for r in range(3)]
    assert got == plain.generate(PROMPTS, adapters=adapters, max_new_tokens=9, min_new_tokens=9)
    for prompt, adapter, tokens in zip(PROMPTS, adapters, got, strict=True):
        assert tokens == eager_tokens(folders, adapter, prompt, 9), adapter


def test_prompts_added_together_are_prefilled_in_one_call(gen: Generator, folders: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``add_many`` on a right-padded package: one model call prefills every prompt (right-padded to the longest),
    joining rows already decoding; each row's tokens are eager PEFT's, and a row done on its first token finishes."""
    assert gen.right_padded
    calls = []
    run = gen._run
    monkeypatch.setattr(gen, "_run", lambda feeds, adapters: calls.append(feeds["input_ids"].shape) or run(feeds, adapters))
    batch = gen.batch()
    first = batch.add(PROMPTS[1], adapter="qdown", max_new_tokens=10, min_new_tokens=10)  # eos held back, as eager
    batch.step()
    calls.clear()
    ids = batch.add_many([PROMPTS[2], PROMPTS[0], PROMPTS[1]], adapters=["all7", None, "qdown"], max_new_tokens=10,
                         min_new_tokens=10)
    assert calls == [(3, 9)]  # one call, the three prompts padded to the longest
    once = batch.add_many([PROMPTS[0], PROMPTS[1]], adapters=[None, "all7"], max_new_tokens=1, min_new_tokens=1)
    assert [batch.row(r).done for r in once] == [True, True] and not set(once) & set(batch.active)
    while batch.active:
        batch.step()
    for rid, prompt, adapter in zip(ids, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], ["all7", None, "qdown"], strict=True):
        assert batch.row(rid).generated == eager_tokens(folders, adapter, prompt, 10), adapter
    assert batch.row(first).generated == eager_tokens(folders, "qdown", PROMPTS[1], 10)
    assert [batch.row(r).generated for r in once] == [eager_tokens(folders, None, PROMPTS[0], 1),
                                                      eager_tokens(folders, "all7", PROMPTS[1], 1)]


def test_a_bad_prompt_among_several_is_refused_naming_it_before_anything_changes(gen: Generator) -> None:
    batch = gen.batch()
    a = batch.add(PROMPTS[0], max_new_tokens=4, stop_tokens=[])
    with pytest.raises(GenerationError, match="prompt 1: prompt is empty"):
        batch.add_many([PROMPTS[1], [], PROMPTS[2]], max_new_tokens=4, stop_tokens=[])
    with pytest.raises(UnknownAdapterError, match="prompt 2: adapter 'nope'"):
        batch.add_many([PROMPTS[1], PROMPTS[0], PROMPTS[2]], adapters=[None, "all7", "nope"])
    with pytest.raises(GenerationError, match="2 prompts, 1 adapter names"):
        batch.add_many([PROMPTS[1], PROMPTS[0]], adapters=[None])
    assert batch.active == [a]
    batch.step()
    assert len(batch.row(a).generated) == 2


def test_rows_join_and_leave_between_steps(gen: Generator, folders: Path) -> None:
    batch = gen.batch()
    a = batch.add(PROMPTS[0], adapter="all7", max_new_tokens=12, stop_tokens=[])
    for _ in range(3):
        batch.step()
    b = batch.add(PROMPTS[2], adapter=None, max_new_tokens=12, stop_tokens=[])  # joins with a longer history
    batch.step()
    c = batch.add(PROMPTS[1], adapter="qdown", max_new_tokens=6, stop_tokens=[])
    batch.step()
    batch.remove(b)  # leaves early: the others go on, the cache is trimmed
    while batch.active:
        batch.step()
    assert batch.row(a).generated == eager_tokens(folders, "all7", PROMPTS[0], 12)
    assert batch.row(c).generated == eager_tokens(folders, "qdown", PROMPTS[1], 6)
    assert batch.row(b).generated == eager_tokens(folders, None, PROMPTS[2], 6)[: len(batch.row(b).generated)]


def test_stop_tokens_streaming_and_seeded_sampling(gen: Generator, folders: Path) -> None:
    want = eager_tokens(folders, None, PROMPTS[0], 8)
    stop = want[3]
    streamed: list[tuple[int, int]] = []
    got = gen.generate([PROMPTS[0]], stop_tokens=[stop], max_new_tokens=8, on_token=lambda r, t: streamed.append((r, t)))
    assert got == [want[: want.index(stop) + 1]]
    assert [t for _, t in streamed] == got[0]
    alone = gen.generate([PROMPTS[0]], do_sample=True, seed=7, top_k=20, top_p=0.9, max_new_tokens=10, stop_tokens=[])
    with_others = gen.generate([PROMPTS[0], PROMPTS[1]], do_sample=True, seed=7, top_k=20, top_p=0.9,
                               max_new_tokens=10, stop_tokens=[])
    assert with_others[0] == alone[0]  # a seeded row draws the same tokens whatever shares its batch
    assert alone[0] != eager_tokens(folders, None, PROMPTS[0], 10)  # and it did sample


def test_a_sampled_row_joining_greedy_rows_samples_and_they_stay_greedy(gen: Generator, folders: Path) -> None:
    sampling = {"do_sample": True, "seed": 7, "top_k": 20, "top_p": 0.9, "max_new_tokens": 10, "stop_tokens": []}
    alone = gen.generate([PROMPTS[1]], **sampling)[0]
    assert alone != eager_tokens(folders, None, PROMPTS[1], 10)
    batch = gen.batch()
    a = batch.add(PROMPTS[0], adapter="all7", max_new_tokens=14, stop_tokens=[])
    for _ in range(3):  # an all-greedy batch: one argmax for the rows
        batch.step()
    s = batch.add(PROMPTS[1], **sampling)
    while batch.active:
        batch.step()
    assert batch.row(s).generated == alone
    assert batch.row(a).generated == eager_tokens(folders, "all7", PROMPTS[0], 14)


def test_min_new_tokens_holds_the_stop_tokens_back_as_eager_does(gen: Generator, folders: Path) -> None:
    free = gen.generate([PROMPTS[2]], adapters="all7", max_new_tokens=14, stop_tokens=[])[0]
    assert free[0] == 2  # the end-of-text token is this row's argmax: what min_new_tokens must hold back
    want = eager_tokens(folders, "all7", PROMPTS[2], 14)  # transformers' min_new_tokens = 14
    assert want[0] != 2
    got = gen.generate([PROMPTS[2], PROMPTS[0]], adapters=["all7", "qdown"], min_new_tokens=14, max_new_tokens=14)
    assert got == [want, eager_tokens(folders, "qdown", PROMPTS[0], 14)]
    for bad in (-1, 15, True, 2.0):
        with pytest.raises(GenerationError, match="min_new_tokens"):
            gen.generate([PROMPTS[0]], min_new_tokens=bad, max_new_tokens=14)


def test_a_row_done_on_its_first_token_generates_nothing_more(gen: Generator, folders: Path) -> None:
    assert gen.generate([PROMPTS[0]], max_new_tokens=1, stop_tokens=[]) == [eager_tokens(folders, None, PROMPTS[0], 1)]
    want = eager_tokens(folders, "qdown", PROMPTS[0], 6)
    want = want[: want.index(2) + 1] if 2 in want else want
    # all7's first token after PROMPTS[2] is the end-of-text token (see the min_new_tokens test): that row ends there
    got = gen.generate([PROMPTS[2], PROMPTS[0]], adapters=["all7", "qdown"], max_new_tokens=6, stop_tokens=[2])
    assert got == [[2], want]
    batch = gen.batch()
    a = batch.add(PROMPTS[1], max_new_tokens=1, stop_tokens=[])
    b = batch.add(PROMPTS[0], max_new_tokens=3, stop_tokens=[])
    assert batch.active == [b]
    while batch.active:
        batch.step()
    assert batch.row(a).generated == eager_tokens(folders, None, PROMPTS[1], 1)
    assert batch.row(b).generated == eager_tokens(folders, None, PROMPTS[0], 3)


def test_adapters_load_replace_and_unload_while_serving(package: Path, folders: Path, tmp_path: Path) -> None:
    import shutil

    from flora_graph.serving.errors import AdapterFileError, ServingError

    gen = Generator(package)
    files = package / "adapters"
    gen.load_adapter("extra", files / "qdown.onnx_adapter")
    assert gen.adapter_names == ["all7", "qdown", "extra"]
    adapters = ["extra", "all7", None]
    got = gen.generate(PROMPTS, adapters=adapters, max_new_tokens=10, stop_tokens=[])  # a mixed batch
    assert got == [eager_tokens(folders, a, p, 10) for p, a in zip(PROMPTS, ["qdown", "all7", None], strict=True)]
    batch = gen.batch()
    row = batch.add(PROMPTS[0], adapter="extra", max_new_tokens=8, stop_tokens=[])
    with pytest.raises(ServingError, match="already served"):
        gen.load_adapter("extra", files / "all7.onnx_adapter")
    gen.load_adapter("extra", files / "all7.onnx_adapter", replace=True)  # the row decodes on with the new weights
    assert gen.generate([PROMPTS[1]], adapters="extra", max_new_tokens=10, stop_tokens=[])[0] == \
        eager_tokens(folders, "all7", PROMPTS[1], 10)
    while batch.active:
        batch.step()
    assert batch.row(row).generated[:1] == eager_tokens(folders, "qdown", PROMPTS[0], 1)
    # a truncated file (its checksum no longer matches): refused, and what was served still is
    cut = tmp_path / "cut.onnx_adapter"
    shutil.copyfile(files / "all7.onnx_adapter", cut)
    shutil.copyfile(files / "all7.onnx_adapter.sha256", tmp_path / "cut.onnx_adapter.sha256")
    cut.write_bytes(cut.read_bytes()[:-16])
    with pytest.raises(AdapterFileError, match="'bad'"):
        gen.load_adapter("bad", cut)
    assert gen.adapter_names == ["all7", "qdown", "extra"]
    assert gen.generate([PROMPTS[0], PROMPTS[1]], adapters=["extra", "qdown"], max_new_tokens=6, stop_tokens=[]) == \
        [eager_tokens(folders, "all7", PROMPTS[0], 6), eager_tokens(folders, "qdown", PROMPTS[1], 6)]
    batch = gen.batch()  # unloaded while rows decode with it: they finish with an error, the others go on
    gone = [batch.add(PROMPTS[0], adapter="extra", max_new_tokens=9, stop_tokens=[]),
            batch.add(PROMPTS[1], adapter="extra", max_new_tokens=9, stop_tokens=[])]
    kept = batch.add(PROMPTS[2], adapter="qdown", max_new_tokens=9, stop_tokens=[])
    batch.step()
    gen.unload_adapter("extra")
    assert list(batch.step()) == [kept] and batch.active == [kept]
    assert all("'extra' stopped being served" in batch.row(r).error and len(batch.row(r).generated) == 2 for r in gone)
    while batch.active:
        batch.step()
    assert batch.row(kept).generated == eager_tokens(folders, "qdown", PROMPTS[2], 9) and batch.row(kept).error is None
    with pytest.raises(UnknownAdapterError, match="'extra'"):
        gen.generate([PROMPTS[0]], adapters="extra")
    with pytest.raises(UnknownAdapterError, match="'extra'"):
        gen.unload_adapter("extra")
    assert gen.generate([PROMPTS[0], PROMPTS[1]], adapters=["all7", None], max_new_tokens=6, stop_tokens=[]) == \
        [eager_tokens(folders, "all7", PROMPTS[0], 6), eager_tokens(folders, None, PROMPTS[1], 6)]


def test_bad_requests_name_the_culprit_and_the_batch_keeps_serving(gen: Generator, folders: Path) -> None:
    batch = gen.batch()
    a = batch.add(PROMPTS[0], adapter="all7", max_new_tokens=5, stop_tokens=[])
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        batch.add(PROMPTS[1], adapter="nope")
    with pytest.raises(GenerationError, match="context length 256"):
        batch.add([1] * 250, max_new_tokens=10)
    with pytest.raises(GenerationError, match="empty"):
        batch.add([])
    with pytest.raises(GenerationError, match="temperature"):
        batch.add(PROMPTS[1], do_sample=True, temperature=0.0)
    while batch.active:
        batch.step()
    assert batch.row(a).generated == eager_tokens(folders, "all7", PROMPTS[0], 5)


def test_generate_command_prints_text_and_speed(package: Path, folders: Path, capsys: pytest.CaptureFixture) -> None:
    from flora_graph.cli import main

    assert (package / "tokenizer.json").is_file()  # copied from the base folder
    prompt = " ".join(f"w{t}" for t in PROMPTS[0][1:])
    assert main(["generate", str(package), "--prompt", prompt, "--adapter", "all7", "--max-new-tokens", "8",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    ids = [t for t in eager_tokens(folders, "all7", PROMPTS[0][1:], 8)]
    words = " ".join("" if t < 3 else f"w{t}" for t in ids).split()
    assert out.splitlines()[0].split() == words
    assert "tokens/s" in out and "adapter all7" in out
    assert main(["generate", str(package), "--ids", "1,5", "--adapter", "nope"]) == 2
    assert "adapter 'nope' is not in package" in capsys.readouterr().err
    assert main(["generate", str(package), "--ids", "1,5", "--min-new-tokens", "9", "--max-new-tokens", "8"]) == 2
    assert "--min-new-tokens 9 is more than --max-new-tokens 8" in capsys.readouterr().out
    ids = ",".join(map(str, PROMPTS[2]))  # the end-of-text token would come first (see the min_new_tokens test)
    assert main(["generate", str(package), "--ids", ids, "--adapter", "all7", "--min-new-tokens", "6",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [str(t) for t in eager_tokens(folders, "all7", PROMPTS[2], 6)]


def test_generate_command_decodes_a_mixed_adapter_batch(package: Path, folders: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from flora_graph.cli import main

    rows = [(PROMPTS[0], "all7"), (PROMPTS[1], None), (PROMPTS[2], "qdown")]
    argv = ["generate", str(package), "--max-new-tokens", "7", "--ignore-eos", "--huge-pages"]
    for prompt, adapter in rows:
        argv += ["--ids", ",".join(map(str, prompt)), "--adapter", adapter or ""]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    for i, (prompt, adapter) in enumerate(rows):
        assert lines[i] == f"[{i}] adapter {adapter or 'none'}: " + " ".join(map(str, eager_tokens(folders, adapter, prompt, 7)))
    assert "21 tokens in" in lines[3] and "3 rows" in lines[3] and "adapters all7, none, qdown" in lines[3]
    # one adapter for every row
    assert main(["generate", str(package), "--ids", "1,5", "--ids", "1,7,3", "--adapter", "qdown", "--max-new-tokens", "4",
                 "--ignore-eos"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "[1] adapter qdown: " + " ".join(map(str, eager_tokens(folders, "qdown", PROMPTS[1], 4)))
    # refused before the package loads: a count of adapters that fits neither every row nor each row, text and ids
    assert main(["generate", str(package / "missing"), "--ids", "1,5", "--ids", "1,7", "--adapter", "a", "--adapter", "b",
                 "--adapter", "c"]) == 2
    assert "3 --adapter for 2 prompts" in capsys.readouterr().out
    assert main(["generate", str(package / "missing"), "--ids", "1,5", "--prompt", "w5"]) == 2
    assert "one kind only" in capsys.readouterr().out


def test_generate_command_streams_whole_characters() -> None:
    from flora_graph.serving.cli import _Stream

    class Bytes:  # a byte-level tokenizer: token t is the byte t
        @staticmethod
        def decode(tokens: list[int], skip_special_tokens: bool) -> str:
            return bytes(tokens).decode("utf-8", errors="replace")

    class Console:
        def __init__(self) -> None:
            self.pieces: list[str] = []

        def out(self, piece: str, end: str, highlight: bool) -> None:
            self.pieces.append(piece + end)

    text = "aé\nb€c"
    console = Console()
    stream = _Stream(console, Bytes())
    for t in text.encode():
        stream(0, t)
    assert console.pieces == ["a", "é", "\n", "b", "€", "c"]  # never half a character
    console = Console()
    stream = _Stream(console, None)
    for t in (5, 17):
        stream(0, t)
    assert console.pieces == ["5 ", "17 "]


def test_adapter_file_for_another_model_or_rank_is_refused_at_load(package: Path, tmp_path: Path) -> None:
    import shutil

    import numpy as np

    from flora_graph.serving import read_adapter, write_adapter
    from flora_graph.serving.errors import AdapterFileError

    copy = Path(shutil.copytree(package, tmp_path / "pkg"))
    params = read_adapter(copy / "adapters" / "qdown.onnx_adapter").params
    a_name = next(k for k in params if k.endswith(".lora_A"))
    wrong = dict(params)
    wrong[a_name] = np.zeros((params[a_name].shape[0], params[a_name].shape[1] + 1), np.float32)  # another model's width
    (copy / "adapters" / "qdown.onnx_adapter").unlink()
    write_adapter(copy / "adapters" / "qdown.onnx_adapter", wrong)
    with pytest.raises(AdapterFileError, match="qdown"):
        Generator(copy)
    b_name = a_name.replace(".lora_A", ".lora_B")
    ranks = dict(params)
    ranks[b_name] = np.zeros((params[b_name].shape[0], params[b_name].shape[1] + 1), np.float32)  # A rank 4, B rank 5
    (copy / "adapters" / "qdown.onnx_adapter").unlink()
    write_adapter(copy / "adapters" / "qdown.onnx_adapter", ranks)
    with pytest.raises(AdapterFileError, match="qdown"):
        Generator(copy)



def test_config_that_does_not_match_the_model_is_refused_naming_the_missing_inputs(package: Path, tmp_path: Path) -> None:
    """The decode loop passes its arrays to onnxruntime unchecked, so the model's inputs are checked once, at load."""
    import json
    import shutil

    from flora_graph.serving.errors import ServingError

    copy = Path(shutil.copytree(package, tmp_path / "pkg"))
    cfg = copy / "genai_config.json"
    doc = json.loads(cfg.read_text())
    layers = doc["model"]["decoder"]["num_hidden_layers"]
    doc["model"]["decoder"]["num_hidden_layers"] = layers + 1
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ServingError, match=rf"lacks \['past_key_values\.{layers}\.key', 'past_key_values\.{layers}\.value'"):
        Generator(copy)


def test_the_mixed_model_loads_lazily_or_never_as_asked(package: Path, folders: Path) -> None:
    """``mixed="lazy"``: no mixed session until rows with different adapters step (an adapter loaded before that is
    stacked with the package's), then eager PEFT's tokens; ``mixed=False``: single-adapter batches serve, a mixed
    one is refused saying why, and the Generator keeps serving."""
    from flora_graph.serving.errors import ServingError

    lazy = Generator(package, mixed="lazy")
    assert lazy._mixed_session is None
    assert lazy.generate([PROMPTS[0]], adapters="all7", max_new_tokens=6, stop_tokens=[])[0] == \
        eager_tokens(folders, "all7", PROMPTS[0], 6)
    assert lazy._mixed_session is None
    lazy.load_adapter("extra", package / "adapters" / "qdown.onnx_adapter")
    got = lazy.generate(PROMPTS, adapters=["all7", None, "extra"], max_new_tokens=6, stop_tokens=[])
    assert lazy._mixed_session is not None
    assert got == [eager_tokens(folders, a, p, 6) for p, a in zip(PROMPTS, ["all7", None, "qdown"], strict=True)]
    never = Generator(package, mixed=False)
    with pytest.raises(ServingError, match="mixed=False"):
        never.generate(PROMPTS[:2], adapters=["all7", None], max_new_tokens=4, stop_tokens=[])
    assert never.generate(PROMPTS[:2], adapters="qdown", max_new_tokens=6, stop_tokens=[]) == \
        [eager_tokens(folders, "qdown", p, 6) for p in PROMPTS[:2]]
    with pytest.raises(ServingError, match="'sometimes'"):
        Generator(package, mixed="sometimes")


def test_the_mixed_model_alone_serves_every_row_as_eager_peft(package: Path, folders: Path, monkeypatch) -> None:
    """``mixed="only"``: the package's model is not loaded; rows without an adapter, with one adapter for all and with
    different adapters decode as eager PEFT (padded prompts of different lengths), an adapter loads and unloads, and
    ``"auto"`` picks it for a package whose model reaches ``MIXED_ONLY_BYTES``."""
    import flora_graph.serving.generate as generate
    from flora_graph.serving.errors import ServingError

    only = Generator(package, mixed="only")
    assert only._single is None and only._mixed_session is not None
    for adapters in (None, "all7", ["qdown", None, "all7"]):
        got = only.generate(PROMPTS, adapters=adapters, max_new_tokens=10, min_new_tokens=10)
        per_row = adapters if isinstance(adapters, list) else [adapters] * len(PROMPTS)
        assert got == [eager_tokens(folders, a, p, 10) for p, a in zip(PROMPTS, per_row, strict=True)], adapters
    only.load_adapter("extra", package / "adapters" / "qdown.onnx_adapter")
    assert only.generate([PROMPTS[1]], adapters="extra", max_new_tokens=6, min_new_tokens=6) == \
        [eager_tokens(folders, "qdown", PROMPTS[1], 6)]
    only.unload_adapter("extra")
    with pytest.raises(UnknownAdapterError, match="extra"):
        only.generate([PROMPTS[1]], adapters="extra", max_new_tokens=2)
    assert Generator(package)._single is not None  # a tiny package: both models, as with mixed=True
    monkeypatch.setattr(generate, "MIXED_ONLY_BYTES", 1)
    assert Generator(package)._single is None
    with pytest.raises(ServingError, match="'only' or 'auto'"):
        Generator(package, mixed="sometimes")


def test_mixed_only_needs_a_package_with_its_mixed_model(package: Path, tmp_path: Path) -> None:
    import shutil

    from flora_graph.serving.errors import ServingError

    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    (copy / "mixed.onnx").unlink()
    with pytest.raises(ServingError, match=r"mixed='only' serves every row through the package's mixed\.onnx"):
        Generator(copy, mixed="only")
    assert Generator(copy)._mixed is None  # "auto": the package's model alone


def _full_sort_distribution(logits, temperature: float, top_k: int, top_p: float):
    """The sampling distribution over the whole vocabulary, by full sorts (the straightforward reference)."""
    import numpy as np

    z = logits.astype(np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z)[-min(top_k, z.size)], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p
        q = np.zeros_like(p)
        q[order[keep]] = p[order[keep]]
        p = q / q.sum()
    return p


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (20, 1.0), (0, 0.9), (20, 0.95), (50, 0.5), (1, 0.9),
                                              (0, 0.999), (5000, 0.9)])
def test_sampling_distribution_equals_the_full_sort_one(top_k: int, top_p: float) -> None:
    """The candidates-only sampling distribution (partitions, a growing nucleus) is the full-sort one, token for
    token, on a large vocabulary with tied logits (the k-th's ties kept, as transformers does)."""
    import numpy as np

    from flora_graph.serving.generate import sampling_distribution

    rng = np.random.default_rng(top_k + int(100 * top_p))
    for scale in (0.5, 3.0):
        logits = (rng.standard_normal(20000) * scale).astype(np.float32)
        logits[rng.integers(0, 20000, 300)] = logits.max()  # ties at the top
        want = _full_sort_distribution(logits, 0.7, top_k, top_p)
        tokens, p = sampling_distribution(logits, 0.7, top_k, top_p)
        got = np.zeros_like(want)
        got[tokens] = p
        assert len(set(tokens.tolist())) == tokens.size
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
