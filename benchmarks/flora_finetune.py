"""Flora when fine-tuning: a pretrained decoder adapted to another domain, in a regime where momentum matters.

Two domains that every Python install ships (no download):

- **pretraining**: the built-in decoder (:func:`flora_graph.models.decoder.build_decoder`, no
  LoRA) trained from scratch with AdamW on the standard library's ``*.py`` sources
  (:func:`flora_graph.training.corpus.build_corpus`). The weights are cached as safetensors under
  ``--cache`` (one file per pretraining config and corpus digest, written atomically) and reused;
- **fine-tuning**: the English reference text of ``pydoc_data.topics`` (the help texts ``help()``
  prints: language reference prose, ~750 KB in Python 3.11), a stdlib module of every install,
  kept out of the pretraining corpus (checked). Each topic is one document ``BOS bytes+3 EOS``;
  topics are split train/eval by a stable hash of their name.

Every fine-tuning run starts from the same pretrained weights and trains for ``--steps`` steps of
``--batch`` windows of ``--seq`` bytes (10% linear warm-up, cosine decay to 10%, gradient-norm
clip 1: the trainer's schedule, :func:`flora_graph.training.trainer.lr_at`), and is evaluated
on the same fixed eval windows.

The task: momentum must matter (Adafactor without it at least 2% worse), else the comparison
says nothing about compressed momentum. Measured on seed 0 with each lr tuned (gap = Adafactor
without momentum over with it): batch 2 x 1000 steps -0.1%, batch 4 x 600 -0.3%, batch 16 x 150
-0.4%, batch 64 x 50 -0.2%, batch 64 x 100 +1.2%, batch 128 x 50 +1.8% / +1.7% (seeds 0 / 1),
batch 256 x 25 +2.8%. Small batches do not make momentum matter here: their best lr is small,
where an exponential average of the updates changes little but the delay; it matters in the
curvature-limited regime of large batches and large learning rates, which momentum's effective
step ``lr / (1 - beta1)`` keeps stable. Hence the default: 25 steps of 256 windows (about one
pass over the fine-tuning text). Methods:

- ``adam``: ``torch.optim.AdamW`` (weight decay 0);
- ``adafactor+m`` / ``adafactor``: Adafactor (factored second moment) with momentum ``beta1 = 0.9``
  / without momentum: our ``Flora`` with compression off (``beta1 = 0`` for the second);
- ``flora r=8`` / ``flora r=32``: ``Flora`` with the default ``update="scaled"`` rule;
- ``flora-lift r=8``: ``Flora`` with ``update="lift"`` (the fresh update in full outside the
  sketched subspace, the default before ``scaled``), to show what the scaling does;
- ``flora-paper r=8`` / ``flora-paper r=32``: ``Flora`` with ``update="paper"`` (Algorithm 2);
- ``lora r=8`` / ``lora r=32``: LoRA on the seven projections of the pretrained decoder (base
  frozen), embedding, norms and head trained in full, all with AdamW (the trainer's ``lora-adam``);
- ``galore r=8``: ``galore_torch.GaLoreAdamW`` on the projections (when installed; otherwise the
  row is skipped with the reason printed).

Each method runs without accumulation (one batch of ``--batch`` windows per step) and with
``--accum`` micro-batches of ``batch / accum`` windows summed per step (the same windows per
step): Flora's sum is kept compressed by :class:`~flora_graph.flora.FloraAccumulator`
(``compressed``), every other method sums in ``.grad`` (``full``); Flora r=8 / r=32 also run with
full buffers, the reference for compressed accumulation. The learning rate is swept on the first
seed for each method and for each compressed-accumulation variant (that grid and half its
smallest lr; a best lr at the edge of its grid is flagged ``EDGE``); a full-buffer accumulation run computes the same gradient as the
single batch, so it reuses that method's lr. The best lr then runs on every seed. Reported:
mean and min-max of the final eval loss over seeds, training wall time per run, optimizer state
bytes and accumulation buffer bytes.

Checked: Adafactor without momentum at least 2% worse than with momentum; Flora r=8 within 1% of Adafactor with momentum (mean over
seeds); Flora r=8 better than LoRA r=8 and GaLore r=8 by more than the seed spread (the larger
min-max range of the two); compressed accumulation within 3% of full buffers at r=32.
``--accum-projection`` picks ``FloraAccumulator``'s projection for the compressed variants
(default: the library's, ``orthogonal``; see ``docs/FLORA_ACCUMULATION.md``).

Writes ``OUT/flora_finetune.json`` (every run and the summary) and ``OUT/flora_finetune.png``
(mean eval-loss curves), atomically.

Run: ``python benchmarks/flora_finetune.py`` (about 21 minutes of one core: 90 runs of about
13 s and 50 s of pretraining, cached after the first run; 26 minutes wall on a busy 2-core machine) or ``--quick`` (a 1-2 minute smoke run
of every method and variant, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _flora_common import at_edge, galore_factory, galore_missing, optimizer_state_bytes
from torch import nn

from flora_graph.errors import FloraGraphError
from flora_graph.flora import FloraAccumulator
from flora_graph.flora.accumulate import PROJECTIONS
from flora_graph.flora.errors import NonFiniteGradientError
from flora_graph.flora.projection import stable_seed
from flora_graph.models.decoder import DECODER_PROJECTIONS, EOS, byte_tokenize
from flora_graph.storage import atomic_write_bytes, atomic_write_figure, read_regular
from flora_graph.training.corpus import Corpus, WindowSampler, eval_windows
from flora_graph.training.trainer import (
    TrainConfig,
    _train_step,
    build_model,
    build_optimizer,
    evaluate,
    lr_at,
    train,
    training_corpus,
)

__all__ = [
    "METHODS",
    "FinetuneBenchError",
    "Method",
    "docs_corpus",
    "finetune",
    "load_or_pretrain",
    "main",
    "summarize",
]

DOCS_MODULE = "pydoc_data/topics.py"  # the fine-tuning text; must stay out of the pretraining corpus
EVAL_BATCH = 16  # eval windows per batch, whatever the training batch


class FinetuneBenchError(FloraGraphError, RuntimeError):
    """The benchmark cannot run as asked: a bad option, a corrupt cache file, or an overlap of the two domains."""


@dataclass(frozen=True)
class Method:
    """One optimizer of the table: ``TrainConfig`` overrides, its learning-rate grid, an optional factory."""

    name: str
    overrides: dict[str, Any]
    lrs: tuple[float, ...]
    factory: str | None = None  # "galore": galore_torch.GaLoreAdamW

    @property
    def is_flora(self) -> bool:
        """Whether the method is ``Flora`` with compression (its accumulation can be compressed)."""
        return self.overrides.get("optimizer") == "flora"


# lr grids: centred on the best of a wider sweep on seed 0 of the default task (batch 256 x 25 steps)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adam", {"optimizer": "adam"}, (4e-3, 8e-3, 1.6e-2)),
    Method("adafactor+m", {"optimizer": "adafactor"}, (1.6e-2, 3.2e-2, 6.4e-2)),
    Method("adafactor", {"optimizer": "adafactor", "beta1": 0.0}, (4e-3, 8e-3, 1.6e-2)),
    Method("flora r=8", {"optimizer": "flora", "rank": 8}, (1.6e-2, 3.2e-2, 6.4e-2)),
    Method("flora r=32", {"optimizer": "flora", "rank": 32}, (1.6e-2, 3.2e-2, 6.4e-2)),
    Method("flora-lift r=8", {"optimizer": "flora", "rank": 8, "flora_update": "lift"}, (4e-3, 8e-3, 1.6e-2, 3.2e-2)),
    Method("flora-paper r=8", {"optimizer": "flora", "rank": 8, "flora_update": "paper"}, (8e-3, 1.6e-2, 3.2e-2)),
    Method("flora-paper r=32", {"optimizer": "flora", "rank": 32, "flora_update": "paper"}, (1.6e-2, 3.2e-2, 6.4e-2)),
    Method("lora r=8", {"optimizer": "lora-adam", "rank": 8}, (1.6e-2, 3.2e-2, 6.4e-2)),
    Method("lora r=32", {"optimizer": "lora-adam", "rank": 32}, (8e-3, 1.6e-2, 3.2e-2)),
    Method("galore r=8", {"optimizer": "adam", "rank": 8}, (1.6e-2, 3.2e-2, 6.4e-2), factory="galore"),
)}  # fmt: skip
FULL_BUFFER_FLORA = ("flora r=8", "flora r=32")  # also run with full accumulation buffers (the reference)


# ---------------------------------------------------------------------- the two domains
def docs_corpus(eval_fraction: float = 0.1, budget_bytes: int | None = None) -> Corpus:
    """The fine-tuning corpus: the texts of ``pydoc_data.topics``, one ``BOS bytes+3 EOS`` document per topic.

    Topics are taken in sorted order of their names; a topic goes to the eval split when
    ``stable_seed("flora.finetune.docs", name) % 1000 < 1000 * eval_fraction``. ``budget_bytes``
    caps the text taken (``None``: all of it).

    Raises:
        FinetuneBenchError: the module is missing or a split is empty.
    """
    try:
        import pydoc_data.topics as mod
    except ImportError as exc:
        raise FinetuneBenchError(f"the stdlib module pydoc_data.topics is missing ({exc}); it ships with CPython") from exc
    if not 0.0 < eval_fraction < 1.0:
        raise FinetuneBenchError(f"docs_corpus: eval_fraction must be in (0, 1), got {eval_fraction!r}")
    parts: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
    files: dict[str, list[str]] = {"train": [], "eval": []}
    sha = hashlib.sha256()
    used = 0
    for name in sorted(mod.topics):
        text = mod.topics[name]
        if budget_bytes is not None:  # cut at the budget, on a character boundary
            text = text.encode("utf-8")[: max(0, budget_bytes - used)].decode("utf-8", errors="ignore")
        data = text.encode("utf-8")
        if not data:
            continue
        used += len(data)
        split = "eval" if stable_seed("flora.finetune.docs", name) % 1000 < 1000 * eval_fraction else "train"
        ids = byte_tokenize(text)[0]
        parts[split].append(torch.cat([ids, torch.tensor([EOS])]).to(torch.int16))
        files[split].append(name)
        sha.update(f"{split}\0{name}\0{len(data)}\0".encode())
        sha.update(data)
    if not files["train"] or not files["eval"]:
        raise FinetuneBenchError(f"docs_corpus: a split is empty ({len(files['train'])} train / "
                                 f"{len(files['eval'])} eval topics); raise the budget or the eval fraction")
    return Corpus(torch.cat(parts["train"]), torch.cat(parts["eval"]), tuple(files["train"]), tuple(files["eval"]),
                  str(Path(mod.__file__).parent), sha.hexdigest())


def pretrain_config(args: argparse.Namespace) -> TrainConfig:
    """The pretraining run: AdamW on the stdlib ``*.py`` corpus, seed 0, no export."""
    return TrainConfig(steps=args.pretrain_steps, batch=16, seq=args.seq, lr=args.pretrain_lr, optimizer="adam",
                       hidden=args.hidden, layers=args.layers, intermediate=args.hidden * 172 // 64,
                       corpus_bytes=args.pretrain_bytes, eval_every=0, export=False, seed=0)


def load_or_pretrain(config: TrainConfig, cache: str | Path, log: Callable[[str], None] = print
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pretrained decoder weights for ``config``: read from ``cache`` or trained now and cached (atomic write).

    The file is ``decoder-<key>.safetensors``, ``key`` hashing the config and the corpus digest;
    its metadata repeats the key and holds the pretraining eval loss.

    Raises:
        FinetuneBenchError: the cached file is unreadable, for another config, or the two domains overlap.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load, save

    corpus = training_corpus(config)
    if DOCS_MODULE in corpus.train_files + corpus.eval_files:
        raise FinetuneBenchError(f"the pretraining corpus contains {DOCS_MODULE}, the fine-tuning text; "
                                 "lower --pretrain-bytes")
    blob = json.dumps({"config": dataclasses.asdict(config), "corpus": corpus.digest}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    path = Path(cache).expanduser() / f"decoder-{key}.safetensors"
    if path.exists():
        try:
            data = read_regular(path)
            state = load(data)
            # the header (8-byte little-endian length, then JSON) holds the metadata
            meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        except (OSError, SafetensorError, ValueError) as exc:
            raise FinetuneBenchError(f"{path}: unreadable pretrained weights ({exc}); delete the file") from exc
        if meta.get("key") != key:
            raise FinetuneBenchError(f"{path}: metadata key {meta.get('key')!r} != {key!r}; delete the file")
        log(f"pretrained decoder: {path} (cached)")
        return state, {"path": str(path), "key": key, "cached": True, **json.loads(meta.get("info", "{}"))}
    log(f"pretraining the decoder ({config.steps} steps of {config.batch} x {config.seq} bytes of stdlib sources)...")
    t0 = time.perf_counter()
    result = train(config, progress=None)
    info = {"pretrain_eval_loss": result.final_eval_loss, "pretrain_seconds": time.perf_counter() - t0,
            "corpus_digest": corpus.digest, "config": dataclasses.asdict(config)}
    state = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"key": key, "info": json.dumps(info)}), what="pretrained weights")
    log(f"pretrained in {info['pretrain_seconds']:.0f} s, eval loss on stdlib sources {result.final_eval_loss:.4f}; "
        f"cached at {path}")
    return state, {"path": str(path), "key": key, "cached": False, **info}


# ---------------------------------------------------------------------- fine-tuning
def finetune_model(config: TrainConfig, pretrained: dict[str, torch.Tensor]) -> nn.Module:
    """The pretrained decoder (LoRA on its projections for ``lora-adam``, seeded by ``config.seed``)."""
    from flora_graph.adapters import apply_lora

    model = build_model(dataclasses.replace(config, optimizer="adam"))
    model.load_state_dict(pretrained, strict=True)
    if config.optimizer == "lora-adam":
        torch.manual_seed(stable_seed("flora.finetune.lora", config.seed) % 2**31)
        apply_lora(model, list(DECODER_PROJECTIONS), rank=config.rank, alpha=2 * config.rank)
    return model.train()


def finetune(config: TrainConfig, pretrained: dict[str, torch.Tensor], corpus: Corpus,
             eval_set: list[tuple[torch.Tensor, torch.Tensor]], *, eval_every: int,
             factory: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] | None = None,
             make_accumulator: Callable[[list[tuple[str, torch.Tensor]], TrainConfig], FloraAccumulator] | None = None,
             ) -> dict[str, Any]:
    """Fine-tune the pretrained decoder as ``config`` says on ``corpus.train``; eval curve on ``eval_set``.

    ``make_accumulator(named_trainable, config)`` builds the compressed accumulator when
    ``config.compressed_accumulation`` (default: ``FloraAccumulator(named, config.rank, config.seed)``).

    Returns ``final_eval_loss`` (``inf`` when the run diverged), ``eval`` (``[step, loss]``, step 0
    the pretrained model), ``train`` losses, ``train_seconds`` (training steps only),
    ``state_bytes`` (optimizer state) and ``accum_bytes`` (accumulation buffers: compressed, or
    the full ``.grad`` of the trainable parameters when ``config.accum > 1``, else 0).
    """
    model = finetune_model(config, pretrained)
    opt = factory(model, config) if factory is not None else build_optimizer(config, model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = None
    accum_bytes = 0
    if config.compressed_accumulation:
        make = make_accumulator or (lambda nps, c: FloraAccumulator(nps, rank=c.rank, seed=c.seed))
        acc = make(named, config)
        accum_bytes = acc.accumulation_bytes()
    elif config.accum > 1:
        accum_bytes = sum(p.numel() * p.element_size() for _, p in named)
    sampler = WindowSampler(corpus.train, config.batch, config.seq, seed=config.seed)
    curve = [[0, evaluate(model, eval_set)]]
    train_losses: list[list[float]] = []
    seconds, error = 0.0, None
    for step in range(config.steps):
        t0 = time.perf_counter()
        try:
            loss = _train_step(config, step, lr_at(config, step), model, opt, acc, {}, sampler)
        except NonFiniteGradientError:
            loss = math.nan
        seconds += time.perf_counter() - t0
        if not math.isfinite(loss):
            error = f"non-finite loss at step {step + 1}"
            break
        train_losses.append([step + 1, loss])
        if (step + 1) % eval_every == 0 or step + 1 == config.steps:
            curve.append([step + 1, evaluate(model, eval_set)])
    final = curve[-1][1] if error is None and math.isfinite(curve[-1][1]) else math.inf
    return {"final_eval_loss": final, "eval": curve, "train": train_losses, "train_seconds": seconds,
            "state_bytes": optimizer_state_bytes(opt), "accum_bytes": accum_bytes, "error": error}


# ---------------------------------------------------------------------- jobs
_WORKER: dict[str, Any] = {}


def _context(ctx: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Corpus, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Pretrained weights, docs corpus and eval windows (loaded once per process)."""
    key = (ctx["weights"], ctx["docs_bytes"], ctx["base"]["seq"], ctx["eval_batches"])
    if _WORKER.get("key") != key:
        from safetensors.torch import load

        corpus = docs_corpus(budget_bytes=ctx["docs_bytes"])
        _WORKER.update(key=key, state=load(read_regular(ctx["weights"])), corpus=corpus,
                       eval_set=eval_windows(corpus.eval, EVAL_BATCH, ctx["base"]["seq"], ctx["eval_batches"]))
    return _WORKER["state"], _WORKER["corpus"], _WORKER["eval_set"]


