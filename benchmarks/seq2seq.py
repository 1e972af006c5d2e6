"""Encoder-decoder generation: flora_graph's package against eager transformers + PEFT and Hugging Face Optimum.

Builds a T5 of ``t5-small``'s geometry (``--size small``: d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, vocab
32128; ``--size tiny`` for a quick run) with random weights and ``--adapters`` PEFT adapters (r 8 and 16
alternating, q/k/v/o/wi/wo of both stacks, nonzero ``B``) in a temporary folder, exports the package with
``flora-graph export BASE --task text2text-generation-with-past --adapter NAME=DIR ...`` (timed), and then,
interleaved for ``--rounds`` rounds, generates ``--new`` greedy tokens for a padded batch of ``--batch`` inputs
(``--input`` tokens and shorter) with:

- ``flora``: :class:`flora_graph.serving.seq2seq.Seq2SeqGenerator` on plain ONNX Runtime, the adapter named per row;
- ``eager``: ``model.generate`` of transformers (+ ``PeftModel`` for an adapter), with its cache;
- ``optimum``, given ``--optimum-python`` (a virtualenv holding ``optimum-onnx``; see
  ``benchmarks/optimum_decode.py``): Optimum's export of the base and of the first adapter merged into it (Optimum
  has no swappable adapters; its exporter is torch.onnx), run by ``ORTModelForSeq2SeqLM.generate`` in a worker
  process, so its runs interleave with the others.

The same runners then search with ``--beams`` hypotheses per input (``num_beams``; every hypothesis runs
``--new`` tokens), all of a step's ``batch x beams`` rows in one call, and their tokens are checked against eager's
beam search.

Then a batch whose rows use different adapters (and one none), decoded together by the package's mixed-adapter
models, against the same rows generated one at a time (tokens/s, medians).

Per decode step time = (generation time - time of a one-token generation) / (new - 1): the encoder and the first
step cancel. Each ratio is the median over the rounds of that round's ratio; a round runs every runner in an order
and then in reverse and takes each runner's mean, so load that drifts linearly over it cancels. Each runner first
generates one untimed token (the runner before evicted its weights from the caches). Every run uses 1 thread (torch
and ONNX Runtime, no spinning). It checks that every runner produces eager PEFT's greedy tokens.
Run: ``python benchmarks/seq2seq.py``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from optimum_worker import OptimumWorker, add_optimum_python
from step_timing import paired_ratio, step_times

SIZES = {
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "tiny": dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}
"""``t5-small``'s geometry, and a tiny one for a quick run."""


def build(root: Path, size: str, adapters: int) -> dict[str, Path]:
    """``root/base`` (a random T5 of ``size``) and ``adapters`` PEFT folders ``root/aN``; returns ``{name: folder}``."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(**SIZES[size], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(root / "base")
    out = {}
    for i in range(adapters):
        model = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(root / "base"),
                                    peft.LoraConfig(r=8 if i % 2 == 0 else 16, lora_alpha=16,
                                                    target_modules=["q", "k", "v", "o", "wi", "wo"]))
        gen = torch.Generator().manual_seed(100 + i)
        for mod in model.modules():
            if hasattr(mod, "lora_B"):
                for k in mod.lora_B:
                    mod.lora_B[k].weight.data.normal_(0, 0.05, generator=gen)
        model.save_pretrained(root / f"a{i}")
        out[f"a{i}"] = root / f"a{i}"
    return out


def _inputs(batch: int, length: int, vocab: int) -> list[list[int]]:
    """``batch`` inputs of ``length`` tokens and shorter (a padded batch), each ending in T5's end-of-text token."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [[*rng.integers(2, vocab, max(2, length - 3 * i) - 1).tolist(), 1] for i in range(batch)]


