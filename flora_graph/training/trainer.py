"""``train``: the built-in byte-level decoder trained from scratch on the stdlib corpus, then exported to ONNX.

::

    from flora_graph.training.trainer import TrainConfig, train

    result = train(TrainConfig(steps=200, out="runs/flora"))      # Flora r=8, checkpoints + model.onnx
    print(result.final_eval_loss, result.export.max_abs_diff)

Optimizers (``TrainConfig.optimizer``):

- ``"flora"``: :class:`~flora_graph.flora.Flora` (compressed momentum, rank ``rank``, resample every ``kappa``);
- ``"adafactor"``: the same optimizer with compression off (every momentum kept in full): Adafactor
  with momentum ``beta1``, the full-rank method Flora approximates;
- ``"adam"``: ``torch.optim.AdamW`` (``betas=(beta1, 0.999)``);
- ``"lora-adam"``: LoRA of rank ``rank`` on the seven projections (random base weights frozen), the
  embedding, norms and ``lm_head`` trained in full, all with AdamW;
- ``"flora-adapter"``: :class:`~flora_graph.adapters.FloraAdapter` on the projections (``B`` trained by
  its own ``update_parameters``, ``A`` resampled every ``kappa`` steps with merge-before-resample), the
  rest with Flora.

With ``accum > 1`` each step sums ``accum`` micro-batches: in the compressed space through
:class:`~flora_graph.flora.FloraAccumulator` (``accumulator="compressed"``, the default for
Flora) or in full ``.grad`` buffers (``"full"``). The learning rate follows a linear warm-up and
a cosine decay (or stays constant) computed from the step alone, and batches are a pure function
of ``(seed, step, micro)``, so nothing but the model, the optimizer (and accumulator and adapter
states) needs saving: a run resumed from a checkpoint equals an uninterrupted one bit for bit.

Checkpoints (``out/checkpoints/step_NNNNNN.pt``, one atomic ``torch.save`` file each) hold only
tensors and plain values, so ``torch.load(path, weights_only=True)`` reads them.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.errors import FloraGraphError
from flora_graph.flora.accumulate import FloraAccumulator
from flora_graph.flora.optimizer import Flora
from flora_graph.ir.serialize import atomic_write_bytes
from flora_graph.training.choices import ACCUMULATORS, OPTIMIZERS, SCHEDULES
from flora_graph.training.corpus import Corpus, WindowSampler, build_corpus, eval_windows

if TYPE_CHECKING:
    from flora_graph.model_export import ExportReport

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "build_model",
    "build_optimizer",
    "config_from_checkpoint",
    "evaluate",
    "export_decoder",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "train",
]

# best of a sweep on the default run (decoder hidden 64 x 2 layers, 200 steps of 16 x 64 bytes); flora
# re-swept for its current update rule: 3e-3 2.238, 5e-3 2.193, 8e-3 2.177, 1.2e-2 2.169, 1.8e-2 2.249
DEFAULT_LR = {"flora": 1e-2, "adafactor": 8e-3, "adam": 8e-3, "lora-adam": 1e-2, "flora-adapter": 6e-3}
NO_COMPRESSION = 2**31 - 1  # a Flora rank above every matrix side: all momentum kept in full
CHECKPOINT_FORMAT = "flora_graph.train"
# options a resumed run must share with its checkpoint (steps, eval and output options may change)
_RESUME_KEYS = (
    "batch", "seq", "lr", "optimizer", "rank", "kappa", "beta1", "accum", "accumulator", "corpus_bytes",
    "eval_fraction", "corpus_root", "seed", "schedule", "min_lr_ratio", "weight_decay", "grad_clip",
    "hidden", "layers", "heads", "kv_heads", "intermediate",
)  # fmt: skip


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
    need(_is_real(c.beta1) and 0 <= c.beta1 < 1, "beta1", "in [0, 1)")
    need(_is_real(c.eval_fraction) and 0 < c.eval_fraction < 1, "eval_fraction", "in (0, 1)")
    need(_is_real(c.min_lr_ratio) and 0 <= c.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
    need(_is_real(c.weight_decay) and c.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(_is_real(c.grad_clip) and c.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0: off)")
    need(c.warmup is None or (_is_int(c.warmup) and c.warmup >= 0), "warmup", "None or an int >= 0")
    if c.out is None and (c.ckpt_every or c.export):
        raise TrainConfigError("train: checkpoints (ckpt_every) and export need an output folder (out)")
    if c.hidden % c.heads or c.heads % c.kv_heads or (c.hidden // c.heads) % 2:
        raise TrainConfigError(f"train: hidden={c.hidden}, heads={c.heads}, kv_heads={c.kv_heads} do not divide evenly "
                               "(hidden / heads must be even)")


@dataclass
class TrainResult:
    """What :func:`train` did: the trained model and optimizer, loss curves, checkpoints, the export report."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_losses: list[tuple[int, float]]  # (step, mean loss of that step's micro-batches)
    eval_losses: list[tuple[int, float]]  # (step, eval loss); step 0 is the initial model
    checkpoints: list[Path] = field(default_factory=list)
    export: ExportReport | None = None
    seconds: float = 0.0  # wall time of this call's training steps (no eval, checkpoint or export)
    start_step: int = 0  # 0, or the step of the checkpoint resumed from

    @property
    def final_eval_loss(self) -> float:
        """The last eval loss (NaN if none was measured)."""
        return self.eval_losses[-1][1] if self.eval_losses else float("nan")


