"""The stdlib byte corpus: deterministic, split by file, budgeted; seeded window sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flora_graph.training.corpus import (
    BOS,
    BYTE_OFFSET,
    EOS,
    CorpusError,
    WindowSampler,
    build_corpus,
    eval_windows,
    stdlib_sources,
)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_corpus_is_deterministic() -> None:
    a, b = build_corpus(1 << 16), build_corpus(1 << 16)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert a.train_files == b.train_files and a.eval_files == b.eval_files
    assert a.digest == b.digest
    assert build_corpus(1 << 15).digest != a.digest


def test_splits_are_disjoint_by_file_and_within_budget() -> None:
    c = build_corpus(1 << 17, eval_fraction=0.2)
    assert c.train_files and c.eval_files
    assert not set(c.train_files) & set(c.eval_files)
    assert list(c.train_files) == sorted(c.train_files) and list(c.eval_files) == sorted(c.eval_files)
    assert all(f.endswith(".py") for f in c.train_files + c.eval_files)
    # tokens = source bytes + BOS and EOS per file; the bytes stay within the budget
    source = c.train.numel() - 2 * len(c.train_files) + c.eval.numel() - 2 * len(c.eval_files)
    assert source <= 1 << 17
    assert c.eval.numel() - 2 * len(c.eval_files) <= int((1 << 17) * 0.2)


def test_tokens_are_bytes_plus_three_framed_by_bos_eos(tmp_path: Path) -> None:
    root = _tree(tmp_path, {f"m{i:02d}.py": f"x = {i}\n".encode() for i in range(40)})
    c = build_corpus(10_000, eval_fraction=0.3, root=root)
    first = c.train_files[0]
    data = (root / first).read_bytes()
    want = torch.tensor([BOS, *(b + BYTE_OFFSET for b in data), EOS], dtype=torch.int16)
    assert torch.equal(c.train[: len(want)], want)
    assert set(c.train_files) | set(c.eval_files) == {p.name for p in root.iterdir()}


def test_budget_cuts_and_skips_site_packages(tmp_path: Path) -> None:
    files = {f"{ch}.py": ch.encode() * 500 for ch in "abcdefghijkl"}
    root = _tree(tmp_path, {**files, "site-packages/x.py": b"x" * 100, "pkg/__pycache__/y.py": b"y" * 100, "notes.txt": b"z"})
    rels = [rel for rel, _ in stdlib_sources(root)]
    assert rels == sorted(files)
    c = build_corpus(900, eval_fraction=0.5, root=root)
    assert c.train.numel() - 2 * len(c.train_files) <= 450
    assert c.eval.numel() - 2 * len(c.eval_files) <= 450


def test_bad_inputs_raise_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        build_corpus(1000, root=tmp_path / "missing")
    with pytest.raises(CorpusError, match=r"no \*\.py source went to the"):
        build_corpus(1000, root=_tree(tmp_path / "one", {"only.py": b"pass\n"}))
    with pytest.raises(CorpusError, match="eval_fraction"):
        build_corpus(1000, eval_fraction=1.0)
    c = build_corpus(4096)
    with pytest.raises(CorpusError, match="fewer than seq"):
        WindowSampler(c.eval, batch=2, seq=c.eval.numel())
    with pytest.raises(CorpusError, match="batch"):
        WindowSampler(c.train, batch=0, seq=8)


def test_windows_are_shaped_and_shifted() -> None:
    c = build_corpus(1 << 15)
    s = WindowSampler(c.train, batch=5, seq=17, seed=3)
    x, y = s.batch(step=4, micro=1)
    assert x.shape == y.shape == (5, 17) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = s.starts(4, 1)
    for row, st in enumerate(starts.tolist()):
        assert torch.equal(x[row], c.train[st : st + 17].long())
        assert torch.equal(y[row], c.train[st + 1 : st + 18].long())
    assert int(x.min()) >= 0 and int(x.max()) < 259


def test_sampler_is_a_seeded_function_of_step_and_micro() -> None:
    c = build_corpus(1 << 15)
    a, b = WindowSampler(c.train, 4, 16, seed=1), WindowSampler(c.train, 4, 16, seed=1)
    assert torch.equal(a.batch(7)[0], b.batch(7)[0])
    assert torch.equal(a.batch(7, 2)[0], a.batch(7, 2)[0])
    assert not torch.equal(a.batch(7)[0], a.batch(8)[0])
    assert not torch.equal(a.batch(7, 0)[0], a.batch(7, 1)[0])
    assert not torch.equal(a.batch(7)[0], WindowSampler(c.train, 4, 16, seed=2).batch(7)[0])


def test_eval_windows_are_fixed_and_cover_the_split() -> None:
    c = build_corpus(1 << 15)
    w1, w2 = eval_windows(c.eval, 4, 16, max_batches=3), eval_windows(c.eval, 4, 16, max_batches=3)
    assert len(w1) == 3 and all(x.shape == (4, 16) for x, _ in w1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(w1, w2, strict=True))
    assert torch.equal(w1[0][0][0], c.eval[:16].long())  # first window at the start
    assert torch.equal(w1[-1][1][-1], c.eval[-16:].long())  # last target ends at the split's end