def _with_beams(fn, beams: int, adapter: str | None, new: int):
    """``fn(adapter, new, beams)``: a runner of :func:`step_times` that searches with ``beams`` hypotheses."""
    return fn(adapter, new, beams)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="the T5's geometry")
    p.add_argument("--adapters", type=int, default=3, help="PEFT adapters in the package")
    p.add_argument("--batch", type=int, default=4, help="inputs decoded together")
    p.add_argument("--input", type=int, default=32, help="tokens of the longest input")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    p.add_argument("--beams", type=int, default=4, help="hypotheses per input of the beam search section (1: none)")
    add_optimum_python(p)
    args = p.parse_args(argv)

    import peft
    import torch
    import transformers

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    from flora_graph.cli import main as cli
    from flora_graph.serving.seq2seq import Seq2SeqGenerator

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        peft_dirs = build(root, args.size, args.adapters)
        export = ["export", str(root / "base"), "--task", "text2text-generation-with-past", "--out", str(root / "pkg"),
                  *(a for n, d in peft_dirs.items() for a in ("--adapter", f"{n}={d}"))]
        t0 = time.perf_counter()
        assert cli(export) == 0
        export_s = time.perf_counter() - t0
        first = next(iter(peft_dirs))
        inputs = _inputs(args.batch, args.input, SIZES[args.size]["vocab_size"])
        width = max(map(len, inputs))
        ids = [row + [0] * (width - len(row)) for row in inputs]
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in inputs]
        optimum = OptimumWorker.start(args.optimum_python, root, first, {"input_ids": ids, "attention_mask": mask},
                                      task="text2text-generation-with-past")
        eager_models = {None: transformers.T5ForConditionalGeneration.from_pretrained(root / "base").eval()}
        for n, d in peft_dirs.items():
            eager_models[n] = peft.PeftModel.from_pretrained(
                transformers.T5ForConditionalGeneration.from_pretrained(root / "base"), d).eval()
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

        def eager(adapter: str | None, new: int, beams: int = 1) -> tuple[list[list[int]], float]:
            with torch.no_grad():
                t = time.perf_counter()
                out = eager_models[adapter].generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=new,
                                                     min_new_tokens=new, do_sample=False, num_beams=beams)
                return out[:, 1:].tolist(), time.perf_counter() - t

        flora_gen = Seq2SeqGenerator(root / "pkg", threads=1)

        def flora(adapter: str | None, new: int, beams: int = 1) -> tuple[list[list[int]], float]:
            t = time.perf_counter()
            out = flora_gen.generate(inputs, adapters=adapter, max_new_tokens=new, min_new_tokens=new, num_beams=beams)
            return out, time.perf_counter() - t

        def runners(beams: int) -> dict:
            runs = {"flora": flora, **({"optimum": optimum.run} if optimum is not None else {}), "eager": eager}
            return {name: functools.partial(_with_beams, fn, beams) for name, fn in runs.items()}

        which = [None, first]
        searches = {1: step_times(runners(1), which, args.rounds, args.new)}
        if args.beams > 1:
            searches[args.beams] = step_times(runners(args.beams), which, args.rounds, args.new)
        if optimum is not None:
            optimum.close()
        agree = {}  # per search: (flora_graph's tokens equal eager's, Optimum's equal eager's)
        for beams, (_, rounds, stable) in searches.items():
            agree[beams] = (stable and all(t["flora"] == t["eager"] for t in rounds),
                            all(t.get("optimum", t["eager"]) == t["eager"] for t in rounds))
        same = all(ok for ok, _ in agree.values())
        # a batch whose rows use different adapters (and none): one call a step, against the rows one at a time
        names = [[*peft_dirs, None][i % (len(peft_dirs) + 1)] for i in range(args.batch)]
        mixed_t, alone_t, same_mixed = [], [], True
        flora_gen.generate(inputs, adapters=names, max_new_tokens=1)  # untimed: loads the mixed-adapter models
        for _ in range(args.rounds):
            t = time.perf_counter()
            rows = flora_gen.generate(inputs, adapters=names, max_new_tokens=args.new, min_new_tokens=args.new)
            mixed_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            alone = [flora_gen.generate([x], adapters=n, max_new_tokens=args.new, min_new_tokens=args.new)[0]
                     for x, n in zip(inputs, names, strict=True)]
            alone_t.append(time.perf_counter() - t)
            same_mixed &= rows == alone
        for i, n in enumerate(names):
            want, _ = eager(n, args.new)
            same_mixed &= rows[i] == want[i]
        size = ", ".join(f"{k} {v}" for k, v in SIZES[args.size].items())
        print(f"T5 ({size}), {args.adapters} adapters; batch of {args.batch} inputs of "
              f"{'/'.join(str(len(r)) for r in inputs)} tokens, {args.new} new tokens a row, 1 thread")
        print(f"export of base + {args.adapters} adapters (flora-graph export --task text2text-generation-with-past): "
              f"{export_s:.2f} s")
        if optimum is not None:
            base_s, one_s = optimum.export_s["base"], optimum.export_s[first]
            print(f"Optimum (optimum-onnx main_export, no swappable adapters: one merged model per adapter): "
                  f"{base_s:.2f} s (base), {one_s:.2f} s (one adapter merged and exported); base + {args.adapters} "
                  f"adapters that way: {base_s + args.adapters * one_s:.2f} s, {args.adapters + 1} full models: "
                  f"{(base_s + args.adapters * one_s) / export_s:.1f}x flora_graph's export")
        for beams, (times, _, _) in searches.items():
            what = "greedy" if beams == 1 else f"beam search, {beams} hypotheses an input"
            print(f"{what}: tokens equal eager's ({args.new} tokens a row): flora_graph {agree[beams][0]}"
                  + (f", Optimum {agree[beams][1]}" if optimum is not None else ""))
            for adapter in which:
                ms = {name: statistics.median(times[(name, adapter)]) * 1e3 for name in ("flora", "eager", "optimum")
                      if (name, adapter) in times}
                line = (f"{adapter or 'base':>6}: per decode step (all {args.batch * beams} rows) flora_graph "
                        f"{ms['flora']:.3f} ms, eager+cache {ms['eager']:.3f} ms: eager/flora_graph "
                        f"{paired_ratio(times, 'eager', 'flora', adapter):.1f}x")
                if optimum is not None:
                    line += (f"; Optimum (ORTModelForSeq2SeqLM) {ms['optimum']:.3f} ms: optimum/flora_graph "
                             f"{paired_ratio(times, 'optimum', 'flora', adapter):.2f}x")
                print(line)
        tokens = args.batch * args.new
        print(f"mixed-adapter batch ({', '.join(n or 'none' for n in names)}; one call a step): "
              f"{tokens / statistics.median(mixed_t):.0f} tokens/s against {tokens / statistics.median(alone_t):.0f} "
              f"for the rows one at a time ({statistics.median(alone_t) / statistics.median(mixed_t):.1f}x); each row's "
              f"tokens equal its own generation's and eager PEFT's: {same_mixed}")
    return 0 if same and same_mixed else 1


if __name__ == "__main__":
    raise SystemExit(main())