# ---------------------------------------------------------------------- building blocks
@functools.lru_cache(maxsize=4)
def _corpus(budget: int, eval_fraction: float, root: str | None) -> Corpus:
    return build_corpus(budget, eval_fraction, root)


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


def build_model(config: TrainConfig) -> nn.Module:
    """The seeded decoder for ``config``, with LoRA or FloraAdapter on its projections for the adapter optimizers."""
    from flora_graph.adapters import FloraAdapter, apply_lora
    from flora_graph.models.decoder import DECODER_PROJECTIONS, DecoderConfig, build_decoder

    cfg = DecoderConfig(hidden=config.hidden, layers=config.layers, heads=config.heads, kv_heads=config.kv_heads,
                        intermediate=config.intermediate, max_seq=max(256, config.seq))
    model = build_decoder(cfg, seed=config.seed)
    if config.optimizer == "lora-adam":
        apply_lora(model, list(DECODER_PROJECTIONS), rank=config.rank, alpha=2 * config.rank)
    elif config.optimizer == "flora-adapter":
        apply_lora(model, list(DECODER_PROJECTIONS), rank=config.rank, alpha=2 * config.rank, adapter_cls=FloraAdapter,
                   resampling_interval=config.kappa, momentum_decay=config.beta1, seed=config.seed)
        for m in _flora_adapters(model).values():
            m.lora_A.requires_grad_(False)  # A is the projection; update_parameters trains B
    return model.train()


