"""Beam search on a decoder package: flora_graph's Generator against ONNX Runtime GenAI and eager transformers + PEFT.

Builds the tiny Llama of ``benchmarks/generate.py`` (the deployable-LLM issue's: hidden 256, 4 layers) and
``--adapters`` PEFT adapters in a temporary folder, exports the GenAI package, and then, interleaved for ``--rounds``
rounds, searches ``--new`` tokens with ``--beams`` hypotheses after a ``--prompt``-token prompt (the end-of-text token
held back, so every hypothesis runs every step), base model and first adapter, with:

- ``generator``: :class:`flora_graph.serving.generate.Generator` (``num_beams``) on plain ONNX Runtime;
- ``genai``: onnxruntime-genai's own beam search on the same package (the adapter loaded from its file);
- ``eager``: ``model.generate(num_beams=...)`` of transformers (+ ``PeftModel``), with its cache.

Per decode step time = (search time - time of a one-token search) / (new - 1), medians over the rounds; each ratio is
the median of the rounds' ratios (``benchmarks/step_timing.py``). Then ``--prompts`` prompts searched in one call a
step against one prompt at a time (Generator, medians of ``--rounds`` interleaved pairs), with one adapter for every
prompt and with a different adapter each (the mixed model). It checks that every runner's tokens equal eager's.
1 thread everywhere. Run: ``python benchmarks/beam_search.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from step_timing import paired_ratio, step_times


def _generate_module():
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapters", type=int, default=4, help="PEFT adapters in the package")
    p.add_argument("--beams", type=int, default=4, help="hypotheses per prompt")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="new tokens per hypothesis")
    p.add_argument("--prompts", type=int, default=4, help="prompts of the batched search")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    args = p.parse_args(argv)

    import onnxruntime_genai as og
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    bench = _generate_module()
    from flora_graph.cli import main as cli
    from flora_graph.serving.generate import Generator

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        peft_dirs = bench.build(root, args.adapters)
        assert cli(["export", str(root / "base"), "--task", "text-generation-with-past", "--format", "genai",
                    *(a for n, d in peft_dirs.items() for a in ("--adapter", f"{n}={d}")), "--out", str(root / "pkg")]) == 0
        first = next(iter(peft_dirs))
        prompt = [1, *range(5, 5 + args.prompt - 1)]
        k = args.beams
        eager_models = {None: transformers.LlamaForCausalLM.from_pretrained(root / "base").eval(),
                        first: peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                                              peft_dirs[first]).eval()}
        ids = torch.tensor([prompt])

        def eager(adapter: str | None, new: int) -> tuple[list[int], float]:
            with torch.no_grad():
                t = time.perf_counter()
                out = eager_models[adapter].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                     min_new_tokens=new, do_sample=False, num_beams=k)
                return out[0, len(prompt):].tolist(), time.perf_counter() - t

        gen = Generator(root / "pkg", threads=1)

        def generator(adapter: str | None, new: int) -> tuple[list[int], float]:
            t = time.perf_counter()
            out = gen.generate([prompt], adapters=adapter, max_new_tokens=new, min_new_tokens=new, num_beams=k)[0]
            return out, time.perf_counter() - t

        genai = bench._genai_runner(og, root / "pkg", peft_dirs, prompt, num_beams=k)
        runs = {"generator": generator, "genai": genai, "eager": eager}
        which = [None, first]
        times, rounds, stable = step_times(runs, which, args.rounds, args.new)
        same = stable and all(t["generator"] == t["eager"] for t in rounds)
        same_genai = all(t["genai"] == t["eager"] for t in rounds)
        print(f"Llama {bench.SIZE}; {k} hypotheses, {args.prompt}-token prompt, {args.new} new tokens, 1 thread")
        print(f"tokens equal eager's: generator {same}, genai {same_genai}")
        for adapter in which:
            ms = {name: statistics.median(times[(name, adapter)]) * 1e3 for name in runs}
            print(f"{adapter or 'base':>6}: per decode step ({k} rows) generator {ms['generator']:.3f} ms, genai "
                  f"{ms['genai']:.3f} ms, eager+cache {ms['eager']:.3f} ms: generator/genai "
                  f"{paired_ratio(times, 'generator', 'genai', adapter):.2f}x, eager/generator "
                  f"{paired_ratio(times, 'eager', 'generator', adapter):.1f}x")
        prompts = [[1, *range(5 + 7 * i, 5 + 7 * i + args.prompt - 1 - i)] for i in range(args.prompts)]
        kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, num_beams=k)
        for label, names in (("one adapter", [first] * args.prompts),
                             ("an adapter each", [list(peft_dirs)[i % len(peft_dirs)] for i in range(args.prompts)])):
            def together(names=names):
                return gen.generate(prompts, adapters=names, **kw)

            def apart(names=names):
                return [h for q, a in zip(prompts, names, strict=True) for h in gen.generate([q], adapters=a, **kw)]

            ok = together() == apart()
            seconds: dict[str, list[float]] = {"together": [], "apart": []}
            for _ in range(args.rounds):
                for name, fn in (("together", together), ("apart", apart), ("apart", apart), ("together", together)):
                    t = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - t)
            a, b = statistics.median(seconds["together"]), statistics.median(seconds["apart"])
            print(f"{args.prompts} prompts ({label}): in one call a step {a * 1e3:.1f} ms, one prompt at a time "
                  f"{b * 1e3:.1f} ms ({b / a:.2f}x); the same hypotheses: {ok}")
            same &= ok
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
