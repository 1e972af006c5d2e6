"""Export time: flora_graph (capture + optimize ``merged`` + lower to ONNX) vs ``torch.onnx.export``.

Run: python benchmarks/export_time.py [--models decoder llama4] [--rounds 5] [--json out.json]

Needs the ``bench`` extra (``onnxscript`` for ``torch.onnx.export(..., dynamo=True)``, peft,
transformers). Models, each with a PEFT LoRA of rank 8 on all seven projections (nonzero ``B``):

* ``decoder``: the built-in decoder, ``build_decoder(lora_rank=8)`` (flora_graph's own
  adapters), and the same weights as a PEFT model (``save_peft_adapter`` ->
  ``PeftModel.from_pretrained``), which the baseline exports;
* ``llama4``: a random 4-layer ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 8 heads,
  vocab 32000, ``use_cache=False``) wrapped by ``peft.get_peft_model``.

Variants, each writing an ``.onnx`` file with ``batch`` and ``seq`` dynamic:

* ``flora_graph``: ``capture(peft_model)`` + ``optimize(graph, "merged", backend="onnxruntime")``
  + ``save_onnx`` (lowering, ``onnx.checker``, atomic write); ``flora_graph/own`` captures the
  decoder with flora_graph's own adapters instead;
* ``torch.onnx``: ``peft_model.merge_and_unload()`` (timed) + ``torch.onnx.export(merged,
  dynamo=True, dynamic_shapes=...)`` + ``ONNXProgram.save``. ``merge_and_unload`` mutates the
  model, so each call gets a deep copy made before timing starts.

Fixed threads (``torch.set_num_threads(1)``), variants interleaved (:func:`time_interleaved`,
one untimed warm-up round), medians. Afterwards each file runs in ONNX Runtime (one intra-op
thread, no spinning) on a ``3 x 11`` input against eager PEFT. ``--legacy`` also tries the
TorchScript-based exporter (``dynamo=False``) on the merged model, with and without an
``attention_mask``, and reports whether it works.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import json
import platform
import statistics
import tempfile
import time
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
from flora_graph.runtimes.onnx_writer import save_onnx
from flora_graph.runtimes.onnxrt import make_session_options

DYN = {"input_ids": {0: "batch", 1: "seq"}}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama4_config() -> Any:
    """The 4-layer, hidden-512 Llama config of the benchmarks (no download)."""
    import transformers

    return transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                                    num_key_value_heads=8, vocab_size=32000, use_cache=False)


def build_models(name: str, workdir: Path) -> tuple[nn.Module, dict[str, nn.Module], int]:
    """``(peft_model, {flora variant: model it captures}, vocab)`` for ``name``."""
    import peft

    torch.manual_seed(0)
    if name == "decoder":
        from flora_graph.adapters.peft import save_peft_adapter
        from flora_graph.models.decoder import build_decoder

        own = build_decoder(lora_rank=8)
        save_peft_adapter(own, workdir / "decoder_adapter")
        pm = peft.PeftModel.from_pretrained(build_decoder(), workdir / "decoder_adapter").eval()
        return pm, {"flora_graph": pm, "flora_graph/own": own}, own.config.vocab_size
    if name == "llama4":
        import transformers

        base = transformers.LlamaForCausalLM(llama4_config()).eval()
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(base, cfg).eval()
        return pm, {"flora_graph": pm}, 32000
    raise SystemExit(f"unknown model {name!r}")


def logits(out: Any) -> torch.Tensor:
    """The logits of a model output (a tensor or a transformers ``ModelOutput``)."""
    return out if isinstance(out, torch.Tensor) else out["logits"]


def flora_export(model: nn.Module, example: dict[str, torch.Tensor], path: Path, stages: list[dict[str, float]]) -> None:
    """capture + optimize (merged, for onnxruntime) + lower and save; stage times appended to ``stages``."""
    t0 = time.perf_counter()
    graph = capture(model, example, DYN)
    t1 = time.perf_counter()
    graph = optimize(graph, "merged", backend="onnxruntime")
    t2 = time.perf_counter()
    save_onnx(graph, path)
    t3 = time.perf_counter()
    stages.append({"capture": t1 - t0, "optimize": t2 - t1, "lower+save": t3 - t2})


def torch_onnx_export(peft_model: nn.Module, example: dict[str, torch.Tensor], path: Path,
                      stages: list[dict[str, float]]) -> None:
    """PEFT merge + ``torch.onnx.export(dynamo=True)`` with dynamic batch and seq + save."""
    t0 = time.perf_counter()
    merged = peft_model.merge_and_unload()
    t1 = time.perf_counter()
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(merged, (), kwargs=example, dynamo=True, dynamic_shapes=dims, verbose=False)
    t2 = time.perf_counter()
    program.save(str(path))
    t3 = time.perf_counter()
    stages.append({"merge": t1 - t0, "export": t2 - t1, "save": t3 - t2})


def ort_run(path: Path, feeds: dict[str, torch.Tensor], extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The first output of the file at ``path`` in ONNX Runtime (one thread, no spinning); ``extra``:
    inputs the file may declare besides ``feeds`` (fed only when it does)."""
    opts = make_session_options(**backend_options("onnxruntime", 1))
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    declared = {i.name for i in sess.get_inputs()}
    more = {k: v for k, v in (extra or {}).items() if k in declared}
    return sess.run(None, {**{k: v.numpy() for k, v in feeds.items()}, **more})[0]


def ort_parity(path: Path, feeds: dict[str, torch.Tensor], want: np.ndarray) -> float:
    """Largest |ORT - eager| of the file at ``path`` (``inf`` when the shapes differ)."""
    got = ort_run(path, feeds)
    return float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")