def _flora_adapters(model: nn.Module) -> dict[str, Any]:
    from flora_graph.adapters import FloraAdapter

    return {n: m for n, m in model.named_modules() if isinstance(m, FloraAdapter)}


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names over ``model``'s trainable parameters (FloraAdapter ``B`` excluded)."""
    skip = {id(m.lora_B) for m in _flora_adapters(model).values()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
    lr = config.base_lr
    if config.optimizer in ("flora", "flora-adapter", "adafactor"):
        rank = NO_COMPRESSION if config.optimizer == "adafactor" else config.rank
        return Flora(named, lr=lr, rank=rank, kappa=config.kappa, beta1=config.beta1,
                     weight_decay=config.weight_decay, seed=config.seed)
    return torch.optim.AdamW([p for _, p in named], lr=lr, betas=(config.beta1, 0.999),
                             weight_decay=config.weight_decay, foreach=False)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` over ``batches``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------------- checkpoints
def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if a file, else the highest-step ``step_*.pt`` in ``path`` or ``path/checkpoints``."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "checkpoints"):
        found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
        if found:
            return found[-1]
    raise TrainConfigError(f"{path}: no checkpoint file (step_*.pt) found")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`train`, read with ``torch.load(weights_only=True)`` and checked."""
    path = latest_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise TrainConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainConfigError(f"{path}: not a flora_graph training checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def config_from_checkpoint(path: str | Path, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint, with ``overrides`` applied and ``resume`` set to it."""
    path = latest_checkpoint(path)
    stored = dict(load_checkpoint(path)["config"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in stored.items() if k in known}, **overrides, "resume": str(path)})


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _restore(config: TrainConfig, ckpt: dict[str, Any], corpus: Corpus, parts: dict[str, Any]) -> int:
    saved = ckpt["config"]
    for key in _RESUME_KEYS:
        if saved.get(key) != getattr(config, key):
            raise TrainConfigError(f"resume: option {key} is {getattr(config, key)!r} but the checkpoint was trained "
                                   f"with {saved.get(key)!r}")
    if ckpt["corpus_digest"] != corpus.digest:
        raise TrainConfigError("resume: the corpus differs from the checkpoint's (another Python version or folder?)")
    parts["model"].load_state_dict(ckpt["model"])
    parts["optimizer"].load_state_dict(ckpt["optimizer"])
    if parts["accumulator"] is not None:
        parts["accumulator"].load_state_dict(ckpt["accumulator"])
    for name, m in parts["adapters"].items():
        m.load_training_state(ckpt["adapters"][name])
    return int(ckpt["step"])


# ---------------------------------------------------------------------- progress
class _Progress:
    """``"rich"`` / ``"tqdm"`` bars, a callable ``fn(step, total, metrics)``, or nothing."""

    def __init__(self, kind: str | Callable[[int, int, dict[str, float]], None] | None, total: int, start: int) -> None:
        self.kind, self.total, self._bar, self._task = kind, total, None, None
        if kind == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"))
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
        elif kind == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train")
        elif kind is not None and not callable(kind):
            raise TrainConfigError(f"train: progress must be 'rich', 'tqdm', None or a callable, got {kind!r}")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        info = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        if self.kind == "rich":
            self._bar.update(self._task, completed=step, info=info)
        elif self.kind == "tqdm":
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(info, refresh=False)
        elif callable(self.kind):
            self.kind(step, self.total, metrics)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop() if self.kind == "rich" else self._bar.close()


# ---------------------------------------------------------------------- train
def _train_step(
    config: TrainConfig,
    step: int,
    lr: float,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    acc: FloraAccumulator | None,
    adapters: dict[str, Any],
    sampler: WindowSampler,
) -> float:
    """One optimizer step over ``config.accum`` micro-batches; returns their mean loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for micro in range(config.accum):
        x, y = sampler.batch(step, micro)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        (loss / config.accum).backward()
        if acc is not None:
            acc.accumulate()  # compress this micro-batch's gradient into the buffers, clear .grad
        loss_sum += float(loss.detach())
    if acc is not None:
        acc.finalize()  # decompress the sum into .grad once
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip,
                                       foreach=False)
    opt.step()
    for m in adapters.values():
        m.update_parameters(lr)  # FloraAdapter: B's Flora step, merge + resample every kappa steps
    model.zero_grad(set_to_none=True)
    return loss_sum / config.accum


def train(
    config: TrainConfig,
    progress: str | Callable[[int, int, dict[str, float]], None] | None = "rich",
    *,
    optimizer_factory: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train the decoder as ``config`` says; checkpoint, evaluate, and export it to ``out/model.onnx``.

    Args:
        config: the run (see :class:`TrainConfig`); ``config.resume`` continues from a checkpoint.
        progress: ``"rich"`` or ``"tqdm"`` for a progress bar, ``None`` for none, or a callable
            ``fn(step, steps, metrics)`` called after every step.
        optimizer_factory: builds the optimizer instead of ``config.optimizer`` (which still picks
            the model: plain, LoRA or FloraAdapter); e.g. GaLore in the benchmarks.

    Returns:
        :class:`TrainResult`; ``export`` holds the ONNX parity report when ``config.export``.

    Raises:
        TrainConfigError: a bad option, or a checkpoint that does not fit ``config``.
    """
    corpus = _corpus(config.corpus_bytes, float(config.eval_fraction), config.corpus_root)
    sampler = WindowSampler(corpus.train, config.batch, config.seq, seed=config.seed)
    eval_set = eval_windows(corpus.eval, config.batch, config.seq, config.eval_batches)
    model = build_model(config)
    opt = optimizer_factory(model, config) if optimizer_factory is not None else build_optimizer(config, model)
    adapters = _flora_adapters(model)
    acc = None
    if config.compressed_accumulation:
        acc = FloraAccumulator([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                               rank=config.rank, seed=config.seed)
    train_losses: list[tuple[int, float]] = []
    eval_losses: list[tuple[int, float]] = []
    start = 0
    if config.resume is not None:
        ckpt = load_checkpoint(config.resume)
        start = _restore(config, ckpt, corpus, {"model": model, "optimizer": opt, "accumulator": acc,
                                                "adapters": adapters})
        train_losses = [(int(s), float(v)) for s, v in ckpt["history"]["train"]]
        eval_losses = [(int(s), float(v)) for s, v in ckpt["history"]["eval"]]
        if start > config.steps:
            raise TrainConfigError(f"resume: the checkpoint is at step {start}, past steps={config.steps}")
    else:
        eval_losses.append((0, evaluate(model, eval_set)))
    out = Path(config.out) if config.out is not None else None
    checkpoints: list[Path] = []
    bar = _Progress(progress, config.steps, start)
    seconds = 0.0
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            lr = lr_at(config, step)
            loss = _train_step(config, step, lr, model, opt, acc, adapters, sampler)
            seconds += time.perf_counter() - t0
            done = step + 1
            train_losses.append((done, loss))
            metrics: dict[str, float] = {"loss": train_losses[-1][1], "lr": lr}
            if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
                eval_losses.append((done, evaluate(model, eval_set)))
                metrics["eval"] = eval_losses[-1][1]
            if out is not None and ((config.ckpt_every and done % config.ckpt_every == 0) or done == config.steps):
                path = out / "checkpoints" / f"step_{done:06d}.pt"
                _save_checkpoint(path, {
                    "format": CHECKPOINT_FORMAT, "version": 1, "step": done,
                    "config": {**dataclasses.asdict(config), "resume": None}, "corpus_digest": corpus.digest,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "accumulator": acc.state_dict() if acc is not None else None,
                    "adapters": {n: m.training_state() for n, m in adapters.items()},
                    "history": {"train": [list(t) for t in train_losses], "eval": [list(t) for t in eval_losses]},
                })  # fmt: skip
                checkpoints.append(path)
            bar.update(done, metrics)
    finally:
        bar.close()
    report = export_decoder(model, corpus, out / "model.onnx") if (config.export and out is not None) else None
    return TrainResult(config, model, opt, train_losses, eval_losses, checkpoints, report, seconds, start)


def export_decoder(model: nn.Module, corpus: Corpus, path: str | Path) -> ExportReport:
    """Export the trained ``model`` through the compiler (``merged`` preset) to ONNX, checked on real eval text."""
    from flora_graph.model_export import ModelSpec, export_model

    def windows(batch: int, seq: int, offset: int) -> dict[str, torch.Tensor]:
        starts = torch.arange(batch) * (seq + 1) + offset
        return {"input_ids": corpus.eval[(starts[:, None] + torch.arange(seq)[None, :]) % corpus.eval.numel()].long()}

    model.eval()
    spec = ModelSpec(model, windows(2, 8, 0), {"input_ids": {0: "batch", 1: "seq"}}, windows(3, 11, 101), "decoder")
    return export_model(spec, path, backend="onnxruntime", preset="merged")
