"""Mixed-adapter batch: 8 rows over 8 adapters, one ORT call vs one call per adapter vs PEFT eager.

Run: python benchmarks/serving_mixed.py [--model demo mlp] [--rows 8] [--rounds 300] [--threads 1]

For each model, 8 adapters (ranks 2/4/8 mixed) on one base; a batch whose row i uses
adapter i. Variants, timed interleaved (flora_graph.bench.timing.time_interleaved), ONNX
Runtime with fixed intra-op threads and allow_spinning=0, torch with the same thread count:

* ``mixed 1 call``: MixedAdapterSession, the whole batch in one ONNX Runtime call.
* ``per-adapter calls``: AdapterSession (swappable export), one call per adapter group
  (here 8 groups of one row), the adapter chosen with RunOptions.add_active_adapter.
* ``merged per-adapter calls``: one session per adapter of the ``merged`` preset (the
  fastest single-adapter model), one call per group: the best a per-adapter server does.
* ``PEFT eager``: PEFT's mixed-batch forward ``model(x, adapter_names=[...])`` (if peft is
  installed; else eager torch looping over the adapter groups, and the table says so).

Every variant's output is checked against the per-row merged eager models first.
Models: ``demo`` (DemoNet: 2 conv + 3 linear adapted layers, 16x16 images) and ``mlp``
(a 4-block MLPStack, 28 adapted projections, width 128: transformer-shaped).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util

import numpy as np
import torch
from torch import nn

from flora_graph.adapters import adapters_of, merge_all
from flora_graph.bench.timing import median_ms, time_interleaved
from flora_graph.frontend import capture
from flora_graph.models import PROJECTIONS, MLPStack, demo_inputs
from flora_graph.models.demo import DemoNet
from flora_graph.passes import optimize
from flora_graph.runtimes import compile as compile_graph
from flora_graph.serving import AdapterSession, MixedAdapterSession, adapter_params, export_mixed, export_swappable
from flora_graph.serving.demo import DEMO_TARGETS, random_adapter

RANKS = (2, 4, 8, 8, 4, 2, 8, 4)


def build(model: str, n: int) -> tuple[nn.Module, dict[str, nn.Module], list[str], str, torch.Tensor, dict]:
    """Base model, n adapters, target module names, input name, a batch of inputs, dynamic dims."""
    torch.manual_seed(0)
    if model == "demo":
        base, targets, inp, std = DemoNet().eval(), list(DEMO_TARGETS), "image", 0.2
        make = lambda rows, seed: demo_inputs(rows, seed=seed)["image"]  # noqa: E731
    else:
        base, targets, inp, std = MLPStack(4, 128, 256).eval(), list(PROJECTIONS), "x", 0.05
        with torch.no_grad():
            for p in base.parameters():
                p.mul_(0.1)
        make = lambda rows, seed: torch.randn(rows, 128, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    names = [f"adapter{k}" for k in range(n)]
    ads = {nm: random_adapter(base, RANKS[k % len(RANKS)], seed=10 + k, targets=targets, std=std)
           for k, nm in enumerate(names)}
    return base, ads, targets, inp, make, {inp: {0: "batch"}}


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter merged into its base layer."""
    out = copy.deepcopy(model)
    merge_all(out)
    return out


def peft_model(base: nn.Module, ads: dict[str, nn.Module], targets: list[str]) -> nn.Module:
    """A PEFT model holding every adapter, weights copied from ours."""
    from peft import LoraConfig, get_peft_model

    pm = None
    for name, model in ads.items():
        some = next(iter(adapters_of(model).values()))
        cfg = LoraConfig(r=some.rank, lora_alpha=some.alpha, target_modules=targets, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        for path, ad in adapters_of(model).items():
            layer = pm.base_model.model.get_submodule(path)
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(ad.lora_A)
                layer.lora_B[name].weight.copy_(ad.lora_B)
    return pm.eval()


def bench_model(model_name: str, args: argparse.Namespace, has_peft: bool, ort_opts: dict) -> None:
    """Build, check and time the four variants on one model; print its table."""
    base, ads, targets, inp, make, dyn = build(model_name, args.rows)
    names = list(ads)
    graph = capture(ads[names[0]], {inp: make(2, 0)}, dyn)
    params = {n: adapter_params(m) for n, m in ads.items()}
    mixed = MixedAdapterSession(export_mixed(graph), params, **ort_opts)
    swap = AdapterSession(export_swappable(graph), **ort_opts)
    for n, p in params.items():
        swap.load_adapter(n, p)
    merged_sessions = {n: compile_graph(optimize(capture(m, {inp: make(2, 0)}, dyn), "merged"), "onnxruntime", **ort_opts)
                       for n, m in ads.items()}
    x = make(args.rows, 7)
    xs = x.numpy()
    rows = [xs[i : i + 1] for i in range(args.rows)]
    merged_eager = {n: merged(m) for n, m in ads.items()}
    with torch.no_grad():
        want = np.concatenate([merged_eager[n](x[i : i + 1]).numpy() for i, n in enumerate(names)])
    if has_peft:
        pm = peft_model(base, ads, targets)

        def eager():
            with torch.no_grad():
                return pm(x, adapter_names=names)
    else:
        def eager():
            with torch.no_grad():
                return torch.cat([ads[n](x[i : i + 1]) for i, n in enumerate(names)])
    variants = {
        "mixed 1 call": lambda: mixed.run({inp: xs}, names)["output"],
        "per-adapter calls": lambda: np.concatenate([swap.run({inp: rows[i]}, n)["output"] for i, n in enumerate(names)]),
        "merged per-adapter calls": lambda: np.concatenate([merged_sessions[n]({inp: rows[i]})["output"]
                                                            for i, n in enumerate(names)]),
        "PEFT eager" if has_peft else "eager torch loop": lambda: eager().numpy(),
    }
    for k, fn in variants.items():
        err = float(np.abs(fn() - want).max())
        assert err < 1e-4, f"{model_name} {k}: max error {err:.2e}"
    samples = time_interleaved(variants, rounds=args.rounds, warmup=10, inner=args.inner)
    ms = {k: median_ms(v) for k, v in samples.items()}
    one = ms["mixed 1 call"]
    print(f"\n{model_name}: {len(adapters_of(ads[names[0]]))} adapted layers; all variants match per-row merged models")
    print(f"{'variant':<26} {'ms/batch':>9} {'rows/s':>9} {'mixed speedup':>14}")
    for k, v in ms.items():
        print(f"{k:<26} {v:>9.4f} {args.rows / v * 1e3:>9.0f} {v / one:>13.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=["demo", "mlp"], default=["demo", "mlp"])
    ap.add_argument("--rows", type=int, default=8, help="rows per batch, one adapter each (default 8)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    has_peft = importlib.util.find_spec("peft") is not None
    ort_opts = {"intra_op_threads": args.threads, "inter_op_threads": 1, "allow_spinning": False}
    print(f"threads={args.threads} rounds={args.rounds} inner={args.inner} rows={args.rows} adapters={args.rows} "
          f"ranks={RANKS[: args.rows]}; eager baseline: {'PEFT ' + __import__('peft').__version__ if has_peft else 'torch loop (peft missing)'}")
    for model_name in args.model:
        bench_model(model_name, args, has_peft, ort_opts)


if __name__ == "__main__":
    main()
