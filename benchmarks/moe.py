"""Mixture of experts: prompt and decode-step time of GenAI packages, float and 4-bit, against eager transformers.

Builds a small ``--arch`` model (Qwen3-MoE, or gpt-oss: biased experts, clamped SwiGLU; hidden ``--hidden``,
``--layers`` layers, ``--experts`` experts, ``--top-k`` per token, expert width ``--expert-width``, vocab 1024)
and exports its GenAI package four ways:

- ``float``: as ``flora-graph export --format genai`` writes it: each expert product one ``ExpertLinear``,
  a ``Loop`` over the experts in use, each multiplying the rows routed to it (``group-experts``);
- ``gathered``: with ``group-experts`` left out of the presets: the products as transformers' ``batched_mm``
  writes them (one copy of its expert's weight per token and expert, ``Gather`` + batched matrix-vector
  products);
- ``int4``: ``--precision int4`` (accuracy level 4, blocks of 32): each block one ``com.microsoft.QMoE`` with
  4-bit experts (:mod:`flora_graph.runtimes.ort_moe`, :mod:`flora_graph.serving.int4`), the other layers
  ``MatMulNBits``;
- ``int4 float experts``: the same with the ``MoE`` fusion off: the experts stay float loops (4-bit packages
  before the fusion).

Then, interleaved for ``--rounds`` rounds, it times with the Generator (1 thread) the prefill of each
``--prompts`` length and a decode step (median of 32), and eager transformers' prefill with its default
experts implementation. The float packages must give eager's greedy tokens; for the 4-bit ones the share
of prompts whose next token equals eager's is printed (4-bit weights and int8 activations move the logits).
First, each package's prefill of the longest prompt runs in a process of its own, whose peak resident
memory is printed.
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
    """The base folder and its packages (:data:`PACKAGES`) under ``root``."""
    import torch
    import transformers

    from flora_graph.llm_demo import save_word_tokenizer
    from flora_graph.serving.genai import export_genai

    torch.manual_seed(0)
    common = dict(vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=args.hidden // 8, num_experts_per_tok=args.top_k,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    if args.arch == "gpt_oss":
        cfg = transformers.GptOssConfig(**common, intermediate_size=args.expert_width, num_local_experts=args.experts)
    else:
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=2 * args.hidden, num_experts=args.experts,
                                          moe_intermediate_size=args.expert_width)
    model = MODELS[args.arch](cfg)
    if args.arch == "gpt_oss":  # its experts start empty (torch.empty): give them weights
        for name, p in model.named_parameters():
            if ".experts." in name:
                torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(root / "base")
    save_word_tokenizer(root / "base", cfg.vocab_size)
    presets = importlib.import_module("flora_graph.passes.optimize").PRESETS
    ort_moe = importlib.import_module("flora_graph.runtimes.ort_moe")
    export_genai(root / "base", root / "float")
    export_genai(root / "base", root / "int4", precision="int4")
    kept, fuse = dict(presets), ort_moe.fuse_mixture_of_experts
    try:  # 4-bit without the MoE nodes, and float as it was before group-experts
        ort_moe.fuse_mixture_of_experts = lambda ctx: 0
        export_genai(root / "base", root / "int4 float experts", precision="int4")
        presets.update({k: tuple(p for p in v if p != "group-experts") for k, v in kept.items()})
        export_genai(root / "base", root / "gathered")
    finally:
        presets.update(kept)
        ort_moe.fuse_mixture_of_experts = fuse


MODELS = {"qwen3_moe": lambda cfg: __import__("transformers").Qwen3MoeForCausalLM(cfg),
          "gpt_oss": lambda cfg: __import__("transformers").GptOssForCausalLM(cfg)}
PACKAGES = ("float", "gathered", "int4", "int4 float experts")
FLOAT = ("float", "gathered")


def prompt_of(n: int) -> list[int]:
    """A ``n``-token prompt."""
    return [1, *[(7 * i) % 1000 + 3 for i in range(n - 1)]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=sorted(MODELS), default="qwen3_moe", help="the model family")
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
        for name in PACKAGES:
            done = subprocess.run([sys.executable, __file__, "--peak-of", str(root / name),
                                   "--prompts", str(max(args.prompts))], capture_output=True, text=True)
            peaks[name] = (f"{json.loads(done.stdout.strip().splitlines()[-1])['peak_gb']:.2f} GB"
                           if done.returncode == 0 else f"not measured ({done.stderr.strip()[-300:]})")
        gens = {name: Generator(root / name, threads=1) for name in PACKAGES}
        eager = transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()
        eager.generation_config.eos_token_id = None
        prefill: dict[tuple[str, int], list[float]] = {}
        step: dict[str, list[float]] = {}
        same, agree = True, {name: [] for name in PACKAGES if name not in FLOAT}
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
                    if name in FLOAT:
                        same &= got == want
                    else:
                        agree[name].append(got == want)
            for name, gen in gens.items():
                batch = gen.batch()
                batch.add(prompt_of(args.prompts[0]), max_new_tokens=33, stop_tokens=[])
                while batch.active:
                    batch.step()
                step.setdefault(name, []).append(float(np.median(batch.step_seconds[1:])))
        print(f"{args.arch} hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top {args.top_k}, "
              f"width {args.expert_width}); 1 thread; medians of {args.rounds} interleaved rounds")
        for n in args.prompts:
            ms = {k: statistics.median(prefill[(k, n)]) * 1e3 for k in (*PACKAGES, "eager")}
            print(f"  prefill {n:>4} tokens: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                  + f"; float / int4 {ms['float'] / ms['int4']:.2f}x, int4 float experts / int4 "
                    f"{ms['int4 float experts'] / ms['int4']:.2f}x, gathered / float {ms['gathered'] / ms['float']:.1f}x")
        ms = {k: statistics.median(v) * 1e3 for k, v in step.items()}
        print("  decode step: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
              + f"; float / int4 {ms['float'] / ms['int4']:.2f}x, int4 float experts / int4 "
                f"{ms['int4 float experts'] / ms['int4']:.2f}x")
        print(f"  peak resident memory of a process loading the package and prefilling {max(args.prompts)} tokens: "
              + ", ".join(f"{name} {peak}" for name, peak in peaks.items()))
        print(f"greedy tokens equal eager transformers' (float packages, every prompt): {same}; 4-bit packages' next "
              "token equal eager's: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in agree.items()))
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
