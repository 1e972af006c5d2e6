"""Training checkpoints: find, read, write, and restore them into a run.

A checkpoint is ``out/checkpoints/step_NNNNNN.pt``, one atomic ``torch.save`` of plain values
and tensors (``torch.load(path, weights_only=True)`` reads it): the config, the corpus digest,
the loss history, the model, optimizer, accumulator and adapter states. A multi-process run
(``nproc > 1``, FSDP2) keeps the model and optimizer shards in a fresh folder per write,
``step_NNNNNN.<token>.dcp`` (``torch.distributed.checkpoint``), named by the file's ``"sharded"``
entry; the file itself is written last, so its rename is the one commit point: a ``step_*.pt``
always names a complete checkpoint, and the shard folders of that step which it does not name
(an interrupted write, or the one it replaced) are removed by :func:`remove_stale_shards`.
"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from flora_graph.ir.serialize import atomic_write_bytes
from flora_graph.training.config import TrainConfig, TrainConfigError
from flora_graph.training.corpus import Corpus

__all__ = [
    "CHECKPOINT_FORMAT",
    "RESUME_KEYS",
    "checkpoint_step",
    "config_from_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "remove_stale_shards",
    "restore",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "flora_graph.train"
# options a resumed run must share with its checkpoint (steps, eval and output options may change)
RESUME_KEYS = (
    "batch", "seq", "lr", "optimizer", "rank", "kappa", "beta1", "accum", "accumulator", "corpus_bytes",
    "eval_fraction", "corpus_root", "seed", "schedule", "min_lr_ratio", "weight_decay", "grad_clip",
    "hidden", "layers", "heads", "kv_heads", "intermediate", "flora_update", "nproc",
)  # fmt: skip
_ADDED_KEYS = {"flora_update": "lift", "nproc": 1}  # options added later: the value older checkpoints imply


_STEP_FILE = re.compile(r"step_(\d+)\.pt")


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint file named ``step_<digits>.pt`` (any number of digits), else ``None``."""
    m = _STEP_FILE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if a file, else the highest-step ``step_<N>.pt`` in ``path`` or ``path/checkpoints``.

    Steps compare as numbers (``step_1000000.pt`` is later than ``step_999999.pt``); files
    whose name is not ``step_<digits>.pt`` are not checkpoints.
    """
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "checkpoints"):
        found = [(step, f) for f in folder.glob("step_*.pt")
                 if (step := checkpoint_step(f)) is not None and f.is_file()] if folder.is_dir() else []
        if found:
            return max(found)[1]
    raise TrainConfigError(f"{path}: no checkpoint file (step_<N>.pt) found")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`train`, read with ``torch.load(weights_only=True)`` and checked."""
    path = latest_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise TrainConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainConfigError(f"{path}: not a flora_graph training checkpoint (format {CHECKPOINT_FORMAT!r})")
    ckpt["path"] = str(path)
    return ckpt


def config_from_checkpoint(path: str | Path, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint, with ``overrides`` applied and ``resume`` set to it."""
    path = latest_checkpoint(path)
    stored = dict(load_checkpoint(path)["config"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in stored.items() if k in known}, **overrides, "resume": str(path)})


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` with one atomic ``torch.save``."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def remove_stale_shards(path: Path, keep: str) -> list[Path]:
    """Remove the shard folders of checkpoint ``path``'s step other than ``keep`` (the one ``path`` names);
    return them. Called after ``path`` is committed, so no committed checkpoint loses its shards."""
    stale = [f for f in path.parent.glob(f"{path.stem}.*dcp") if f.is_dir() and f.name != keep
             and re.fullmatch(rf"{re.escape(path.stem)}(\.[0-9a-f]+)?\.dcp", f.name)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def restore(config: TrainConfig, ckpt: dict[str, Any], corpus: Corpus, parts: dict[str, Any]) -> int:
    """Check that ``ckpt`` fits ``config`` and load it into ``parts`` (model, optimizer, accumulator, adapters).

    ``parts["ranks"]`` (a :class:`~.parallel.Ranks`, or ``None``) loads a sharded checkpoint's
    model and optimizer from its ``torch.distributed.checkpoint`` folder.
    """
    saved = ckpt["config"]
    for key in RESUME_KEYS:
        have = saved.get(key, _ADDED_KEYS.get(key))  # a checkpoint older than the option: its default
        if have != getattr(config, key):
            raise TrainConfigError(f"resume: option {key} is {getattr(config, key)!r} but the checkpoint was trained "
                                   f"with {have!r}")
    if ckpt["corpus_digest"] != corpus.digest:
        raise TrainConfigError("resume: the corpus differs from the checkpoint's (another Python version or folder?)")
    if ckpt.get("sharded") is not None:
        parts["ranks"].load(Path(ckpt["path"]).parent / ckpt["sharded"], parts["model"], parts["optimizer"])
    else:
        parts["model"].load_state_dict(ckpt["model"])
        parts["optimizer"].load_state_dict(ckpt["optimizer"])
    if parts["accumulator"] is not None:
        parts["accumulator"].load_state_dict(ckpt["accumulator"])
    for name, m in parts["adapters"].items():
        m.load_training_state(ckpt["adapters"][name])
    return int(ckpt["step"])
