"""Compressed gradient accumulation: how close each variant's step gradient is to the exact sum, and the fine-tuning loss it gives.

Uses the task of ``flora_finetune.py`` (the same cached pretrained decoder, the ``pydoc_data``
fine-tuning text, ``--batch`` windows per step as ``--accum`` micro-batches). Variants of
:class:`~flora_graph.flora.FloraAccumulator` at rank ``r``:

- ``gaussian``: the default (a fresh seeded Gaussian ``P`` per step, ``.grad = P^T P G``);
- ``orthogonal``: ``projection="orthogonal"``, the same sketch decompressed by least squares and
  scaled by ``k / r`` (``.grad = (k / r) Q Q^T G``, ``Q`` an orthonormal basis of ``P``'s rows:
  unbiased, without the Gaussian's uneven amplification inside the subspace);
- ``fixed``: the default, but one projection for the whole run (never resampled); emulated;
- ``gaussian, full if r>=k``: the default, but matrices with ``r >= min(n, m)`` (whose buffer is
  no smaller than the matrix) summed in full; emulated;
- ``adaptive``: a data-dependent projection, emulated: at the step's first micro-batch, an
  orthonormal basis ``Q`` of the dominant ``r``-dimensional subspace of its gradient (a
  randomized range finder with one power iteration); every micro-batch compressed by ``Q^T``,
  ``.grad = Q Q^T G`` (matrices with ``r >= min(n, m)`` summed in full). It holds ``Q`` too
  (``r x min(n, m)`` more floats per matrix) and would need one basis agreed by all ranks;
- ``adaptive r/2``: the same at half the rank (about the bytes of ``gaussian`` at ``r``).

1. **Static**: after ``--warm`` fine-tuning steps (Flora r=32, full buffers), one step's micro-batch
   gradients go through each variant; reported: cosine similarity with the exact sum and relative
   error after the best scaling, averaged over the compressible matrices and 3 seeds, with the
   top-``r`` truncated SVD of the exact sum as the best any rank-``r`` estimate can do.
2. **Fine-tuning**: Flora (``update="lift"``) with each variant and with full buffers, each at the
   best of ``--lrs`` on the first seed, then on every seed; mean and min-max of the final eval loss.

Writes ``OUT/flora_accumulation.json`` (atomic). Run:
``python benchmarks/flora_accumulation.py [--ranks 32 8] [--seeds 0 1 2]`` (about 16 minutes on one thread, 66 runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flora_finetune as ff
import torch
import torch.nn.functional as F

from flora_graph.flora import FloraAccumulator
from flora_graph.flora.projection import Layout, gaussian_projection, stable_seed
from flora_graph.storage import atomic_write_bytes
from flora_graph.training.corpus import WindowSampler, eval_windows
from flora_graph.training.trainer import TrainConfig, _train_step, build_optimizer, lr_at

__all__ = ["VARIANTS", "AdaptiveProjection", "FixedProjection", "FullWhenNotSmaller", "main", "static_quality"]

class FixedProjection(FloraAccumulator):
    """The default, but every step uses step 0's projection (never resampled)."""

    def _projection(self, name: str, layout: Layout, device: torch.device) -> torch.Tensor:
        seed = stable_seed("flora.accumulate", self.seed, name, 0)
        return gaussian_projection(seed, self.rank, layout.small, device=device)


class FullWhenNotSmaller(FloraAccumulator):
    """The default, but a matrix with ``rank >= min(n, m)`` is summed in full (its buffer would be no smaller)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layouts = [Layout(lay.shape, lay.matrix, False) if lay.compressed and self.rank >= lay.small else lay
                        for lay in self.layouts]


class AdaptiveProjection(FullWhenNotSmaller):
    """Per step, the dominant ``r``-dim subspace of the first micro-batch's gradient: ``.grad = Q Q^T G``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bases: dict[str, torch.Tensor] = {}  # this step's Q^T (r x min(n, m)) per compressed matrix

    def accumulate(self) -> None:
        """Fix each matrix's basis at its first gradient of the step, then accumulate as usual."""
        for name, p, layout in zip(self.names, self.params, self.layouts, strict=True):
            if layout.compressed and p.grad is not None and name not in self.bases:
                g = p.grad.detach().to(torch.float32).reshape(layout.matrix)
                a = g if g.shape[0] <= g.shape[1] else g.T  # k x l
                seed = stable_seed("flora.accumulate.adaptive", self.seed, name, self.steps)
                omega = gaussian_projection(seed, self.rank, layout.large, device=g.device)
                q = torch.linalg.qr(a @ omega.T).Q  # range of the sketch, then one power iteration
                self.bases[name] = torch.linalg.qr(a @ (a.T @ q)).Q.T.contiguous()
        super().accumulate()

    def finalize(self) -> None:
        """Decompress with the step's bases, then forget them."""
        super().finalize()
        self.bases = {}

    def _projection(self, name: str, layout: Layout, device: torch.device) -> torch.Tensor:
        return self.bases[name]

    def accumulation_bytes(self) -> int:
        """The buffers and the bases (float32)."""
        return super().accumulation_bytes() + 4 * sum(self.rank * lay.small for lay in self.layouts if lay.compressed)


