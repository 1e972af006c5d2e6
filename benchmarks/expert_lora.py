"""LoRA on a mixture of experts' expert tensors: a GenAI package's hot-swappable expert slots against eager PEFT.

Builds a small Qwen3-MoE (hidden ``--hidden``, ``--layers`` layers, ``--experts`` experts, ``--top-k`` per token,
expert width ``--expert-width``, vocab 512) and ``--adapters`` PEFT adapters with ``target_modules="all-linear"``
(which puts LoRA on the expert tensors and the routers' weights, PEFT's ``target_parameters``, beside the attention;
r 8 and 16 alternating, nonzero ``B``). It exports the package with every adapter hot-swappable
(``flora-graph export BASE --task text-generation-with-past --format genai --adapter NAME=DIR ...``, timed), and then,
interleaved for ``--rounds`` rounds, generates ``--new`` greedy tokens after a ``--prompt``-token prompt with:

- ``generator``: :class:`flora_graph.serving.generate.Generator` on plain ONNX Runtime, the first adapter active
  (each (token, expert) pair's own expert's low-rank product, a loop over the experts present);
- ``genai``: ``onnxruntime_genai`` on the same package, that adapter active;
- ``eager``: ``model.generate`` of transformers + PEFT with its cache (PEFT adds ``s B_e A_e`` to each expert's
  weight on every forward).

Per decode step time = (generation time - one-token time) / (new - 1), medians over the rounds (the runners
interleaved in an order and its reverse each round; ``step_timing.step_times``). Then a mixed batch, one row per
adapter, decoded together by the Generator (one call per step) against the same rows one after the other:
tokens/s of each. PEFT refuses a mixed batch (``adapter_names``) on such adapters, so it has no column there.
Every run uses 1 thread; every runner's tokens must equal eager PEFT's.
Run: ``python benchmarks/expert_lora.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from generate import _genai_runner
from package_runners import eager_runner, generator_runner, mixed_vs_sequential
from step_timing import paired_ratio, step_times


def build(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The base folder and ``args.adapters`` all-linear PEFT folders under ``root``; ``{name: folder}``."""
    import peft
    import torch
    import transformers

    from flora_graph.llm_demo import save_word_tokenizer

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=args.hidden // 8, num_experts=args.experts, num_experts_per_tok=args.top_k,
                                      moe_intermediate_size=args.expert_width, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(root / "base")
    save_word_tokenizer(root / "base", cfg.vocab_size)
    out = {}
    for i in range(args.adapters):
        r = 8 if i % 2 == 0 else 16
        model = peft.get_peft_model(transformers.Qwen3MoeForCausalLM.from_pretrained(root / "base"),
                                    peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                    init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        model.save_pretrained(root / f"e{i}")
        out[f"e{i}"] = root / f"e{i}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="the model's hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--experts", type=int, default=8, help="experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--expert-width", type=int, default=256, help="each expert's intermediate size")
    p.add_argument("--adapters", type=int, default=4, help="PEFT adapters in the package (and rows of the mixed batch)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="new tokens per generation")
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
        dirs = build(root, args)
        t0 = time.perf_counter()
        assert cli(["export", str(root / "base"), "--task", "text-generation-with-past", "--format", "genai",
                    *(a for n, d in dirs.items() for a in ("--adapter", f"{n}={d}")), "--out", str(root / "pkg")]) == 0
        export_s = time.perf_counter() - t0
        first = next(iter(dirs))
        prompt = [1, *range(5, 5 + args.prompt - 1)]
        eager_models = {n: peft.PeftModel.from_pretrained(transformers.Qwen3MoeForCausalLM.from_pretrained(root / "base"),
                                                          d).eval() for n, d in dirs.items()}
        gen = Generator(root / "pkg", threads=1)
        # onnxruntime-genai on one thread (_genai_runner sets the package's config), the adapters' files loaded
        runs = {"generator": generator_runner(gen, prompt),
                "genai": _genai_runner(og, root / "pkg", {first: dirs[first]}, prompt),
                "eager": eager_runner(eager_models, prompt)}
        times, rounds, _ = step_times(runs, [first], args.rounds, args.new)
        same = all(t["generator"] == t["genai"] == t["eager"] for t in rounds)
        ms = {n: statistics.median(times[(n, first)]) * 1e3 for n in runs}

        names = list(dirs)
        prompts = [[1, *range(5 + 7 * i, 5 + 7 * i + args.prompt - 1)] for i in range(len(names))]
        with torch.no_grad():
            want = [eager_models[n].generate(torch.tensor([q]), max_new_tokens=args.new, min_new_tokens=args.new,
                                             do_sample=False)[0, len(q):].tolist() for q, n in zip(prompts, names, strict=True)]
        multi = peft.PeftModel.from_pretrained(transformers.Qwen3MoeForCausalLM.from_pretrained(root / "base"),
                                               dirs[first], adapter_name=first).eval()
        for n in names[1:]:
            multi.load_adapter(dirs[n], adapter_name=n)
        try:
            with torch.no_grad():
                ids = torch.tensor(prompts)
                multi.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, adapter_names=names)
            peft_mixed = "ran"
        except (ValueError, TypeError) as exc:
            peft_mixed = f"refused ({str(exc)[:100]})"

        mixed_rate, seq_rate, ratio, same_mixed = mixed_vs_sequential(gen, prompts, names, args.new, args.rounds, want)

    print(f"Qwen3-MoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts, top-{args.top_k}, expert width "
          f"{args.expert_width}; {args.adapters} all-linear adapters (expert tensors, routers, attention)")
    print(f"export of base + {args.adapters} adapters, every expert tensor a hot-swappable slot: {export_s:.2f} s")
    print(f"per decode step with adapter {first} ({args.prompt}-token prompt, {args.new} new, median of {args.rounds}): "
          f"generator {ms['generator']:.3f} ms, genai {ms['genai']:.3f} ms, eager PEFT + cache {ms['eager']:.3f} ms; "
          f"eager/generator {paired_ratio(times, 'eager', 'generator', first):.1f}x, "
          f"eager/genai {paired_ratio(times, 'eager', 'genai', first):.1f}x")
    print(f"greedy tokens equal (generator, genai, eager PEFT): {same}")
    print(f"mixed batch, {len(names)} rows over {len(names)} adapters x {args.new} tokens (tokens/s, median of "
          f"{args.rounds}): mixed {mixed_rate:.0f}, the rows in sequence "
          f"{seq_rate:.0f}; mixed / sequential {ratio:.2f}x; tokens equal eager PEFT per "
          f"row: {same_mixed}; PEFT's adapter_names on these adapters: {peft_mixed}")
    return 0 if same and same_mixed else 1


if __name__ == "__main__":
    raise SystemExit(main())
