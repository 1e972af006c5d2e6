"""Flora quality from scratch: final eval loss of the built-in decoder against full-rank and low-rank methods.

Every method trains the same seeded decoder (``hidden 128``, 2 layers, byte-level) on the same
batches of the stdlib corpus (:mod:`flora_graph.training.corpus`), for the same steps with the same
schedule (10% linear warm-up, cosine decay to 10%, gradient-norm clip 1), through
:func:`flora_graph.training.trainer.train`. Each method gets a small learning-rate sweep and is
reported at its best final eval loss:

- ``adam``: full-rank ``torch.optim.AdamW`` (weight decay 0);
- ``adafactor+m``: Adafactor with momentum ``beta1 = 0.9`` (factored second moment, full momentum):
  our ``Flora`` with compression off (rank above every matrix side), since
  ``torch.optim.Adafactor`` has no momentum. It is exactly the method Flora approximates;
- ``adafactor``: the same with ``beta1 = 0`` (no momentum at all), for reference;
- ``flora r=8`` / ``flora r=32``: our ``Flora`` (compressed momentum ``r x max(n, m)``; the default
  ``update="scaled"``: the matrix nearest the fresh Adafactor update, scaled to the momentum's
  norm, whose compression is the momentum, see :mod:`flora_graph.flora.optimizer`; ``kappa``
  1000, i.e. no resample within the run unless ``--kappa`` says otherwise);
- ``flora-lift r=8``: the same with ``update="lift"`` (the fresh update unscaled);
- ``flora-paper r=8`` / ``flora-paper r=32``: our ``Flora`` with ``update="paper"``: the paper's
  Algorithm 2 (unbiased decompression ``P^T C``, transfer ``P_new P_old^T C`` at each resample),
  for comparison with the default rule above (same state, same seeds);
- ``flora-opt r=8``: the ``flora-opt`` package's ``Flora`` (the paper authors'; fixed lr,
  ``scale_parameter=False``), whose update mixes the fresh gradient uncompressed into the
  decompressed momentum, for reference;
- ``lora r=8``: LoRA on the seven projections (random base frozen) with AdamW; embedding, norms and
  head trained in full (as GaLore's low-rank pre-training baselines);
- ``galore r=8``: ``galore_torch.GaLoreAdamW`` on the seven projections (``scale 0.25``, projection
  every ``--galore-gap`` steps), AdamW on the rest.

Targets checked: Flora r=8 within 3% of the best full-rank optimizer (``adam``, ``adafactor+m``)
and below LoRA r=8. One seed: differences under ~1% are within run-to-run noise.

A best learning rate at the edge of its grid is flagged (``EDGE``): that grid must be widened.

Gradient accumulation (16 micro-batches of ``--accum-batch`` sequences per step): Flora r=8 with the
micro-batch gradients summed compressed (``FloraAccumulator``, ``r x max(n, m)`` buffers, a fresh
projection per step) or in full ``.grad`` buffers, each variant at its best of ``--accum-lrs``. The
compressed sum keeps ``r`` of the ``min(n, m)`` directions of each step's gradient; after the
second-moment normalisation its signal is about ``sqrt(r / min(n, m))`` of the full sum's, so it
wants a larger learning rate, hence a sweep per variant.

Writes ``OUT/flora_quality.json`` and ``OUT/flora_quality.png`` (eval-loss curves; atomic writes).

Run: ``python benchmarks/flora_quality.py [--steps 300 --batch 16 --seq 64 --jobs 2 --threads 1 --out bench-out]``
(about 15 minutes on 2 CPU cores; the accumulation runs are the longest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from _flora_common import at_edge, galore_factory
from torch import nn

from flora_graph.flora import FloraAccumulator
from flora_graph.ir.serialize import atomic_write_bytes
from flora_graph.storage import atomic_write_figure
from flora_graph.training.trainer import TrainConfig, build_model, train

# method -> (TrainConfig overrides, learning rates swept)
METHODS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "adam": ({"optimizer": "adam"}, (1.5e-3, 3e-3, 6e-3)),
    "adafactor+m": ({"optimizer": "adafactor"}, (1.5e-3, 3e-3, 6e-3)),
    "adafactor": ({"optimizer": "adafactor", "beta1": 0.0}, (1.5e-3, 3e-3, 6e-3)),
    "flora r=8": ({"optimizer": "flora", "rank": 8}, (3e-3, 6e-3, 1.2e-2, 2.4e-2)),  # scaled: 1.2e-2 won on seed 0
    "flora r=32": ({"optimizer": "flora", "rank": 32}, (3e-3, 6e-3, 1.2e-2, 2.4e-2)),
    "flora-lift r=8": ({"optimizer": "flora", "rank": 8, "flora_update": "lift"}, (1.5e-3, 3e-3, 6e-3)),
    "flora-paper r=8": ({"optimizer": "flora", "rank": 8, "flora_update": "paper"}, (1.5e-3, 3e-3, 6e-3, 1.2e-2)),
    "flora-paper r=32": ({"optimizer": "flora", "rank": 32, "flora_update": "paper"}, (1.5e-3, 3e-3, 6e-3, 1.2e-2)),
    "flora-opt r=8": ({"optimizer": "adam", "factory": "flora-opt", "rank": 8}, (1.5e-3, 3e-3, 6e-3)),
    "lora r=8": ({"optimizer": "lora-adam", "rank": 8}, (5e-3, 1e-2, 2e-2)),
    "galore r=8": ({"optimizer": "adam", "factory": "galore", "rank": 8}, (3e-2, 6e-2, 1.2e-1)),
}
FULL_RANK = ("adam", "adafactor+m")


def flora_opt_factory(rank: int) -> Any:
    """An ``optimizer_factory``: flora-opt's ``Flora`` (the paper authors' package), fixed lr (no parameter scaling)."""

    def make(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        from flora_opt.optimizers.torch.flora import Flora as FloraOpt

        return FloraOpt(model.parameters(), lr=config.base_lr, rank=rank, kappa=config.kappa, beta1=config.beta1,
                        scale_parameter=False, seed=config.seed)

    return make


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, lr) and return its curves (a diverged run gets an infinite loss); runs in a worker."""
    torch.set_num_threads(job["threads"])
    overrides = dict(job["overrides"])
    kind = overrides.pop("factory", None)
    config = TrainConfig(**{**job["base"], **overrides, "lr": job["lr"]})
    factory = {None: None, "galore": lambda: galore_factory(config.rank, job["galore_gap"]),
               "flora-opt": lambda: flora_opt_factory(config.rank)}[kind]
    t0 = time.perf_counter()
    out = {"method": job["method"], "lr": job["lr"], "variant": job.get("variant", "sweep")}
    try:
        result = train(config, progress=None, optimizer_factory=factory() if factory else None)
    except Exception as exc:  # divergence (non-finite gradients) is a result of the sweep, not a crash
        out.update(final_eval_loss=float("inf"), eval=[], train=[], train_seconds=0.0, error=f"{type(exc).__name__}")
    else:
        out.update(final_eval_loss=result.final_eval_loss, eval=result.eval_losses, train=result.train_losses,
                   train_seconds=result.seconds)
    out["wall_seconds"] = time.perf_counter() - t0
    print(f"  {job['method']:<16} {job.get('variant', ''):<10} lr {job['lr']:<8g} final eval {out['final_eval_loss']:.4f}"
          f"  ({out['wall_seconds']:.0f} s)", flush=True)
    return out