def try_legacy(peft_model: nn.Module, vocab: int, workdir: Path) -> dict[str, str]:
    """Whether ``torch.onnx.export(dynamo=False)`` exports the merged model (without and, where the
    model takes one, with an ``attention_mask``), and its parity at another shape than the example's."""
    out: dict[str, str] = {}
    gen = torch.Generator().manual_seed(1)
    ids, check = torch.randint(0, vocab, (2, 8), generator=gen), torch.randint(0, vocab, (3, 11), generator=gen)
    takes_mask = "attention_mask" in inspect.signature(peft_model.get_base_model().forward).parameters
    for with_mask in (False, True) if takes_mask else (False,):
        merged = copy.deepcopy(peft_model).merge_and_unload()
        args: tuple = (ids, torch.ones_like(ids)) if with_mask else (ids,)
        names = ["input_ids", "attention_mask"] if with_mask else ["input_ids"]
        key = "with attention_mask" if with_mask else "input_ids only"
        path = workdir / f"legacy_{with_mask}.onnx"
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(merged, args, str(path), dynamo=False,
                                  input_names=names, dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
            seconds = time.perf_counter() - t0
        except Exception as exc:
            out[key] = f"fails: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            continue
        feeds = {"input_ids": check, **({"attention_mask": torch.ones_like(check)} if with_mask else {})}
        with torch.no_grad():
            want = logits(merged(*feeds.values())).numpy()
        try:  # a traced Llama declares transformers' logits_to_keep as an input (0: every position)
            got = ort_run(path, feeds, {"logits_to_keep": np.array(0)})
            if got.shape == want.shape:
                diff = f"max|ORT-eager| {float(np.max(np.abs(got - want))):.2e} at 3x11"
            else:
                diff = f"WRONG: output shape {list(got.shape)} at 3x11, eager gives {list(want.shape)}"
            inputs = [i.name for i in ort.InferenceSession(str(path)).get_inputs()]
            if inputs != names:
                diff += f" (the file's inputs: {inputs})"
        except Exception as exc:
            diff = f"ORT fails at 3x11: {str(exc).strip().splitlines()[0][:200]}"
        out[key] = f"exports ({seconds:.2f} s, one call), {diff}"
    return out


def bench(name: str, rounds: int, legacy: bool, workdir: Path) -> dict[str, Any]:
    """Time every variant of model ``name``; return medians, stage medians, parity."""
    pm, flora_models, vocab = build_models(name, workdir)
    gen = torch.Generator().manual_seed(0)
    example = {"input_ids": torch.randint(0, vocab, (2, 8), generator=gen)}
    check = {"input_ids": torch.randint(0, vocab, (3, 11), generator=gen)}
    with torch.no_grad():
        want = logits(pm(**check)).numpy()
    copies = [copy.deepcopy(pm) for _ in range(rounds + 1)]  # merge_and_unload consumes one per call
    stages: dict[str, list[dict[str, float]]] = {}
    paths: dict[str, Path] = {}
    variants: dict[str, Callable[[], Any]] = {}
    for vname, model in flora_models.items():
        paths[vname] = workdir / f"{name}_{vname.replace('/', '_')}.onnx"
        stages[vname] = []
        variants[vname] = lambda m=model, p=paths[vname], s=stages[vname]: flora_export(m, example, p, s)
    paths["torch.onnx"] = workdir / f"{name}_torch_onnx.onnx"
    stages["torch.onnx"] = []
    variants["torch.onnx"] = lambda: torch_onnx_export(copies.pop(), example, paths["torch.onnx"], stages["torch.onnx"])
    samples = time_interleaved(variants, rounds=rounds, warmup=1)
    base = statistics.median(samples["torch.onnx"])
    rows = {}
    for vname, s in samples.items():
        med = statistics.median(s)
        timed = stages[vname][1:]  # the warm-up call is not a sample
        rows[vname] = {
            "median_s": med,
            "speedup_vs_torch_onnx": base / med,
            "stages_median_s": {k: statistics.median(st[k] for st in timed) for k in timed[0]},
            "max_abs_diff_ort_vs_eager_peft": ort_parity(paths[vname], check, want),
            "file_mb": paths[vname].stat().st_size / 2**20 + sum(
                f.stat().st_size for f in paths[vname].parent.glob(paths[vname].name + "*.data")) / 2**20,
        }
    result: dict[str, Any] = {"model": name, "rounds": rounds, "variants": rows}
    if legacy:
        result["legacy_dynamo_false"] = try_legacy(pm, vocab, workdir)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["decoder", "llama4"], choices=["decoder", "llama4"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--legacy", action="store_true", help="also try torch.onnx.export(dynamo=False)")
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="export_time_") as tmp:
        for name in args.models:
            r = bench(name, args.rounds, args.legacy, Path(tmp))
            results.append(r)
            print(f"\n{name}: {args.rounds} interleaved rounds, torch threads 1, medians")
            print(f"{'variant':<17} {'median s':>9} {'speed-up':>9} {'max|ORT-eager|':>15} {'MB':>6}  stages (median s)")
            for vname, row in r["variants"].items():
                st = "  ".join(f"{k} {v:.2f}" for k, v in row["stages_median_s"].items())
                print(f"{vname:<17} {row['median_s']:>9.2f} {row['speedup_vs_torch_onnx']:>8.2f}x "
                      f"{row['max_abs_diff_ort_vs_eager_peft']:>15.2e} {row['file_mb']:>6.1f}  {st}")
            for k, v in r.get("legacy_dynamo_false", {}).items():
                print(f"legacy torch.onnx.export(dynamo=False), {k}: {v}")
    meta = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "threads": 1}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\n{meta}")


if __name__ == "__main__":
    main()
