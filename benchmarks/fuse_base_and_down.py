"""Does fuse-base-and-down pay off? fused vs fused + fuse-base-and-down, per backend.

Run: python benchmarks/fuse_base_and_down.py [--models demo mlp4 decoder] [--rounds 200] [--threads 1]

Builds the demo model (CNN + MLP), a 4-layer MLP stack (q/k/v siblings) and the built-in
decoder (LoRA on all seven projections of both blocks, token ids ``[batch, 32]``), captures
each once, and times both variants on every backend, interleaved, at batch 1 and 16. Prints
medians and the ratio (with / without); below 1.0 means the fusion is faster on that backend.
"""

from __future__ import annotations

import argparse

import torch

from flora_graph.bench.latency import backend_options
from flora_graph.bench.timing import median_ms, time_interleaved
from flora_graph.frontend import capture
from flora_graph.models import build_decoder, build_demo_model, build_mlp_stack, demo_inputs
from flora_graph.passes import optimize
from flora_graph.runtimes import compile

BACKENDS = ("onnxruntime", "torchscript", "torch-export")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", choices=["demo", "mlp4", "decoder"], default=["demo", "mlp4", "decoder"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = {"input_ids": {0: "batch", 1: "seq"}}
    builders = {
        "demo": lambda: (build_demo_model(), demo_inputs(2), {"image": {0: "batch"}}, lambda b: demo_inputs(b, seed=1)),
        "mlp4": lambda: (build_mlp_stack(4), {"x": torch.randn(2, 128)}, {"x": {0: "batch"}},
                         lambda b: {"x": torch.randn(b, 128)}),
        "decoder": lambda: (build_decoder(lora_rank=8), {"input_ids": torch.randint(0, 256, (2, 8))}, tokens,
                            lambda b: {"input_ids": torch.randint(0, 256, (b, 32))}),
    }
    models = {name: builders[name]() for name in args.models}
    print(f"threads={args.threads} rounds={args.rounds} inner={args.inner}")
    print(f"{'model':<6} {'batch':>5} {'backend':<13} {'fused ms':>9} {'+fbd ms':>9} {'ratio':>6}")
    for mname, (model, example, dyn, feeds_for) in models.items():
        graph = capture(model, example, dyn)
        plain = optimize(graph, "fused")
        fused = optimize(graph, "fused", fuse_base_and_down=True)
        for batch in (1, 16):
            feeds = {k: v.numpy() for k, v in feeds_for(batch).items()}
            variants = {}
            for backend in BACKENDS:
                opts = backend_options(backend, args.threads)
                a, b = compile(plain, backend, **opts), compile(fused, backend, **opts)
                variants[(backend, "plain")] = lambda a=a, f=feeds: a(f)
                variants[(backend, "fbd")] = lambda b=b, f=feeds: b(f)
            samples = time_interleaved(variants, rounds=args.rounds, warmup=5, inner=args.inner)
            for backend in BACKENDS:
                p, f = median_ms(samples[(backend, "plain")]), median_ms(samples[(backend, "fbd")])
                print(f"{mname:<6} {batch:>5} {backend:<13} {p:>9.4f} {f:>9.4f} {f / p:>6.2f}")


if __name__ == "__main__":
    main()