def _run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [run_one(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(run_one, jobs))


def accumulation_bytes(base: dict[str, Any], rank: int) -> tuple[int, int]:
    """``(compressed, full)`` bytes of the gradient-accumulation buffers for the decoder."""
    model = build_model(TrainConfig(**{**base, "optimizer": "flora"}))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return FloraAccumulator(named, rank=rank).accumulation_bytes(), 4 * sum(p.numel() for _, p in named)


def plot(best: dict[str, dict[str, Any]], accum: list[dict[str, Any]], path: Path, title: str) -> None:
    """Eval-loss curves: the best lr of each method, and the two accumulation variants (PNG, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in best.items():
        if not r["eval"]:
            continue
        steps, losses = zip(*r["eval"], strict=True)
        axes[0].plot(steps[1:], losses[1:], label=f"{name} (lr {r['lr']:g}): {r['final_eval_loss']:.3f}")
    axes[0].set(title=title, xlabel="step", ylabel="eval loss (nats/byte)")
    for r in accum:
        if not r["eval"]:
            continue
        steps, losses = zip(*r["eval"], strict=True)
        axes[1].plot(steps[1:], losses[1:],
                     label=f"flora r=8, {r['variant']} buffers (lr {r['lr']:g}): {r['final_eval_loss']:.3f}")
    axes[1].set(title="16 micro-batches per step", xlabel="step", ylabel="eval loss (nats/byte)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(path, fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kappa", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, batches and projections")
    ap.add_argument("--corpus-bytes", type=int, default=1 << 20)
    ap.add_argument("--galore-gap", type=int, default=100, help="GaLore update_proj_gap")
    ap.add_argument("--accum-steps", type=int, default=150, help="steps of the accumulation variant (0: skip)")
    ap.add_argument("--accum-batch", type=int, default=4, help="sequences per micro-batch (16 micro-batches)")
    ap.add_argument("--accum-lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3, 1.2e-2],
                    help="learning rates of each accumulation variant")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--lrs", type=float, nargs="+", help="one learning-rate grid for every method (default: per method)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    base = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "hidden": args.hidden, "layers": args.layers,
            "intermediate": args.hidden * 172 // 64,
            "kappa": args.kappa, "corpus_bytes": args.corpus_bytes, "eval_every": 25, "eval_batches": 16,
            "export": False, "seed": args.seed}
    common = {"base": base, "threads": args.threads, "galore_gap": args.galore_gap}
    jobs = [{**common, "method": m, "overrides": METHODS[m][0], "lr": lr} for m in args.methods
            for lr in (args.lrs or METHODS[m][1])]
    if args.accum_steps:  # first: the longest runs, so the pool ends evenly
        abase = {**base, "steps": args.accum_steps, "batch": args.accum_batch, "accum": 16}
        jobs = [{**common, "base": abase, "method": "flora r=8", "variant": v, "lr": lr,
                  "overrides": {"optimizer": "flora", "rank": 8, "accumulator": v}}
                 for v in ("compressed", "full") for lr in args.accum_lrs] + jobs
    t0 = time.perf_counter()
    print(f"{len(jobs)} runs (accumulation: {args.accum_steps} steps x 16 micro-batches x {args.accum_batch} x "
          f"{args.seq}): {args.steps} steps of {args.batch} x {args.seq} bytes, decoder hidden "
          f"{args.hidden} x {args.layers} layers; {args.jobs} workers x {args.threads} threads", flush=True)
    done = _run_all(jobs, args.jobs)
    runs = [r for r in done if r["variant"] == "sweep"]
    accum_runs = [r for r in done if r["variant"] != "sweep"]
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["method"] not in best or r["final_eval_loss"] < best[r["method"]]["final_eval_loss"]:
            best[r["method"]] = r
    accum_best: dict[str, dict[str, Any]] = {}
    for r in accum_runs:
        if r["variant"] not in accum_best or r["final_eval_loss"] < accum_best[r["variant"]]["final_eval_loss"]:
            accum_best[r["variant"]] = r
    accum = list(accum_best.values())
    comp_bytes, full_bytes = accumulation_bytes(base, 8)
    total = time.perf_counter() - t0

    ref = min(best[m]["final_eval_loss"] for m in FULL_RANK if m in best) if any(m in best for m in FULL_RANK) else None
    print(f"\n{'method':<17}{'best lr':>9}{'final eval':>12}{'vs best full-rank':>19}   all lrs")
    edges = []
    for name, r in best.items():
        gap = f"{(r['final_eval_loss'] / ref - 1) * 100:+.2f}%" if ref else "-"
        sweep = ", ".join(f"{x['lr']:g}: {x['final_eval_loss']:.4f}" for x in runs if x["method"] == name)
        edge = at_edge(r, runs, lambda x, name=name: x["method"] == name)
        edges += [name] if edge else []
        print(f"{name:<17}{r['lr']:>9g}{r['final_eval_loss']:>12.4f}{gap:>19}   {sweep}{'  EDGE' if edge else ''}")
    for r in accum:
        sweep = ", ".join(f"{x['lr']:g}: {x['final_eval_loss']:.4f}" for x in accum_runs if x["variant"] == r["variant"])
        edge = at_edge(r, accum_runs, lambda x, v=r["variant"]: x["variant"] == v)
        edges += [f"accumulation {r['variant']}"] if edge else []
        print(f"accumulation {r['variant']:<11} best lr {r['lr']:g}: final eval {r['final_eval_loss']:.4f}   "
              f"{sweep}{'  EDGE' if edge else ''}")
    print(f"accumulation buffers: compressed {comp_bytes:,} B vs full {full_bytes:,} B "
          f"({comp_bytes / full_bytes:.1%})")
    verdict = {}
    if ref is not None and "flora r=8" in best:
        verdict["flora_r8_gap_pct"] = (best["flora r=8"]["final_eval_loss"] / ref - 1) * 100
        verdict["flora_r8_within_3pct"] = verdict["flora_r8_gap_pct"] <= 3.0
    if "flora r=8" in best and "lora r=8" in best:
        verdict["flora_r8_beats_lora_r8"] = best["flora r=8"]["final_eval_loss"] < best["lora r=8"]["final_eval_loss"]
    if edges:
        print(f"best lr at the edge of its grid (widen it): {edges}")
    print(f"targets: {verdict}; total {total:.0f} s")

    out = Path(args.out)
    record = {
        "config": {**base, "jobs": args.jobs, "threads": args.threads, "galore_gap": args.galore_gap,
                   "accum_steps": args.accum_steps, "accum_batch": args.accum_batch, "accum_lrs": args.accum_lrs},
        "defaults": asdict(TrainConfig(export=False)),
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                     "cpus": os.cpu_count()},
        "best": {m: {"lr": r["lr"], "final_eval_loss": r["final_eval_loss"]} for m, r in best.items()},
        "verdict": verdict,
        "accumulation_bytes": {"compressed": comp_bytes, "full": full_bytes},
        "accumulation_best": {v: {"lr": r["lr"], "final_eval_loss": r["final_eval_loss"]} for v, r in accum_best.items()},
        "lr_at_grid_edge": edges, "runs": runs, "accumulation": accum_runs, "seconds": total,
    }  # fmt: skip
    atomic_write_bytes(out / "flora_quality.json", json.dumps(record, indent=1).encode())
    title = f"decoder h{args.hidden} x{args.layers}, {args.steps} steps of {args.batch}x{args.seq} bytes, seed {args.seed}"
    plot(best, accum, out / "flora_quality.png", title)
    print(f"wrote {out / 'flora_quality.json'} and {out / 'flora_quality.png'}")


if __name__ == "__main__":
    main()
