"""Export time of a deep decoder: flora_graph's GenAI package against the ONNX Runtime GenAI model builder's.

Makes (or takes, ``--base``) a transformers model folder and one PEFT LoRA adapter on it, then exports,
each run in its own process and timed wall to wall (imports included), interleaved for ``--rounds``
rounds (the order rotating each round), medians reported:

- ``flora``: ``flora-graph export BASE --task text-generation-with-past --format genai --adapter a=ADAPTER``
  (the adapter hot-swappable; three layers traced, the others stamped where they are alike);
- ``flora, every layer traced``: the same with ``--trace-every-layer``;
- ``builder``: ``python -m onnxruntime_genai.models.builder -i BASE -p fp32 -e cpu --extra_options
  adapter_path=ADAPTER`` (the adapter baked in).

Each run's peak resident memory is reported beside its time (``ru_maxrss`` of its process, read with
``os.wait4``).

The model made by default has Qwen2-0.5B's shapes (24 layers, hidden 896, a 151936-token vocabulary, bf16
weights) with random weights; ``--layers`` / ``--hidden`` / ``--intermediate`` change them. Every package
is written to a temporary folder and removed after its run. Run: ``python benchmarks/export_speed.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make(root: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> tuple[Path, Path]:
    """A random Qwen2 folder (bf16) and a q/v LoRA adapter folder (rank 16, nonzero ``B``) under ``root``."""
    import peft
    import torch
    import transformers

    from flora_graph.llm_demo import save_word_tokenizer

    heads = max(1, hidden // 64)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=max(1, heads // 7), max_position_embeddings=4096,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    save_word_tokenizer(root / "base", vocab)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    adapted.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _commands(base: Path, adapter: Path, out: Path) -> dict[str, list[str]]:
    flora = [sys.executable, "-m", "flora_graph.cli", "export", str(base), "--task", "text-generation-with-past",
             "--format", "genai", "--adapter", f"a={adapter}", "--out", str(out)]
    return {
        "flora": flora,
        "flora, every layer traced": [*flora, "--trace-every-layer"],
        "builder": [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "--extra_options", f"adapter_path={adapter}"],
    }


def _run(cmd: list[str], out: Path) -> tuple[float, float]:
    """Seconds and peak resident memory (GB, the process's own ``ru_maxrss``: its pages of the model files it maps
    included) of one export in its own process; ``out`` removed after."""
    with tempfile.TemporaryFile("w+") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{log.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", type=Path, default=None, help="a transformers model folder (default: a random Qwen2 made "
                                                           "with the shapes below)")
    p.add_argument("--adapter", type=Path, default=None, help="a PEFT LoRA folder for --base (default: a random q/v "
                                                              "adapter of rank 16, made with the model)")
    p.add_argument("--layers", type=int, default=24, help="layers of the model made")
    p.add_argument("--hidden", type=int, default=896, help="hidden size of the model made")
    p.add_argument("--intermediate", type=int, default=4864, help="MLP size of the model made")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary of the model made")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--no-builder", action="store_true", help="leave the model builder out")
    args = p.parse_args(argv)
    if (args.base is None) != (args.adapter is None):
        p.error("--base and --adapter go together")
    with tempfile.TemporaryDirectory(prefix="flora_export_speed_") as tmp:
        root = Path(tmp)
        if args.base is None:
            print(f"making a random Qwen2: {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}", flush=True)
            base, adapter = _make(root, args.layers, args.hidden, args.intermediate, args.vocab)
        else:
            base, adapter = args.base, args.adapter
        out = root / "out"
        cmds = _commands(base, adapter, out)
        if args.no_builder:
            cmds.pop("builder")
        names = list(cmds)
        seconds: dict[str, list[float]] = {n: [] for n in names}
        peaks: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                s, peak = _run(cmds[name], out)
                seconds[name].append(s)
                peaks[name].append(peak)
                print(f"round {r + 1}: {name}: {s:.1f} s, peak {peak:.2f} GB", flush=True)
        med = {n: statistics.median(v) for n, v in seconds.items()}
        print("medians: " + ", ".join(f"{n} {v:.1f} s" for n, v in med.items()))
        print("peak resident memory (median): " + ", ".join(f"{n} {statistics.median(v):.2f} GB"
                                                            for n, v in peaks.items()))
        print(f"every layer traced / stamped: {med['flora, every layer traced'] / med['flora']:.2f}x")
        if "builder" in med:
            print(f"builder / flora: {med['builder'] / med['flora']:.2f}x (flora {'faster' if med['flora'] < med['builder'] else 'slower'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