def job_config(job: dict[str, Any], base: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` of one job: the shared base, the method's overrides, the variant, lr and seed."""
    method = METHODS[job["method"]]
    over = {**base, **method.overrides, "lr": job["lr"], "seed": job["seed"]}
    if job["variant"] != "none":
        over.update(batch=base["batch"] // job["accum"], accum=job["accum"], accumulator=job["variant"])
    return TrainConfig(**over)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (method, variant, lr, seed) fine-tuning job; in a worker process or in this one."""
    torch.set_num_threads(job["ctx"]["threads"])
    state, corpus, eval_set = _context(job["ctx"])
    config = job_config(job, job["ctx"]["base"])
    factory = galore_factory(config.rank, job["ctx"]["galore_gap"]) if METHODS[job["method"]].factory else None
    t0 = time.perf_counter()
    projection = job["ctx"]["accum_projection"]
    out = finetune(config, state, corpus, eval_set, eval_every=job["ctx"]["eval_every"], factory=factory,
                   make_accumulator=lambda nps, c: FloraAccumulator(nps, rank=c.rank, seed=c.seed,
                                                                    projection=projection))
    out.update({k: job[k] for k in ("method", "variant", "lr", "seed", "phase")}, wall_seconds=time.perf_counter() - t0)
    print(f"  {job['method']:<17}{job['variant']:<11} lr {job['lr']:<8g} seed {job['seed']}  final eval "
          f"{out['final_eval_loss']:.4f}  ({out['wall_seconds']:.0f} s){'  ' + out['error'] if out['error'] else ''}",
          flush=True)
    return out


def _run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(run_job, jobs))


def variants_of(method: Method, accum: int) -> list[str]:
    """The accumulation variants a method runs: ``none``, then ``compressed`` (Flora) or ``full``."""
    if accum <= 1:
        return ["none"]
    if method.is_flora:
        return ["none", "compressed", *(["full"] if method.name in FULL_BUFFER_FLORA else [])]
    return ["none", "full"]


def sweep_grid(method: Method, variant: str, lrs: Sequence[float] | None) -> tuple[float, ...] | None:
    """The lrs swept for a (method, variant); ``None`` (``full``): it reuses the ``none`` variant's best lr.

    Compressed accumulation sweeps the method's grid and half its smallest lr (on this task the
    compressed sums of the ``paper`` rule wanted a smaller lr than its uncompressed runs).
    """
    grid = tuple(lrs) if lrs else method.lrs
    if variant == "compressed":
        return (min(grid) / 2, *grid)
    return None if variant == "full" else grid


# ---------------------------------------------------------------------- summary
def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``"method/variant"``: best lr, per-seed final losses at it, mean / min / max / std, time, bytes, EDGE."""
    out: dict[str, dict[str, Any]] = {}
    keys = list(dict.fromkeys((r["method"], r["variant"]) for r in runs))
    for method, variant in keys:
        mine = [r for r in runs if r["method"] == method and r["variant"] == variant]
        sweep = [r for r in mine if r["phase"] == "sweep"]
        best = min(sweep or mine, key=lambda r: r["final_eval_loss"])
        at_best = sorted((r for r in mine if r["lr"] == best["lr"]), key=lambda r: r["seed"])
        losses = [r["final_eval_loss"] for r in at_best]
        finite = all(math.isfinite(x) for x in losses)
        out[f"{method}/{variant}"] = {
            "method": method, "variant": variant, "lr": best["lr"], "seeds": [r["seed"] for r in at_best],
            "losses": losses, "mean": statistics.fmean(losses) if finite else math.inf,
            "min": min(losses), "max": max(losses),
            "std": statistics.pstdev(losses) if finite and len(losses) > 1 else 0.0,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in at_best),
            "state_bytes": at_best[0]["state_bytes"], "accum_bytes": at_best[0]["accum_bytes"],
            "edge": bool(sweep) and at_edge(best, sweep, lambda _: True),
            "sweep": {f"{r['lr']:g}": r["final_eval_loss"] for r in sweep},
            "curve": _mean_curve(at_best),
        }
    return out


def _mean_curve(runs: list[dict[str, Any]]) -> list[list[float]]:
    """The eval curve averaged over seeds (steps every run reached)."""
    if not runs or any(r["error"] for r in runs):
        return []
    steps = [s for s, _ in runs[0]["eval"]]
    return [[s, statistics.fmean(r["eval"][i][1] for r in runs)] for i, s in enumerate(steps)
            if all(len(r["eval"]) > i for r in runs)]


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The checked lines: name, measured figure, threshold, whether it holds (``None``: not measured)."""
    def get(key: str) -> dict[str, Any] | None:
        return summary.get(key)

    def spread(a: dict[str, Any], b: dict[str, Any]) -> float:
        return max(a["max"] - a["min"], b["max"] - b["min"])

    lines: list[dict[str, Any]] = []
    am, a0 = get("adafactor+m/none"), get("adafactor/none")
    if am and a0:
        gap = (a0["mean"] / am["mean"] - 1) * 100
        lines.append({"name": "adafactor without momentum >= 2% worse than with momentum",
                      "value": f"{gap:+.2f}%", "figure": gap, "holds": gap >= 2.0})
    f8 = get("flora r=8/none")
    if f8 and am:
        gap = (f8["mean"] / am["mean"] - 1) * 100
        lines.append({"name": "flora r=8 within 1% of adafactor+m (mean of seeds)", "value": f"{gap:+.2f}%",
                      "figure": gap, "holds": gap <= 1.0})
    for other in ("lora r=8", "galore r=8"):
        o = get(f"{other}/none")
        if f8 and o:
            margin, sp = o["mean"] - f8["mean"], spread(f8, o)
            lines.append({"name": f"flora r=8 better than {other} by more than the seed spread",
                          "value": f"margin {margin:+.4f} vs spread {sp:.4f}", "figure": margin - sp,
                          "holds": margin > sp})
        elif f8:
            lines.append({"name": f"flora r=8 better than {other} by more than the seed spread",
                          "value": "not run", "figure": None, "holds": None})
    for rank in (32, 8):
        c, f = get(f"flora r={rank}/compressed"), get(f"flora r={rank}/full")
        if c and f:
            gap = (c["mean"] / f["mean"] - 1) * 100
            lines.append({"name": f"compressed accumulation within 3% of full buffers at r={rank}"
                                  + ("" if rank == 32 else " (for reference)"),
                          "value": f"{gap:+.2f}%", "figure": gap, "holds": gap <= 3.0})
    return lines


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n else "-"


def table(summary: dict[str, dict[str, Any]], ref_key: str = "adafactor+m/none") -> str:
    """The printed table: one row per method and variant."""
    ref = summary.get(ref_key, {}).get("mean")
    head = (f"{'method':<18}{'accum':<11}{'lr':>8}{'mean eval':>11}{'min-max':>17}{'std':>8}{'vs adaf+m':>10}"
            f"{'s/run':>7}{'opt state':>12}{'accum buf':>12}  sweep")
    rows = [head, "-" * len(head)]
    for s in summary.values():
        vs = f"{(s['mean'] / ref - 1) * 100:+.2f}%" if ref and math.isfinite(s["mean"]) else "-"
        sweep = ", ".join(f"{k}: {v:.4f}" for k, v in s["sweep"].items()) or "(lr of accum none)"
        rows.append(f"{s['method']:<18}{s['variant']:<11}{s['lr']:>8g}{s['mean']:>11.4f}"
                    f"{s['min']:>8.4f}-{s['max']:<8.4f}{s['std']:>8.4f}{vs:>10}{s['train_seconds']:>7.1f}"
                    f"{_fmt_bytes(s['state_bytes']):>12}{_fmt_bytes(s['accum_bytes']):>12}  {sweep}"
                    f"{'  EDGE' if s['edge'] else ''}")
    return "\n".join(rows)


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Mean eval-loss curves at each method's best lr: no accumulation, and accumulation (PNG, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for s in summary.values():
        if not s["curve"]:
            continue
        steps, losses = zip(*s["curve"], strict=True)
        ax = axes[0] if s["variant"] == "none" else axes[1]
        label = s["method"] if s["variant"] == "none" else f"{s['method']} ({s['variant']})"
        ax.plot(steps[1:], losses[1:], "--" if s["variant"] == "full" else "-",
                label=f"{label}, lr {s['lr']:g}: {s['mean']:.3f}")
    axes[0].set(title=title, xlabel="step", ylabel="eval loss (nats/byte)")
    axes[1].set(title="with gradient accumulation", xlabel="step", ylabel="eval loss (nats/byte)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_figure(path, fig, what="plot")


# ---------------------------------------------------------------------- CLI
QUICK = {"steps": 10, "batch": 64, "pretrain_steps": 150, "seeds": [0], "eval_every": 5, "eval_batches": 4,
         "docs_bytes": 200_000}


def parser() -> argparse.ArgumentParser:
    """The command line (``--help`` lists every option with its default)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run (1-2 minutes): overrides {', '.join(f'{k}={v}' for k, v in QUICK.items())} "
                         "and one lr per method (the middle of its grid)")
    ap.add_argument("--steps", type=int, default=25, help="fine-tuning steps")
    ap.add_argument("--batch", type=int, default=256, help="windows per step (a multiple of --accum)")
    ap.add_argument("--seq", type=int, default=64, help="bytes per window")
    ap.add_argument("--accum", type=int, default=16, help="micro-batches per step of the accumulation variants (1: none)")
    ap.add_argument("--hidden", type=int, default=64, help="decoder width")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks")
    ap.add_argument("--kappa", type=int, default=1000, help="Flora steps between projection resamples")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (the first is swept)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                    help=f"methods to run, of: {', '.join(METHODS)}")
    ap.add_argument("--lrs", type=float, nargs="+", help="one lr grid for every method (none: each method's own)")
    ap.add_argument("--accum-projection", default=PROJECTIONS[0], choices=PROJECTIONS,
                    help="FloraAccumulator projection of the compressed variants")
    ap.add_argument("--pretrain-steps", type=int, default=1500, help="AdamW steps of pretraining (batch 16)")
    ap.add_argument("--pretrain-lr", type=float, default=8e-3, help="pretraining lr")
    ap.add_argument("--pretrain-bytes", type=int, default=1 << 20, help="bytes of stdlib sources to pretrain on")
    ap.add_argument("--docs-bytes", type=int, default=None, help="cap on the fine-tuning text in bytes (none: all of it)")
    ap.add_argument("--eval-every", type=int, default=5, help="fine-tuning steps between evaluations")
    ap.add_argument("--eval-batches", type=int, default=16, help=f"eval batches of {EVAL_BATCH} windows")
    ap.add_argument("--galore-gap", type=int, default=200, help="GaLore update_proj_gap")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--cache", default=str(Path("~/.cache/flora_graph/flora_finetune")),
                    help="folder of the cached pretrained weights")
    ap.add_argument("--out", default="bench-out", help="folder of flora_finetune.json and flora_finetune.png")
    return ap


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch", "seq", "accum", "hidden", "layers", "kappa", "pretrain_steps", "eval_every",
                 "eval_batches", "jobs", "threads"):
        if getattr(args, name) < 1:
            raise FinetuneBenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch % args.accum:
        raise FinetuneBenchError(f"--batch {args.batch} must be a multiple of --accum {args.accum}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and the targets; write the JSON and the PNG; return the record."""
    args = parser().parse_args(argv)
    quick = args.quick
    if quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    _check_args(args)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    skipped: dict[str, str] = {}
    methods = [METHODS[m] for m in args.methods]
    if any(m.factory == "galore" for m in methods) and (why := galore_missing()):
        skipped = {m.name: why for m in methods if m.factory == "galore"}
        methods = [m for m in methods if m.factory != "galore"]
        for name, reason in skipped.items():
            print(f"skipping {name}: {reason}")
    _, pre = load_or_pretrain(pretrain_config(args), args.cache)
    base = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "hidden": args.hidden, "layers": args.layers,
            "intermediate": args.hidden * 172 // 64, "kappa": args.kappa, "export": False, "eval_every": 0}
    ctx = {"weights": pre["path"], "base": base, "threads": args.threads, "galore_gap": args.galore_gap,
           "eval_every": args.eval_every, "eval_batches": args.eval_batches, "docs_bytes": args.docs_bytes,
           "accum_projection": args.accum_projection}
    corpus = _context(ctx)[1]
    print(f"fine-tuning on {corpus!r}\n{len(methods)} methods x {args.seeds} seeds: {args.steps} steps of "
          f"{args.batch} x {args.seq} bytes (accumulation: {args.accum} x {args.batch // args.accum}), decoder "
          f"hidden {args.hidden} x {args.layers} layers, {args.jobs} process(es) x {args.threads} thread(s)",
          flush=True)

    def job(m: Method, variant: str, lr: float, seed: int, phase: str) -> dict[str, Any]:
        return {"method": m.name, "variant": variant, "lr": lr, "seed": seed, "phase": phase, "accum": args.accum,
                "ctx": ctx}

    plan = [(m, v) for m in methods for v in variants_of(m, args.accum)]
    first, rest = args.seeds[0], args.seeds[1:]
    grids = {(m.name, v): sweep_grid(m, v, args.lrs) for m, v in plan}
    if quick:
        grids = {k: (g[len(g) // 2],) if g else None for k, g in grids.items()}
    print(f"sweep (seed {first}):", flush=True)
    runs = _run_all([job(m, v, lr, first, "sweep") for m, v in plan for lr in grids[(m.name, v)] or ()], args.jobs)
    best_lr = {k: s["lr"] for k, s in ((k, v) for k, v in summarize(runs).items())}
    later = []
    for m, v in plan:
        lr = best_lr[f"{m.name}/{v}"] if grids[(m.name, v)] else best_lr[f"{m.name}/none"]
        seeds = rest if grids[(m.name, v)] else args.seeds
        later += [job(m, v, lr, s, "seeds") for s in seeds]
    if later:
        print(f"best lr on seeds {rest} (full-buffer accumulation: the lr of no accumulation, every seed):", flush=True)
        runs += _run_all(later, args.jobs)
    summary = summarize(runs)
    total = time.perf_counter() - t_start

    print("\n" + table(summary))
    print("(eval loss in nats per byte after fine-tuning; pretrained start "
          f"{runs[0]['eval'][0][1]:.4f}; s/run: training steps only, mean over seeds)")
    edges = [k for k, s in summary.items() if s["edge"]]
    if edges:
        print(f"best lr at the edge of its grid (widen it): {edges}")
    for name, reason in skipped.items():
        print(f"{name}: skipped, {reason}")
    checks = targets(summary)
    print("\ntargets" + (" (--quick: one seed, few steps: not a measurement)" if quick else "") + ":")
    for c in checks:
        mark = {True: "[x]", False: "[ ]", None: "[-]"}[c["holds"]]
        verdict = {True: "holds", False: "MISSED", None: "not checked"}[c["holds"]]
        print(f"  {mark} {c['name']}: {c['value']} -> {verdict}")
    print(f"total {total:.0f} s")

    out = Path(args.out)
    record = {
        "config": {k: v for k, v in vars(args).items()}, "quick": quick,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                     "cpus": os.cpu_count()},
        "pretrain": pre, "docs_corpus": {"root": corpus.root, "digest": corpus.digest,
                                         "train_tokens": corpus.train.numel(), "eval_tokens": corpus.eval.numel()},
        "skipped": skipped, "summary": summary, "targets": checks, "lr_at_grid_edge": edges, "runs": runs,
        "seconds": total,
    }  # fmt: skip
    atomic_write_bytes(out / "flora_finetune.json", json.dumps(record, indent=1, default=str).encode(), what="results")
    plot(summary, out / "flora_finetune.png",
         f"fine-tuning h{args.hidden} x{args.layers}: {args.steps} steps of {args.batch}x{args.seq} bytes")
    print(f"wrote {out / 'flora_finetune.json'} and {out / 'flora_finetune.png'}")
    return record


if __name__ == "__main__":
    try:
        main()
    except FinetuneBenchError as exc:
        sys.exit(f"flora_finetune: {exc}")
