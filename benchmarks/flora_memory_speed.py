"""Flora optimizer: state bytes (measured vs formula) and step time against Adam, Adafactor, flora-opt, GaLore.

The parameter set is a small transformer-like stack: per layer four ``d x d`` attention
matrices, ``4d x d`` and ``d x 4d`` MLP matrices, two LayerNorms and biases, plus a
``vocab x d`` embedding (aspect ratio > 4: Flora keeps its momentum uncompressed). Every method
gets its own copy of the parameters and fixed random gradients.

Memory: the bytes of every tensor in ``optimizer.state`` (also inside objects, e.g. GaLore's
projector), split into floating state and scalar counters, against the closed formula:

- Adam: ``2 n m`` per matrix, ``2 n`` per vector;
- Adafactor (``torch.optim.Adafactor``, no momentum): ``n + m`` / ``n``;
- Flora and flora-opt: ``r max(n, m) + n + m`` per compressed matrix, ``n m + n + m`` for the
  embedding, ``2 n`` per vector;
- GaLore AdamW (same rank): ``r min(n, m) + 2 r max(n, m)`` per projected matrix, Adam elsewhere.

Speed: ``optimizer.step()`` alone (gradients reassigned outside the timer), after one warm-up
step, methods interleaved round by round in rotating order, median per step, fixed torch
threads. flora-opt and GaLore are skipped with a note when they do not import.

Run: ``python benchmarks/flora_memory_speed.py [--dim 1024 --layers 2 --vocab 8192 --rank 8 --threads 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flora_graph.flora import Flora, layout_for


def make_params(dim: int, layers: int, vocab: int) -> list[tuple[str, torch.Size]]:
    """Names and shapes of the benchmark's parameters."""
    shapes: list[tuple[str, torch.Size]] = [("embed.weight", torch.Size((vocab, dim)))]
    for i in range(layers):
        for proj in ("q", "k", "v", "o"):
            shapes.append((f"layers.{i}.attn.{proj}.weight", torch.Size((dim, dim))))
        shapes.append((f"layers.{i}.mlp.up.weight", torch.Size((4 * dim, dim))))
        shapes.append((f"layers.{i}.mlp.up.bias", torch.Size((4 * dim,))))
        shapes.append((f"layers.{i}.mlp.down.weight", torch.Size((dim, 4 * dim))))
        for ln in ("ln1", "ln2"):
            shapes.append((f"layers.{i}.{ln}.weight", torch.Size((dim,))))
    return shapes


