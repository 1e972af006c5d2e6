"""A byte-level training corpus every Python install has: the standard library's own sources.

:func:`build_corpus` walks ``sysconfig.get_paths()["stdlib"]`` (``site-packages``,
``dist-packages`` and ``__pycache__`` left out), takes the ``*.py`` files in sorted order of
their relative POSIX paths, and puts each file WHOLE into the train or the eval split by a
stable hash of its path (so the splits are disjoint by file). Each split is filled up to its
share of the byte budget; the file that would overflow a split is cut at the budget. Every
file becomes ``BOS, bytes + 3, ..., EOS`` (the tokens of
:func:`~flora_graph.models.decoder.byte_tokenize`). The same Python version gives the same
bytes on every machine; :attr:`Corpus.digest` identifies them.

:class:`WindowSampler` draws ``(input, target)`` windows of ``seq`` tokens (the target is the
input shifted by one) from a split. A batch is a pure function of ``(seed, step, micro)``,
with no generator state to carry, so a resumed run sees exactly the batches an
uninterrupted one would. :func:`eval_windows` gives a fixed, evenly strided set of eval windows.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flora_graph.errors import FloraGraphError
from flora_graph.flora.projection import stable_seed

__all__ = ["Corpus", "CorpusError", "WindowSampler", "build_corpus", "eval_windows", "stdlib_sources"]

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3  # token = byte + 3, as byte_tokenize
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class CorpusError(FloraGraphError, ValueError):
    """The corpus cannot be built or sampled as asked (names the folder, split or option at fault)."""


@dataclass(frozen=True)
class Corpus:
    """Token streams of the two splits (int16 tensors of ``BOS bytes+3 EOS`` per file) and their files."""

    train: torch.Tensor
    eval: torch.Tensor
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    root: str
    digest: str  # SHA-256 over (split, path, bytes) of everything taken

    def __repr__(self) -> str:
        return (
            f"Corpus({len(self.train_files)} train files / {self.train.numel()} tokens, "
            f"{len(self.eval_files)} eval files / {self.eval.numel()} tokens, root={self.root!r})"
        )


def stdlib_sources(root: str | Path | None = None) -> Iterator[tuple[str, Path]]:
    """``(relative POSIX path, absolute path)`` of every ``*.py`` under ``root`` (default: the stdlib), sorted by path."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise CorpusError(f"{base}: the corpus folder does not exist")
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for f in files:
            if f.endswith(".py"):
                path = Path(folder) / f
                found.append((path.relative_to(base).as_posix(), path))
    found.sort(key=lambda t: t[0])
    yield from found


def _is_eval(rel: str, eval_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")
    return (h % 1_000_000) < eval_fraction * 1_000_000


def build_corpus(
    budget_bytes: int = 1 << 20,
    eval_fraction: float = 0.1,
    root: str | Path | None = None,
) -> Corpus:
    """The stdlib corpus: at most ``budget_bytes`` source bytes, ``eval_fraction`` of them in the eval split.

    Deterministic: the same files, order and bytes on every call (for one Python version).

    Raises:
        CorpusError: a bad budget or fraction, a missing folder, or a split left empty.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 2:
        raise CorpusError(f"corpus budget_bytes must be an int >= 2, got {budget_bytes!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise CorpusError(f"corpus eval_fraction must be in (0, 1), got {eval_fraction!r}")
    caps = {"eval": max(1, int(budget_bytes * eval_fraction))}
    caps["train"] = budget_bytes - caps["eval"]
    taken: dict[str, list[bytes]] = {"train": [], "eval": []}
    files: dict[str, list[str]] = {"train": [], "eval": []}
    used = {"train": 0, "eval": 0}
    sha = hashlib.sha256()
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    for rel, path in stdlib_sources(base):
        split = "eval" if _is_eval(rel, eval_fraction) else "train"
        room = caps[split] - used[split]
        if room <= 0:
            if all(used[s] >= caps[s] for s in caps):
                break
            continue
        try:
            data = path.read_bytes()[:room]
        except OSError:
            continue  # an unreadable file is skipped, the same way every time
        if not data:
            continue
        taken[split].append(data)
        files[split].append(rel)
        used[split] += len(data)
        sha.update(f"{split}\0{rel}\0{len(data)}\0".encode())
        sha.update(data)
    for split in ("train", "eval"):
        if not files[split]:
            raise CorpusError(
                f"{base}: no *.py source went to the {split} split (budget {budget_bytes} bytes, "
                f"eval_fraction {eval_fraction}); raise the budget or choose another folder"
            )
    return Corpus(
        train=_tokens(taken["train"]),
        eval=_tokens(taken["eval"]),
        train_files=tuple(files["train"]),
        eval_files=tuple(files["eval"]),
        root=str(base),
        digest=sha.hexdigest(),
    )


def _tokens(chunks: list[bytes]) -> torch.Tensor:
    parts: list[torch.Tensor] = []
    for data in chunks:
        body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16) + BYTE_OFFSET
        parts.append(torch.cat([torch.tensor([BOS], dtype=torch.int16), body, torch.tensor([EOS], dtype=torch.int16)]))
    return torch.cat(parts)


def _check_window(tokens: torch.Tensor, seq: int, what: str) -> None:
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise CorpusError(f"{what}: seq must be an int >= 1, got {seq!r}")
    if tokens.numel() < seq + 1:
        raise CorpusError(
            f"{what}: the split holds {tokens.numel()} tokens, fewer than seq + 1 = {seq + 1}; raise the corpus budget"
        )


class WindowSampler:
    """Seeded ``(input, target)`` windows, each ``[batch, seq]`` int64, from one token stream.

    ``sampler.batch(step, micro)`` is a pure function of ``(seed, step, micro)``: window starts
    are uniform over the stream, drawn from a CPU generator seeded with
    ``stable_seed("flora.corpus", seed, step, micro)``.
    """

    def __init__(self, tokens: torch.Tensor, batch: int, seq: int, seed: int = 0) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise CorpusError(f"WindowSampler: batch must be an int >= 1, got {batch!r}")
        _check_window(tokens, seq, "WindowSampler")
        self.tokens = tokens.reshape(-1)
        self.batch_size, self.seq, self.seed = batch, seq, int(seed)

    def starts(self, step: int, micro: int = 0) -> torch.Tensor:
        """The ``batch`` window start offsets of ``(step, micro)``."""
        gen = torch.Generator().manual_seed(stable_seed("flora.corpus", self.seed, int(step), int(micro)))
        return torch.randint(0, self.tokens.numel() - self.seq, (self.batch_size,), generator=gen)

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, target)`` for optimizer step ``step``, micro-batch ``micro``; ``target[:, i] = input[:, i + 1]``."""
        return _gather(self.tokens, self.starts(step, micro), self.seq)


def _gather(tokens: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    windows = tokens[idx].to(torch.int64)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, batch: int, seq: int, max_batches: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed eval batches: up to ``batch * max_batches`` windows at evenly strided starts over the whole split."""
    _check_window(tokens, seq, "eval_windows")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CorpusError(f"eval_windows: batch must be an int >= 1, got {batch!r}")
    tokens = tokens.reshape(-1)
    last = tokens.numel() - seq - 1  # the last valid start
    count = min(batch * max_batches, last + 1)
    starts = torch.linspace(0, last, count).round().to(torch.int64) if count > 1 else torch.zeros(1, dtype=torch.int64)
    return [_gather(tokens, starts[i : i + batch], seq) for i in range(0, count, batch)]
