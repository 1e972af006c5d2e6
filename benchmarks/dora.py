"""DoRA adapters hot-swappable in a GenAI package: decode step against a plain LoRA adapter and eager PEFT.

Builds the tiny Llama of ``benchmarks/generate.py`` (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 512) and two
PEFT adapters on all seven projections, r 16, nonzero ``B``: ``dora`` (``use_dora``, magnitudes that are not the
weight norms) and ``lora`` (the same without DoRA). It exports one package with both hot-swappable
(``flora-graph export BASE --task text-generation-with-past --format genai --adapter dora=DIR --adapter lora=DIR``;
the DoRA modules' slots also take each output row's rescaling), and then, interleaved for ``--rounds`` rounds, times
a decode step (``--prompt``-token prompt, ``--new`` tokens; ``step_timing.step_times``) with each adapter in:

- ``generator``: :class:`flora_graph.serving.generate.Generator` on plain ONNX Runtime;
- ``genai``: ``onnxruntime_genai`` on the same package;
- ``eager``: transformers + PEFT ``generate`` with its cache (PEFT's DoRA layer recomputes the weight norm of
  ``W + s B A`` on every forward).

Then a mixed batch of ``--rows`` rows alternating the two adapters, decoded by the Generator in one call per step,
against the same rows one after the other. Every run uses 1 thread; every runner's tokens must equal eager PEFT's.
Run: ``python benchmarks/dora.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from generate import _genai_runner, build
from package_runners import eager_runner, generator_runner, mixed_vs_sequential
from step_timing import paired_ratio, step_times

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="new tokens per generation")
    p.add_argument("--rows", type=int, default=8, help="rows of the mixed batch (alternating the two adapters)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    args = p.parse_args(argv)

    import onnxruntime_genai as og
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from flora_graph.cli import main as cli
    from flora_graph.serving.generate import Generator

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, 0)  # the base folder alone
        gen_t = torch.Generator().manual_seed(0)
        for name, dora in (("dora", True), ("lora", False)):
            model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                        peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, use_dora=dora,
                                                        init_lora_weights=False))
            with torch.no_grad():
                for n, prm in model.named_parameters():
                    if "lora_B" in n:
                        prm.copy_(torch.randn(prm.shape, generator=gen_t) * 0.02)
                    if "lora_magnitude_vector" in n:
                        prm.mul_(1 + 0.3 * torch.rand(prm.shape, generator=gen_t))
            model.save_pretrained(root / name)
        t0 = time.perf_counter()
        assert cli(["export", str(root / "base"), "--task", "text-generation-with-past", "--format", "genai",
                    "--adapter", f"dora={root / 'dora'}", "--adapter", f"lora={root / 'lora'}",
                    "--out", str(root / "pkg")]) == 0
        export_s = time.perf_counter() - t0
        names = ["dora", "lora"]
        prompt = [1, *range(5, 5 + args.prompt - 1)]
        eager_models = {n: peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                                          root / n).eval() for n in names}
        gen = Generator(root / "pkg", threads=1)
        # onnxruntime-genai on one thread (_genai_runner sets the package's config), the adapters' files loaded
        runs = {"generator": generator_runner(gen, prompt),
                "genai": _genai_runner(og, root / "pkg", {n: root / n for n in names}, prompt),
                "eager": eager_runner(eager_models, prompt)}
        times, rounds, _ = step_times(runs, names, args.rounds, args.new)
        same = all(t["generator"] == t["genai"] == t["eager"] for t in rounds)

        rows = [names[i % 2] for i in range(args.rows)]
        prompts = [[1, *range(5 + 7 * i, 5 + 7 * i + args.prompt - 1)] for i in range(args.rows)]
        with torch.no_grad():
            want = [eager_models[n].generate(torch.tensor([q]), max_new_tokens=args.new, min_new_tokens=args.new,
                                             do_sample=False)[0, len(q):].tolist() for q, n in zip(prompts, rows, strict=True)]
        mixed_rate, seq_rate, ratio, same_mixed = mixed_vs_sequential(gen, prompts, rows, args.new, args.rounds, want)

    print(f"export of base + a DoRA and a LoRA adapter (r 16, all seven projections), both hot-swappable: {export_s:.2f} s")
    for n in names:
        ms = {k: statistics.median(times[(k, n)]) * 1e3 for k in runs}
        print(f"{n:>5}: per decode step generator {ms['generator']:.3f} ms, genai {ms['genai']:.3f} ms, eager PEFT + "
              f"cache {ms['eager']:.3f} ms; eager/generator {paired_ratio(times, 'eager', 'generator', n):.1f}x, "
              f"eager/genai {paired_ratio(times, 'eager', 'genai', n):.1f}x")
    dora_cost = statistics.median(d / plain for d, plain in zip(times[("generator", "dora")], times[("generator", "lora")],
                                                                strict=True))
    print(f"a DoRA step / a LoRA step (generator): {dora_cost:.2f}x")
    print(f"greedy tokens equal (generator, genai, eager PEFT): {same}")
    print(f"mixed batch, {args.rows} rows alternating DoRA and LoRA x {args.new} tokens (tokens/s, median of {args.rounds}): "
          f"mixed {mixed_rate:.0f}, the rows in sequence {seq_rate:.0f};"
          f" mixed / sequential {ratio:.2f}x; tokens equal eager PEFT per row: {same_mixed}")
    return 0 if same and same_mixed else 1


if __name__ == "__main__":
    raise SystemExit(main())
