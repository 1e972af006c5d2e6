"""Mixture of experts: prompt and decode-step time of a GenAI package with ``group-experts`` and without it.

Builds a small Qwen3-MoE (hidden ``--hidden``, ``--layers`` layers, ``--experts`` experts, ``--top-k`` per
token, expert width ``--expert-width``, vocab 1024), exports its GenAI package twice: as ``flora-graph export
--format genai`` writes it (each mixture of experts' product one ``ExpertLinear``: a ``Loop`` over the experts
in use, each multiplying the rows routed to it), and with the ``group-experts`` pass left out of the presets
(the products as transformers' ``batched_mm`` writes them: one copy of its expert's weight per token and
expert, ``Gather`` + batched matrix-vector products). Then, interleaved for ``--rounds`` rounds, it times with
the Generator (1 thread) the prefill of each ``--prompts`` length and a decode step (median of 32), and eager
transformers' prefill with its default experts implementation, and checks that both packages give eager's
greedy tokens. First, each package's prefill of the longest prompt runs in a process of its own, whose peak
resident memory is printed.
Run: ``python benchmarks/moe.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def build(root: Path, args: argparse.Namespace) -> None:
    """The base folder and its two packages under ``root``."""
    import torch
    import transformers

    from flora_graph.llm_demo import save_word_tokenizer
    from flora_graph.serving.genai import export_genai

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=args.hidden // 8, num_experts=args.experts,
                                      num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
                                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(root / "base")
    save_word_tokenizer(root / "base", cfg.vocab_size)
    presets = importlib.import_module("flora_graph.passes.optimize").PRESETS
    export_genai(root / "base", root / "grouped")
    kept = dict(presets)
    try:  # the package as it was before the pass
        presets.update({k: tuple(p for p in v if p != "group-experts") for k, v in kept.items()})
        export_genai(root / "base", root / "gathered")
    finally:
        presets.update(kept)


def prompt_of(n: int) -> list[int]:
    """A ``n``-token prompt."""
    return [1, *[(7 * i) % 1000 + 3 for i in range(n - 1)]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--experts", type=int, default=32, help="experts per layer")
    p.add_argument("--top-k", type=int, default=4, help="experts per token")
    p.add_argument("--expert-width", type=int, default=512, help="each expert's intermediate size")
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 128, 512], help="prompt lengths")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    p.add_argument("--peak-of", metavar="PACKAGE", help=argparse.SUPPRESS)  # internal: one prefill, print the peak RSS
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.peak_of:
        return _peak(Path(args.peak_of), max(args.prompts))
    import numpy as np
    import torch
    import transformers

    from flora_graph.serving.generate import Generator

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args)
        peaks = {}  # first, before this process holds anything large
        for name in ("grouped", "gathered"):
            done = subprocess.run([sys.executable, __file__, "--peak-of", str(root / name),
                                   "--prompts", str(max(args.prompts))], capture_output=True, text=True)
            peaks[name] = (f"{json.loads(done.stdout.strip().splitlines()[-1])['peak_gb']:.2f} GB"
                           if done.returncode == 0 else f"not measured ({done.stderr.strip()[-300:]})")
        gens = {name: Generator(root / name, threads=1) for name in ("grouped", "gathered")}
        eager = transformers.Qwen3MoeForCausalLM.from_pretrained(root / "base").eval()
        eager.generation_config.eos_token_id = None
        prefill: dict[tuple[str, int], list[float]] = {}
        step: dict[str, list[float]] = {}
        same = True
        for _ in range(args.rounds):
            for n in args.prompts:
                prompt = prompt_of(n)
                with torch.no_grad():
                    t = time.perf_counter()
                    want = eager.generate(torch.tensor([prompt]), max_new_tokens=1, do_sample=False)[0, n:].tolist()
                    prefill.setdefault(("eager", n), []).append(time.perf_counter() - t)
                for name, gen in gens.items():
                    t = time.perf_counter()
                    got = gen.generate([prompt], max_new_tokens=1, stop_tokens=[])[0]
                    prefill.setdefault((name, n), []).append(time.perf_counter() - t)
                    same &= got == want
            for name, gen in gens.items():
                batch = gen.batch()
                batch.add(prompt_of(args.prompts[0]), max_new_tokens=33, stop_tokens=[])
                while batch.active:
                    batch.step()
                step.setdefault(name, []).append(float(np.median(batch.step_seconds[1:])))
        print(f"Qwen3-MoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top {args.top_k}, "
              f"width {args.expert_width}); 1 thread; medians of {args.rounds} interleaved rounds")
        for n in args.prompts:
            ms = {k: statistics.median(prefill[(k, n)]) * 1e3 for k in ("grouped", "gathered", "eager")}
            print(f"  prefill {n:>4} tokens: grouped {ms['grouped']:8.1f} ms, gathered {ms['gathered']:8.1f} ms "
                  f"({ms['gathered'] / ms['grouped']:.1f}x the grouped), eager transformers {ms['eager']:8.1f} ms")
        ms = {k: statistics.median(v) * 1e3 for k, v in step.items()}
        print(f"  decode step: grouped {ms['grouped']:.3f} ms, gathered {ms['gathered']:.3f} ms "
              f"({ms['gathered'] / ms['grouped']:.2f}x)")
        print(f"  peak resident memory of a process loading the package and prefilling {max(args.prompts)} tokens: "
              + ", ".join(f"{name} {peak}" for name, peak in peaks.items()))
        print(f"greedy tokens equal eager transformers' (both packages, every prompt): {same}")
    return 0 if same else 1


def _peak(package: Path, n: int) -> int:
    """Load ``package`` in the Generator, prefill ``n`` tokens, print the peak resident memory as JSON: this
    process's ``VmHWM`` (``ru_maxrss`` would carry the parent's peak over ``execve``)."""
    from flora_graph.serving.generate import Generator

    Generator(package, threads=1).generate([prompt_of(n)], max_new_tokens=1, stop_tokens=[])
    status = Path("/proc/self/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_gb": kb / 1e6}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
