"""Adapter switch: a live AdapterSession vs re-exporting a merged model per adapter.

Run: python benchmarks/serving_switch.py [--rounds 30] [--threads 1]

On the demo model with two adapters (ranks 4 and 8), timed with
flora_graph.bench.timing.time_interleaved (ONNX Runtime: fixed intra-op threads,
allow_spinning=0):

* ``switch (loaded)``: what changing adapter costs on a live session: a new
  ``RunOptions`` with ``add_active_adapter`` (done by every ``AdapterSession.run``).
* ``run, alternating adapters`` vs ``run, same adapter``: one request each; equal
  latencies show a switch has no hidden cost inside the run.
* ``switch (cold load)``: ``load_adapter`` of an ``.onnx_adapter`` file not loaded yet
  (read, validate, memory-map) + ``unload_adapter``.
* ``re-export merged``: merge the adapter into a copy of the model, then
  ``torch.onnx.export(..., dynamo=False)`` (the legacy TorchScript exporter: the dynamo
  exporter needs onnxscript, which is not installed here), to memory.
* ``re-export merged + new session``: the above plus the ``InferenceSession`` that serves it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flora_graph.adapters import merge_all
from flora_graph.bench.timing import median_ms, time_interleaved
from flora_graph.frontend import capture
from flora_graph.models import demo_inputs
from flora_graph.runtimes.onnxrt import make_session_options
from flora_graph.serving import AdapterSession, adapter_params, export_swappable, write_adapter
from flora_graph.serving.demo import demo_adapter_models


def reexport(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    """Merge ``model``'s adapters into a copy and export it with the legacy ONNX exporter."""
    merged = copy.deepcopy(model)
    merge_all(merged)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(merged, (x,), buf, dynamo=False, input_names=["image"], output_names=["output"],
                          dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}})
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="rounds of the slow (re-export) variants (default 30)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, ads = demo_adapter_models((4, 8, 8), seed=0, names=["a", "b", "cold"])
    x = demo_inputs(1, seed=5)["image"]
    xs = {"image": x.numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        graph = capture(ads["a"], demo_inputs(2), {"image": {0: "batch"}})
        model_path = d / "swappable.onnx"
        export_swappable(graph, model_path)
        files = {n: write_adapter(d / f"{n}.onnx_adapter", adapter_params(m), model=model_path) for n, m in ads.items()}
        sess = AdapterSession(model_path, intra_op_threads=args.threads, allow_spinning=False)
        sess.load_adapter("a", files["a"])
        sess.load_adapter("b", files["b"])
        lora = ort.LoraAdapter()  # the object AdapterSession activates per run
        lora.Load(str(files["b"]))
        merged_bytes = reexport(ads["b"], x)
        ref = ort.InferenceSession(merged_bytes, make_session_options(intra_op_threads=args.threads),
                                   providers=["CPUExecutionProvider"])
        got, want = sess.run(xs, "b")["output"], ref.run(None, xs)[0]
        assert np.abs(got - want).max() < 1e-5, "switched adapter disagrees with the re-exported merged model"

        def switch() -> None:
            for _ in range(100):
                ro = ort.RunOptions()
                ro.add_active_adapter(lora)

        names = ["a", "b"]

        def alternating() -> None:
            for k in range(10):
                sess.run(xs, names[k % 2])

        def same() -> None:
            for _ in range(10):
                sess.run(xs, "a")

        def cold() -> None:
            sess.load_adapter("cold", files["cold"])
            sess.unload_adapter("cold")

        fast = time_interleaved({"switch x100": switch, "alternating x10": alternating, "same x10": same, "cold": cold},
                                rounds=200, warmup=5)

        def new_session() -> None:
            blob = reexport(ads["b"], x)
            ort.InferenceSession(blob, make_session_options(intra_op_threads=args.threads), providers=["CPUExecutionProvider"])

        slow = time_interleaved({"reexport": lambda: reexport(ads["b"], x), "reexport+session": new_session},
                                rounds=args.rounds, warmup=2)
        sizes = {n: p.stat().st_size for n, p in files.items()}
    switch_ms = median_ms(fast["switch x100"]) / 100
    rows = [
        ("switch (loaded): RunOptions + add_active_adapter", switch_ms),
        ("run, alternating adapters (per request)", median_ms(fast["alternating x10"]) / 10),
        ("run, same adapter (per request)", median_ms(fast["same x10"]) / 10),
        ("switch (cold load): load_adapter + unload_adapter", median_ms(fast["cold"])),
        ("re-export merged (merge + torch.onnx.export dynamo=False)", median_ms(slow["reexport"])),
        ("re-export merged + new InferenceSession", median_ms(slow["reexport+session"])),
    ]
    exporter = "dynamo=False (onnxscript missing)" if importlib.util.find_spec("onnxscript") is None else "dynamo=False"
    print(f"demo model, threads={args.threads}; exporter {exporter}; adapter files {sizes} bytes, "
          f"merged model {len(merged_bytes):,} bytes")
    print(f"{'operation':<58} {'ms':>10}")
    for name, ms in rows:
        print(f"{name:<58} {ms:>10.4f}")
    reexp, cold_ms = rows[4][1], rows[3][1]
    print(f"\nre-export / switch (loaded):     {reexp / switch_ms:>12,.0f}x  (target >= 1000x)")
    print(f"re-export / switch (cold load):  {reexp / cold_ms:>12,.0f}x")
    print(f"re-export+session / cold load:   {rows[5][1] / cold_ms:>12,.0f}x")


if __name__ == "__main__":
    main()