def _make(kind: str) -> Callable[[list[tuple[str, torch.Tensor]], TrainConfig], FloraAccumulator]:
    """``make_accumulator`` of a variant (``adaptive r/2`` halves ``config.rank``)."""
    def make(named: list[tuple[str, torch.Tensor]], c: TrainConfig) -> FloraAccumulator:
        if kind == "adaptive r/2":
            return AdaptiveProjection(named, rank=max(1, c.rank // 2), seed=c.seed)
        if kind == "orthogonal":
            return FloraAccumulator(named, rank=c.rank, seed=c.seed, projection="orthogonal")
        cls = {"gaussian": FloraAccumulator, "fixed": FixedProjection, "gaussian, full if r>=k": FullWhenNotSmaller,
               "adaptive": AdaptiveProjection}[kind]
        return cls(named, rank=c.rank, seed=c.seed)

    return make


VARIANTS = ("gaussian", "orthogonal", "fixed", "gaussian, full if r>=k", "adaptive", "adaptive r/2")


def _task(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], Any, list[Any], dict[str, Any]]:
    """Pretrained weights (flora_finetune's cache), the fine-tuning corpus, eval windows, the base config."""
    pre_args = ff.parser().parse_args(["--cache", args.cache])
    state, _ = ff.load_or_pretrain(ff.pretrain_config(pre_args), args.cache)
    corpus = ff.docs_corpus()
    eval_set = eval_windows(corpus.eval, ff.EVAL_BATCH, pre_args.seq, pre_args.eval_batches)
    base = {"steps": args.steps, "batch": args.batch, "seq": pre_args.seq, "hidden": pre_args.hidden,
            "layers": pre_args.layers, "intermediate": pre_args.hidden * 172 // 64, "export": False,
            "eval_every": 0, "optimizer": "flora"}
    return state, corpus, eval_set, base


def static_quality(args: argparse.Namespace, state: dict[str, torch.Tensor], corpus: Any, base: dict[str, Any],
                   rank: int) -> dict[str, dict[str, float]]:
    """Mean cosine / relative error (best scale) vs the exact sum, per variant, over matrices and 3 seeds."""
    config = TrainConfig(**{**base, "rank": 32, "lr": 1.6e-2, "steps": max(args.warm, 1)})
    model = ff.finetune_model(config, state)
    opt = build_optimizer(config, model)
    sampler = WindowSampler(corpus.train, config.batch, config.seq, seed=7)
    for step in range(args.warm):
        _train_step(config, step, lr_at(config, step), model, opt, None, {}, sampler)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x, y = sampler.batch(10_000)
    micro = args.batch // args.accum
    grads: list[dict[str, torch.Tensor]] = []
    for i in range(args.accum):
        model.zero_grad(set_to_none=True)
        logits = model(x[i * micro : (i + 1) * micro])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i * micro : (i + 1) * micro].reshape(-1))
        (loss / args.accum).backward()
        grads.append({n: p.grad.detach().clone() for n, p in named})
    exact = {n: sum(g[n] for g in grads) for n, _ in named}
    probe = FloraAccumulator(named, rank=rank)
    matrices = [n for n, lay in zip(probe.names, probe.layouts, strict=True) if lay.compressed]
    scores: dict[str, list[tuple[float, float]]] = {v: [] for v in (*VARIANTS, "top-r SVD of the sum")}

    def score(est: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
        cos = float(F.cosine_similarity(est.flatten(), want.flatten(), dim=0))
        a = float((est * want).sum() / (est * est).sum().clamp(min=1e-30))
        return cos, float((a * est - want).norm() / want.norm())

    for seed in range(3):
        cfg = TrainConfig(**{**base, "rank": rank, "seed": seed})
        for kind in VARIANTS:
            acc = _make(kind)(named, cfg)
            for g in grads:
                for n, p in named:
                    p.grad = g[n].clone()
                acc.accumulate()
            acc.finalize()
            scores[kind] += [score(p.grad, exact[n]) for n, p in named if n in matrices]
    for n in matrices:
        u, s, vh = torch.linalg.svd(exact[n], full_matrices=False)
        scores["top-r SVD of the sum"].append(score((u[:, :rank] * s[:rank]) @ vh[:rank], exact[n]))
    model.zero_grad(set_to_none=True)
    return {k: {"cosine": statistics.fmean(c for c, _ in v), "rel_error": statistics.fmean(e for _, e in v)}
            for k, v in scores.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both parts, print them, write ``OUT/flora_accumulation.json``; return the record."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 8], help="accumulator ranks")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                    help=f"fine-tuning variants, of: {', '.join(VARIANTS)} (full buffers always run)")
    ap.add_argument("--r8-variants", nargs="+", default=["gaussian", "orthogonal", "adaptive"], choices=VARIANTS,
                    metavar="VARIANT",
                    help="fine-tuning variants at ranks below 32 (fewer, to save time)")
    ap.add_argument("--steps", type=int, default=25, help="fine-tuning steps")
    ap.add_argument("--batch", type=int, default=256, help="windows per step")
    ap.add_argument("--accum", type=int, default=16, help="micro-batches per step")
    ap.add_argument("--warm", type=int, default=10, help="fine-tuning steps before the static measurement")
    ap.add_argument("--lrs", type=float, nargs="+", default=[4e-3, 8e-3, 1.6e-2, 3.2e-2], help="lr grid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (the first is swept)")
    ap.add_argument("--no-finetune", action="store_true", help="only the static part")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--cache", default=str(Path("~/.cache/flora_graph/flora_finetune")), help="pretrained weights")
    ap.add_argument("--out", default="bench-out", help="folder of flora_accumulation.json")
    args = ap.parse_args(argv)
    if args.batch % args.accum:
        raise ff.FinetuneBenchError(f"--batch {args.batch} must be a multiple of --accum {args.accum}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    state, corpus, eval_set, base = _task(args)
    record: dict[str, Any] = {"config": vars(args), "static": {}, "finetune": {}, "runs": []}
    for rank in args.ranks:
        record["static"][str(rank)] = res = static_quality(args, state, corpus, base, rank)
        print(f"\nstatic, r={rank}: one step's {args.accum} micro-batches of {args.batch // args.accum} windows "
              f"after {args.warm} steps; mean over compressible matrices and 3 seeds")
        print(f"  {'variant':<26}{'cosine':>8}{'rel. error':>12}")
        for k, v in res.items():
            print(f"  {k:<26}{v['cosine']:>8.3f}{v['rel_error']:>12.3f}")
    if args.no_finetune:
        atomic_write_bytes(Path(args.out) / "flora_accumulation.json", json.dumps(record, indent=1).encode())
        return record
    runs: list[dict[str, Any]] = []

    def run(rank: int, kind: str, lr: float, seed: int, phase: str) -> dict[str, Any]:
        accum = {"accum": args.accum, "batch": args.batch // args.accum,
                 "accumulator": "full" if kind == "full" else "compressed"}
        cfg = TrainConfig(**{**base, **accum, "rank": rank, "lr": lr, "seed": seed})
        out = ff.finetune(cfg, state, corpus, eval_set, eval_every=args.steps,
                          make_accumulator=None if kind == "full" else _make(kind))
        out.update(method=f"flora r={rank}", variant=kind, lr=lr, seed=seed, phase=phase)
        print(f"  r={rank:<3}{kind:<24} lr {lr:<7g} seed {seed}  final eval {out['final_eval_loss']:.4f}  "
              f"({out['train_seconds']:.0f} s)", flush=True)
        return out

    print("\nfine-tuning (Flora, update lift):")
    for rank in args.ranks:
        kinds = ["full", *(args.variants if rank >= 32 else args.r8_variants)]
        for kind in kinds:
            sweep = [run(rank, kind, lr, args.seeds[0], "sweep") for lr in args.lrs]
            best = min(sweep, key=lambda r: r["final_eval_loss"])
            runs += sweep + [run(rank, kind, best["lr"], s, "seeds") for s in args.seeds[1:]]
    summary = ff.summarize(runs)
    for s in summary.values():
        s.pop("curve")
        full = summary[f"{s['method']}/full"]["mean"]
        s["vs_full_pct"] = (s["mean"] / full - 1) * 100
    print(f"\n{'rank':<12}{'variant':<25}{'lr':>8}{'mean':>9}{'min-max':>17}{'vs full':>9}{'buffer':>11}  sweep")
    for s in summary.values():
        sweep = ", ".join(f"{k}: {v:.4f}" for k, v in s["sweep"].items())
        print(f"{s['method']:<12}{s['variant']:<25}{s['lr']:>8g}{s['mean']:>9.4f}{s['min']:>8.4f}-{s['max']:<8.4f}"
              f"{s['vs_full_pct']:>+8.2f}%{s['accum_bytes'] / 1024:>8.1f} KiB  {sweep}{'  EDGE' if s['edge'] else ''}")
    record.update(finetune=summary, runs=runs, seconds=time.perf_counter() - t0)
    atomic_write_bytes(Path(args.out) / "flora_accumulation.json", json.dumps(record, indent=1).encode())
    print(f"total {record['seconds']:.0f} s; wrote {Path(args.out) / 'flora_accumulation.json'}")
    return record


if __name__ == "__main__":
    main()
