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
tensors and plain values, so ``torch.load(path, weights_only=True)`` reads them (:mod:`.checkpoints`).

``flora_update`` picks ``Flora``'s momentum rule (``"scaled"``, ``"lift"``, or the paper's ``"paper"``);
``nproc > 1`` trains on that many processes with the model sharded by FSDP2 (:mod:`.parallel`).
The options themselves live in :mod:`.config`; this module re-exports them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.flora.accumulate import FloraAccumulator
from flora_graph.flora.optimizer import Flora
from flora_graph.training import parallel
from flora_graph.training.checkpoints import (
    CHECKPOINT_FORMAT,
    config_from_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_shards,
    restore,
    save_checkpoint,
)
from flora_graph.training.choices import OPTIMIZERS
from flora_graph.training.config import DEFAULT_LR, NO_COMPRESSION, TrainConfig, TrainConfigError, lr_at
from flora_graph.training.corpus import Corpus, WindowSampler, build_corpus, eval_windows

if TYPE_CHECKING:
    from flora_graph.model_export import ExportReport

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_LR",
    "NO_COMPRESSION",
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
    "training_corpus",
]


@dataclass
class TrainResult:
    """What :func:`train` did: the trained model and optimizer, loss curves, checkpoints, the export report."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # None after a multi-process run (its state stayed in the ranks)
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


def training_corpus(config: TrainConfig) -> Corpus:
    """The corpus ``config`` trains on (cached per process)."""
    return _corpus(config.corpus_bytes, float(config.eval_fraction), config.corpus_root)


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
                     weight_decay=config.weight_decay, seed=config.seed, update=config.flora_update)
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
    ranks: parallel.Ranks | None = None,
) -> float:
    """One optimizer step over ``config.accum`` micro-batches (this rank's rows of each); returns their mean loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for micro in range(config.accum):
        x, y = sampler.batch(step, micro)
        if ranks is not None:
            x, y = ranks.part(x), ranks.part(y)
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
    return (ranks.mean(loss_sum) if ranks is not None else loss_sum) / config.accum


def _evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], ranks: parallel.Ranks | None) -> float:
    """:func:`evaluate`; sharded, every rank evaluates the same batches and the root is resharded after."""
    loss = evaluate(model, batches)
    if ranks is not None:
        ranks.reshard(model)
    return loss


def _save(path: Path, config: TrainConfig, corpus: Corpus, done: int, parts: dict[str, Any],
          history: dict[str, list[list[float]]]) -> None:
    """Checkpoint ``step_NNNNNN.pt`` (and, sharded, its ``.dcp`` folder first; rank 0 writes the file)."""
    model, opt, acc, ranks = parts["model"], parts["optimizer"], parts["accumulator"], parts["ranks"]
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "version": 1, "step": done,
        "config": {**dataclasses.asdict(config), "resume": None}, "corpus_digest": corpus.digest,
        "accumulator": acc.state_dict() if acc is not None else None,
        "adapters": {n: m.training_state() for n, m in parts["adapters"].items()}, "history": history,
    }  # fmt: skip
    if ranks is None:
        save_checkpoint(path, {**payload, "model": model.state_dict(), "optimizer": opt.state_dict()})
        return
    # a fresh shard folder per write, named by the checkpoint file that is written last: the file's
    # rename is the one commit point, and folders no committed file names are leftovers
    folder = path.with_name(f"{path.stem}.{ranks.shared_token()}.dcp")
    ranks.save(folder, model, opt)
    if ranks.rank == 0:
        save_checkpoint(path, {**payload, "sharded": folder.name})
        remove_stale_shards(path, keep=folder.name)
    ranks.barrier()


def train(
    config: TrainConfig,
    progress: str | Callable[[int, int, dict[str, float]], None] | None = "rich",
    *,
    optimizer_factory: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train the decoder as ``config`` says; checkpoint, evaluate, and export it to ``out/model.onnx``.

    Args:
        config: the run (see :class:`TrainConfig`); ``config.resume`` continues from a checkpoint;
            ``config.nproc > 1`` runs it on that many processes (:mod:`.parallel`).
        progress: ``"rich"`` or ``"tqdm"`` for a progress bar, ``None`` for none, or a callable
            ``fn(step, steps, metrics)`` called after every step (one process only).
        optimizer_factory: builds the optimizer instead of ``config.optimizer`` (which still picks
            the model: plain, LoRA or FloraAdapter); e.g. GaLore in the benchmarks (one process only).

    Returns:
        :class:`TrainResult`; ``export`` holds the ONNX parity report when ``config.export``.

    Raises:
        TrainConfigError: a bad option, or a checkpoint that does not fit ``config``.
    """
    if config.nproc > 1 and not parallel.in_rank(config):
        return parallel.launch(config, progress, optimizer_factory)
    ranks = parallel.Ranks() if config.nproc > 1 else None
    corpus = training_corpus(config)
    sampler = WindowSampler(corpus.train, config.batch, config.seq, seed=config.seed)
    eval_set = eval_windows(corpus.eval, config.batch, config.seq, config.eval_batches)
    model = build_model(config)
    if ranks is not None:
        ranks.shard(model)
    opt = optimizer_factory(model, config) if optimizer_factory is not None else build_optimizer(config, model)
    adapters = _flora_adapters(model)
    acc = None
    if config.compressed_accumulation:
        acc = FloraAccumulator([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                               rank=config.rank, seed=config.seed)
    parts = {"model": model, "optimizer": opt, "accumulator": acc, "adapters": adapters, "ranks": ranks}
    train_losses: list[tuple[int, float]] = []
    eval_losses: list[tuple[int, float]] = []
    start = 0
    if config.resume is not None:
        ckpt = load_checkpoint(config.resume)
        start = restore(config, ckpt, corpus, parts)
        train_losses = [(int(s), float(v)) for s, v in ckpt["history"]["train"]]
        eval_losses = [(int(s), float(v)) for s, v in ckpt["history"]["eval"]]
        if start > config.steps:
            raise TrainConfigError(f"resume: the checkpoint is at step {start}, past steps={config.steps}")
    else:
        eval_losses.append((0, _evaluate(model, eval_set, ranks)))
    out = Path(config.out) if config.out is not None else None
    checkpoints: list[Path] = []
    bar = _Progress(progress, config.steps, start)
    seconds = 0.0
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            lr = lr_at(config, step)
            loss = _train_step(config, step, lr, model, opt, acc, adapters, sampler, ranks)
            seconds += time.perf_counter() - t0
            done = step + 1
            train_losses.append((done, loss))
            metrics: dict[str, float] = {"loss": train_losses[-1][1], "lr": lr}
            if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
                eval_losses.append((done, _evaluate(model, eval_set, ranks)))
                metrics["eval"] = eval_losses[-1][1]
            if out is not None and ((config.ckpt_every and done % config.ckpt_every == 0) or done == config.steps):
                path = out / "checkpoints" / f"step_{done:06d}.pt"
                history = {"train": [list(t) for t in train_losses], "eval": [list(t) for t in eval_losses]}
                _save(path, config, corpus, done, parts, history)
                checkpoints.append(path)
            bar.update(done, metrics)
    finally:
        bar.close()
    exporting = config.export and out is not None and ranks is None  # a multi-process run exports in the launcher
    report = export_decoder(model, corpus, out / "model.onnx") if exporting else None
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