def tensors_in(obj: Any, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` (dicts, lists, tuples, and objects' attributes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v, seen)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors_in(v, seen)]
    if hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in tensors_in(v, seen)]
    return []


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """``(floating state bytes, scalar counter bytes)`` of ``opt.state``."""
    state, scalars = 0, 0
    for t in tensors_in(list(opt.state.values())):
        nbytes = t.numel() * t.element_size()
        if t.numel() == 1:
            scalars += nbytes
        else:
            state += nbytes
    return state, scalars


def galore_projected(name: str, shape: torch.Size) -> bool:
    """Which tensors the GaLore run projects: 2-D weights except the embedding."""
    return len(shape) == 2 and not name.startswith("embed")


def formula_floats(method: str, shapes: list[tuple[str, torch.Size]], rank: int) -> int:
    """Floating state elements predicted for ``method``."""
    total = 0
    for name, shape in shapes:
        numel = shape.numel()
        if len(shape) < 2:
            total += {"adafactor": numel}.get(method, 2 * numel)
            continue
        n, m = shape[0], numel // shape[0]
        if method == "adam":
            total += 2 * numel
        elif method == "adafactor":
            total += n + m
        elif method in ("flora", "flora_resample_every_step", "flora_opt"):
            lay = layout_for(shape, rank)
            total += (rank * lay.large if lay.compressed else numel) + n + m
        elif method == "galore":
            total += rank * min(n, m) + 2 * rank * max(n, m) if galore_projected(name, shape) else 2 * numel
    return total


def builders(rank: int) -> dict[str, Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer] | str]:
    """Method name -> optimizer factory, or a string saying why the method is skipped."""
    out: dict[str, Any] = {
        "flora": lambda named: Flora(named, lr=1e-3, rank=rank),
        "flora_resample_every_step": lambda named: Flora(named, lr=1e-3, rank=rank, kappa=1),
        "adam": lambda named: torch.optim.Adam([p for _, p in named], lr=1e-3, foreach=True),
        "adafactor": lambda named: torch.optim.Adafactor([p for _, p in named], lr=1e-3, foreach=False),
    }
    try:
        from flora_opt.optimizers.torch.flora import Flora as FloraOpt

        out["flora_opt"] = lambda named: FloraOpt(
            [p for _, p in named], lr=1e-3, rank=rank, beta1=0.9, kappa=1000, scale_parameter=False
        )
    except Exception as e:  # ImportError, or a missing optional dependency of it
        out["flora_opt"] = f"flora-opt does not import: {type(e).__name__}: {e}"
    try:
        from galore_torch import GaLoreAdamW

        def galore(named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
            low = [p for n, p in named if galore_projected(n, p.shape)]
            rest = [p for n, p in named if not galore_projected(n, p.shape)]
            groups = [
                {"params": rest},
                {"params": low, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
            ]
            return GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)

        out["galore"] = galore
    except Exception as e:
        out["galore"] = f"galore-torch does not import: {type(e).__name__}: {e}"
    return out


def main() -> None:
    """Measure and print the table; ``--json`` also writes the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = make_params(args.dim, args.layers, args.vocab)
    n_params = sum(s.numel() for _, s in shapes)
    print(f"torch {torch.__version__}, {platform.machine()}, device {device}, threads {torch.get_num_threads()}")
    print(f"{len(shapes)} tensors, {n_params / 1e6:.1f} M parameters, rank {args.rank}")

    gen = torch.Generator().manual_seed(0)
    base = [(name, torch.randn(shape, generator=gen) * 0.02) for name, shape in shapes]
    grads = [torch.randn(shape, generator=gen) * 1e-3 for _, shape in shapes]
    runs: dict[str, dict[str, Any]] = {}
    for method, make in builders(args.rank).items():
        if isinstance(make, str):
            print(f"skip {method}: {make}")
            continue
        named = [(n, nn.Parameter(t.clone().to(device))) for n, t in base]
        opt = make(named)
        runs[method] = {"opt": opt, "params": [p for _, p in named], "grads": [g.to(device) for g in grads]}

    def one_step(run: dict[str, Any]) -> tuple[float, float]:
        """``(wall, process CPU)`` seconds of one ``step()``; CPU time is less sensitive to other load."""
        for p, g in zip(run["params"], run["grads"], strict=True):
            p.grad = g  # no method writes into its gradient (checked at the end)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        run["opt"].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    for run in runs.values():
        run["first_step_s"] = one_step(run)[0]  # warm-up; allocates state (GaLore: its SVD)
        run["times"] = []
    names = list(runs)
    for r in range(args.rounds):
        for method in names[r % len(names) :] + names[: r % len(names)]:
            runs[method]["times"].extend(one_step(runs[method]) for _ in range(args.steps))

    def medians(run: dict[str, Any]) -> tuple[float, float]:
        return tuple(statistics.median(t[i] for t in run["times"]) * 1e3 for i in (0, 1))

    rows = []
    adam_wall, adam_cpu = medians(runs["adam"])
    print(
        f"\n{'method':26s} {'state MiB':>9s} {'formula':>9s} {'scalars B':>9s} {'vs Adam':>8s} "
        f"{'wall ms':>9s} {'x Adam':>7s} {'cpu ms':>9s} {'x Adam':>7s} {'1st wall ms':>11s}"
    )
    adam_bytes = state_bytes(runs["adam"]["opt"])[0]
    for method, run in runs.items():
        measured, scalars = state_bytes(run["opt"])
        formula = 4 * formula_floats(method, shapes, args.rank)
        wall, cpu = medians(run)
        row = {
            "method": method,
            "state_bytes": measured,
            "formula_bytes": formula,
            "scalar_bytes": scalars,
            "state_vs_adam": measured / adam_bytes,
            "median_wall_ms": wall,
            "wall_vs_adam": wall / adam_wall,
            "median_cpu_ms": cpu,
            "cpu_vs_adam": cpu / adam_cpu,
            "first_step_ms": run["first_step_s"] * 1e3,
            "steps_timed": len(run["times"]),
        }
        rows.append(row)
        print(
            f"{method:26s} {measured / 2**20:9.2f} {formula / 2**20:9.2f} {scalars:9d} {row['state_vs_adam']:8.3f} "
            f"{wall:9.1f} {row['wall_vs_adam']:7.2f} {cpu:9.1f} {row['cpu_vs_adam']:7.2f} {row['first_step_ms']:11.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)
    for method, run in runs.items():
        if not all(torch.equal(g.cpu(), g0) for g, g0 in zip(run["grads"], grads, strict=True)):
            raise SystemExit(f"{method} wrote into its gradients: timings are not comparable")
    print(
        "\nformula: Adam 2nm; Adafactor n+m; Flora/flora-opt r*max(n,m)+n+m per compressed matrix "
        f"(the {args.vocab}x{args.dim} embedding, aspect {args.vocab / args.dim:.0f} > 4, keeps nm+n+m); "
        "GaLore r*min(n,m)+2r*max(n,m). Times: medians of optimizer.step() (wall and process CPU time) "
        "after one warm-up step."
    )


if __name__ == "__main__":
    main()
