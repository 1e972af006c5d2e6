"""Serve one base model with three LoRA adapters from ONNX Runtime.

Run: python examples/serve_adapters.py [--requests 600] [--batch 8] [--out DIR]

1. Builds the demo model and three adapters of ranks 2, 4 and 8 (random, nonzero A and B)
   on the same base weights, captures one of them and exports the model twice:
   swappable (LoRA weights are inputs; one adapter per ONNX Runtime call) and mixed
   (stacked weights + a per-row adapter index; one call serves rows of any adapters).
2. Writes each adapter as an ``.onnx_adapter`` file.
3. Answers a stream of requests, each naming an adapter (or none), twice: one call per
   request with ``AdapterSession``, and in windows of ``--batch`` requests with
   ``MixedAdapterSession``. Checks every answer against the adapter's merged eager model,
   and prints per-adapter results and the throughput of both.
"""

from __future__ import annotations

import argparse
import collections
import copy
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flora_graph.adapters import merge_all
from flora_graph.frontend import capture
from flora_graph.models import demo_inputs
from flora_graph.serving import (
    AdapterSession,
    MixedAdapterSession,
    adapter_params,
    export_mixed,
    export_swappable,
    write_adapter,
)
from flora_graph.serving.demo import demo_adapter_models

RANKS = {"sentiment": 2, "topic": 4, "style": 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600, help="requests in the stream (default 600)")
    ap.add_argument("--batch", type=int, default=8, help="requests per mixed-adapter call (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    ap.add_argument("--out", help="directory for the models and adapter files (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="serve_adapters_")
    out = Path(args.out or tmp.name)

    base, adapters = demo_adapter_models(tuple(RANKS.values()), seed=0, names=list(RANKS))
    graph = capture(adapters["sentiment"], demo_inputs(2), {"image": {0: "batch"}})
    t0 = time.perf_counter()
    export_swappable(graph, out / "demo_swappable.onnx")
    export_mixed(graph, out / "demo_mixed.onnx")
    files = {name: write_adapter(out / f"{name}.onnx_adapter", adapter_params(m), model=out / "demo_swappable.onnx")
             for name, m in adapters.items()}
    print(f"exported both models and {len(files)} adapters to {out} in {time.perf_counter() - t0:.2f} s")

    swap = AdapterSession(out / "demo_swappable.onnx", intra_op_threads=args.threads)
    for name, path in files.items():
        ranks = swap.load_adapter(name, path)
        print(f"  loaded {name:<10} rank {sorted(set(ranks.values()))}  ({path.stat().st_size:,} bytes)")
    mixed = MixedAdapterSession(out / "demo_mixed.onnx", files, intra_op_threads=args.threads)

    rng = random.Random(0)
    names: list[str | None] = [*RANKS, None]
    stream = [(rng.choice(names), demo_inputs(1, seed=1000 + i)["image"].numpy()) for i in range(args.requests)]
    merged = {n: copy.deepcopy(m) for n, m in adapters.items()}
    for m in merged.values():
        merge_all(m)
    merged[None] = base

    def reference(name: str | None, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return merged[name](torch.from_numpy(x)).numpy()

    # one call per request
    t0 = time.perf_counter()
    answers_one = [swap.run({"image": x}, name)["output"][0] for name, x in stream]
    one_s = time.perf_counter() - t0
    # windows of --batch requests, one call each, rows naming their own adapters
    t0 = time.perf_counter()
    answers_mixed = []
    for k in range(0, len(stream), args.batch):
        window = stream[k : k + args.batch]
        batch = np.concatenate([x for _, x in window])
        answers_mixed.extend(mixed.run({"image": batch}, [n for n, _ in window])["output"])
    mixed_s = time.perf_counter() - t0

    per = collections.defaultdict(lambda: {"n": 0, "err": 0.0, "top": collections.Counter()})
    for (name, x), a, b in zip(stream, answers_one, answers_mixed, strict=True):
        want = reference(name, x)[0]
        rec = per[name or "(base)"]
        rec["n"] += 1
        rec["err"] = max(rec["err"], float(np.abs(a - want).max()), float(np.abs(b - want).max()))
        rec["top"][int(np.argmax(a))] += 1
    print(f"\n{'adapter':<10} {'requests':>8} {'max |ORT - merged eager|':>25}  most frequent classes")
    for name, rec in sorted(per.items()):
        top = ", ".join(f"{c}:{n}" for c, n in rec["top"].most_common(3))
        print(f"{name:<10} {rec['n']:>8} {rec['err']:>25.2e}  {top}")
    n = len(stream)
    print(f"\nAdapterSession, one call per request:        {n / one_s:8.0f} requests/s ({one_s * 1e3 / n:.3f} ms each)")
    print(f"MixedAdapterSession, {args.batch} requests per call: {n / mixed_s:8.0f} requests/s "
          f"({mixed_s / n * 1e3:.3f} ms each)")
    worst = max(rec["err"] for rec in per.values())
    print("all answers match their merged models" if worst < 1e-4 else f"MISMATCH: {worst:.2e}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
