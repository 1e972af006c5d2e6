"""``TrainConfig``: every option of a training run, validated; the default learning rates and the schedule.

Kept apart from :mod:`.trainer` so the checkpoint and multi-process modules can use it without
importing the training loop. :mod:`.trainer` re-exports every name here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from flora_graph.errors import FloraGraphError
from flora_graph.training.choices import ACCUMULATORS, FLORA_UPDATES, OPTIMIZERS, SCHEDULES

__all__ = ["DEFAULT_LR", "NO_COMPRESSION", "TrainConfig", "TrainConfigError", "lr_at"]

# best of a sweep on the default run (decoder hidden 64 x 2 layers, 200 steps of 16 x 64 bytes); flora
# re-swept for update="scaled", final eval loss, mean of seeds 0-2: 8e-3 2.226, 1.2e-2 2.188, 1.8e-2 2.179,
# 2.4e-2 2.167, 3.2e-2 2.186 (seed 0 alone: 5e-3 2.293, 4.8e-2 2.233)
DEFAULT_LR = {"flora": 2.4e-2, "adafactor": 8e-3, "adam": 8e-3, "lora-adam": 1e-2, "flora-adapter": 6e-3}
NO_COMPRESSION = 2**31 - 1  # a Flora rank above every matrix side: all momentum kept in full


class TrainConfigError(FloraGraphError, ValueError):
    """A training option is out of range, or a checkpoint does not fit the run (names the option or file)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; plain values only (it is stored in every checkpoint)."""

    steps: int = 200
    batch: int = 16
    seq: int = 64
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    optimizer: str = "flora"
    rank: int = 8
    kappa: int = 1000
    beta1: float = 0.9
    accum: int = 1
    accumulator: str = "auto"  # "auto": compressed for flora, full otherwise
    eval_every: int = 50  # 0: only at the start and the end
    eval_batches: int = 8
    ckpt_every: int = 0  # 0: only the final checkpoint
    out: str | None = None  # checkpoints and model.onnx go here; None: neither
    resume: str | None = None  # a checkpoint file, or a folder (its latest checkpoint)
    corpus_bytes: int = 1 << 20
    eval_fraction: float = 0.1
    corpus_root: str | None = None  # default: the standard library
    export: bool = True
    seed: int = 0
    schedule: str = "cosine"
    warmup: int | None = None  # None: 10% of the steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip; 0: off
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 172
    flora_update: str = "scaled"  # Flora's compressed-momentum rule: "scaled", "lift" or the paper's "paper"
    nproc: int = 1  # processes (gloo, FSDP2 fully_shard); each takes batch / nproc of every micro-batch

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def base_lr(self) -> float:
        """``lr``, or the optimizer's default."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def warmup_steps(self) -> int:
        """``warmup``, or 10% of ``steps``."""
        return self.warmup if self.warmup is not None else self.steps // 10

    @property
    def compressed_accumulation(self) -> bool:
        """Whether micro-batch gradients are summed by a :class:`FloraAccumulator`."""
        if self.accum == 1:
            return False
        return self.accumulator == "compressed" or (self.accumulator == "auto" and self.optimizer == "flora")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _validate(c: TrainConfig) -> None:
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise TrainConfigError(f"train option {name} must be {what}, got {getattr(c, name)!r}")

    for name in ("steps", "batch", "seq", "rank", "kappa", "accum", "eval_batches", "hidden", "layers", "heads",
                 "kv_heads", "intermediate"):
        need(_is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "an int >= 1")
    for name in ("eval_every", "ckpt_every"):
        need(_is_int(getattr(c, name)) and getattr(c, name) >= 0, name, "an int >= 0")
    need(_is_int(c.corpus_bytes) and c.corpus_bytes >= 64, "corpus_bytes", "an int >= 64")
    need(_is_int(c.seed), "seed", "an int")
    need(c.lr is None or (_is_real(c.lr) and c.lr > 0), "lr", "None or a finite number > 0")
    need(c.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
    need(c.accumulator in ACCUMULATORS, "accumulator", f"one of {ACCUMULATORS}")
    need(c.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
    need(c.flora_update in FLORA_UPDATES, "flora_update", f"one of {FLORA_UPDATES}")
    need(_is_int(c.nproc) and c.nproc >= 1, "nproc", "an int >= 1")
    need(_is_real(c.beta1) and 0 <= c.beta1 < 1, "beta1", "in [0, 1)")
    need(_is_real(c.eval_fraction) and 0 < c.eval_fraction < 1, "eval_fraction", "in (0, 1)")
    need(_is_real(c.min_lr_ratio) and 0 <= c.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
    need(_is_real(c.weight_decay) and c.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(_is_real(c.grad_clip) and c.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0: off)")
    need(c.warmup is None or (_is_int(c.warmup) and c.warmup >= 0), "warmup", "None or an int >= 0")
    if c.out is None and (c.ckpt_every or c.export):
        raise TrainConfigError("train: checkpoints (ckpt_every) and export need an output folder (out)")
    if c.nproc > 1 and c.batch % c.nproc:
        raise TrainConfigError(f"train: batch={c.batch} does not split evenly over nproc={c.nproc} processes")
    if c.nproc > 1 and c.optimizer == "flora-adapter":
        raise TrainConfigError("train: optimizer flora-adapter trains its adapters outside the optimizer and cannot "
                               "run sharded (nproc > 1); use flora, adafactor, adam or lora-adam")
    if c.hidden % c.heads or c.heads % c.kv_heads or (c.hidden // c.heads) % 2:
        raise TrainConfigError(f"train: hidden={c.hidden}, heads={c.heads}, kv_heads={c.kv_heads} do not divide evenly "
                               "(hidden / heads must be even)")


def lr_at(config: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then cosine down to ``min_lr_ratio * lr``."""
    base, warm = config.base_lr, config.warmup_steps
    if step < warm:
        return base * (step + 1) / warm
    if config.schedule == "constant":
        return base
    frac = min(1.0, (step - warm) / max(1, config.steps - warm))
    r = config.min_lr_ratio
    return base * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * frac)))
