"""Latency on ONNX Runtime: flora_graph's presets vs ``torch.onnx.export`` of the same PEFT model.

Run: python benchmarks/export_latency.py [--model llama4|decoder] [--shapes 1x1 1x32 4x128] [--budget-s 20]
     [--max-rounds 1000] [--json out.json]

Needs the ``bench`` extra. The model (default ``llama4``: a random 4-layer ``LlamaForCausalLM``,
hidden 512, intermediate 1376, 8 heads, vocab 32000; ``decoder``: the built-in decoder) gets
a PEFT LoRA of rank 8 on all seven projections with a nonzero ``B``. Every variant is an
ONNX model with ``batch`` and ``seq`` dynamic, run in an ``InferenceSession`` with the same
options (one intra-op and one inter-op thread, no spinning, all graph optimizations):

* ``flora/base``: flora_graph's capture of the model without adapters (``merged`` preset: the
  generic clean-ups only), the floor ``merged`` should reach;
* ``flora/merged``: adapters baked into the base weights;
* ``flora/fused``: adapters kept separate and swappable (their weights stay their own
  initializers), low-rank products fused;
* ``torch.onnx/merged``: ``torch.onnx.export(peft_model.merge_and_unload(), dynamo=True)``;
* ``torch.onnx/unmerged``: ``torch.onnx.export`` of the PEFT model as it is (LoRA branches
  in the graph, the swappable route of the usual tooling);
* ``torch.onnx/base``: ``torch.onnx.export`` of the model without adapters.

Every variant is timed as a bare ``InferenceSession.run`` (flora_graph's through the session
of its ``compile(g, "onnxruntime")`` executable), so the rows compare the ONNX models alone.
``flora/fused (Executable)`` times the same fused model through flora_graph's ``Executable``
call, whose input checks (names, dtypes, named dims, ``dim_max``) add a fixed ~10-15 us per
call: visible on the tiny built-in decoder at ``1x1``, noise on the Llama.

Per shape, all variants are timed interleaved in one run (:func:`time_interleaved`), medians
in milliseconds; ``torch.set_num_threads(1)``. Parity of each against eager torch (PEFT, or the
plain model for the ``base`` variants) is printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from flora_graph.bench.latency import backend_options
from flora_graph.bench.timing import time_interleaved
from flora_graph.frontend import capture
from flora_graph.passes import optimize
from flora_graph.runtimes import compile
from flora_graph.runtimes.onnxrt import make_session_options

DYN = {"input_ids": {0: "batch", 1: "seq"}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(model: str) -> tuple[nn.Module, nn.Module, int]:
    """``(base model, PEFT model over a copy of it, vocab)``."""
    import peft

    torch.manual_seed(0)
    if model == "llama4":
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                                       num_key_value_heads=8, vocab_size=32000, use_cache=False)
        base, vocab = transformers.LlamaForCausalLM(cfg).eval(), 32000
    else:
        from flora_graph.models.decoder import build_decoder

        base = build_decoder()
        vocab = base.config.vocab_size
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    return base, peft.get_peft_model(copy.deepcopy(base), lora).eval(), vocab


def logits(out: Any) -> torch.Tensor:
    """The logits of a model output (a tensor or a transformers ``ModelOutput``)."""
    return out if isinstance(out, torch.Tensor) else out["logits"]


def torch_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    """``torch.onnx.export(model, dynamo=True)`` with dynamic batch and seq, saved to ``path``."""
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (), kwargs=example, dynamo=True, dynamic_shapes=dims, verbose=False)
    program.save(str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama4", "decoder"], default="llama4")
    ap.add_argument("--shapes", nargs="+", default=["1x1", "1x32", "4x128"], help="batch x seq")
    ap.add_argument("--budget-s", type=float, default=20.0, help="about how long to time each shape")
    ap.add_argument("--max-rounds", type=int, default=1000, help="at most this many rounds per shape (at least 10)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base, pm, vocab = build(args.model)
    gen = torch.Generator().manual_seed(0)
    example = {"input_ids": torch.randint(0, vocab, (2, 8), generator=gen)}
    opts = backend_options("onnxruntime", 1)

    graph = capture(pm, example, DYN, name=args.model)
    base_graph = capture(base, example, DYN, name=f"{args.model}-base")
    runners: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {}
    for name, g in (("flora/base", optimize(base_graph, "merged", backend="onnxruntime")),
                    ("flora/merged", optimize(graph, "merged", backend="onnxruntime")),
                    ("flora/fused", optimize(graph, "fused", backend="onnxruntime"))):
        exe = compile(g, "onnxruntime", **opts)
        runners[name] = lambda feeds, sess=exe.session: sess.run(None, feeds)[0]
        if name == "flora/fused":
            runners["flora/fused (Executable)"] = lambda feeds, exe=exe: exe(feeds)["output"]
    with tempfile.TemporaryDirectory(prefix="export_latency_") as tmp:
        files = {
            "torch.onnx/merged": torch_onnx(copy.deepcopy(pm).merge_and_unload(), example, Path(tmp) / "merged.onnx"),
            "torch.onnx/unmerged": torch_onnx(pm.get_base_model(), example, Path(tmp) / "unmerged.onnx"),
            "torch.onnx/base": torch_onnx(base, example, Path(tmp) / "base.onnx"),
        }
        for name, path in files.items():
            sess = ort.InferenceSession(str(path), sess_options=make_session_options(**opts), providers=["CPUExecutionProvider"])
            runners[name] = lambda feeds, sess=sess: sess.run(None, feeds)[0]

    results: dict[str, Any] = {}
    print(f"model {args.model}, ONNX Runtime {ort.__version__}, 1 intra-op thread, no spinning; medians in ms")
    for shape in args.shapes:
        b, s = (int(v) for v in shape.split("x"))
        ids = torch.randint(0, vocab, (b, s), generator=gen)
        feeds = {"input_ids": ids.numpy()}
        with torch.no_grad():
            want = logits(pm(input_ids=ids)).numpy()
            want_base = logits(base(input_ids=ids)).numpy()
        diffs = {n: float(np.max(np.abs(r(feeds) - (want_base if n.endswith("/base") else want)))) for n, r in runners.items()}
        calls = {n: (lambda r=r, f=feeds: r(f)) for n, r in runners.items()}
        one = statistics.median(time_interleaved(calls, rounds=3, warmup=1)["flora/merged"])
        rounds = max(10, min(args.max_rounds, int(args.budget_s / (one * len(runners)))))
        samples = time_interleaved(calls, rounds=rounds, warmup=3)
        med = {n: statistics.median(v) * 1e3 for n, v in samples.items()}
        results[shape] = {"rounds": rounds, "median_ms": med, "max_abs_diff": diffs}
        print(f"\n{shape} ({rounds} interleaved rounds)")
        print(f"{'variant':<26} {'median ms':>10} {'vs flora/base':>14} {'vs torch.onnx/unmerged':>23} {'max|diff|':>10}")
        for n in runners:
            print(f"{n:<26} {med[n]:>10.3f} {med[n] / med['flora/base']:>14.3f} {med[n] / med['torch.onnx/unmerged']:>23.3f} "
                  f"{diffs[n]:>10.2e}")
    meta = {"model": args.model, "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "threads": 1}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
