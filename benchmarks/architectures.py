"""Newer architectures: package export time and decode speed with the Generator (and ONNX Runtime GenAI where it
runs the package) against eager PEFT, beside the ONNX Runtime GenAI model builder.

For each ``--arch`` (tiny configs, hidden 64, vocab 128): Gemma 4 (a cache shape per layer: its full attention
layers' heads wider and fewer than its windowed layers'), Mamba (Mamba-1's selective scan, one ``LinearScan``),
Qwen3.5 and Kimi Linear (the gated delta rule, one ``GatedDeltaRule``: ONNX Runtime's ``LinearAttention`` in the
package; Kimi's decay per key channel, beside latent attention) and Bamba (Mamba-2's chunked scan beside attention),
it builds the model with a PEFT LoRA adapter (r 8, nonzero ``B``), exports the GenAI package (``export_genai``: the
time is printed), tries the model builder on the same folder with the adapter baked in (``python -m
onnxruntime_genai.models.builder -i BASE -o OUT -p fp32 -e cpu --extra_options adapter_path=AD``: its time, or why
it failed), and then, interleaved for ``--rounds`` rounds, generates ``--new`` greedy tokens after a
``--prompt``-token prompt with the adapter active: with the Generator, with GenAI on the package (where GenAI has
the model's cache layout) and on the builder's model (where it built one), and with eager transformers + PEFT and
its cache (``generate``), all on 1 thread (ONNX Runtime with no worker threads, none to spin), each holding the
package's end-of-text ids back for all the new tokens (GenAI's ``min_length``, eager's ``min_new_tokens``). It prints
the median tokens/s of each, the ratios to eager, and whether the tokens are equal to eager's. Gemma 4 comes as the
text model, its edge models' form (``gemma4-e``: the last layers read earlier layers' cache) and the multimodal
checkpoint.
Run: ``python benchmarks/architectures.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
GEMMA4 = dict(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              attention_k_eq_v=True, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"] * 2)
ARCHS: dict[str, tuple[str, str, dict[str, Any], list[str] | str]] = {
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", GEMMA4,
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # the edge models' form (E2B, E4B): the last layers read earlier layers' cache (no GroupQueryAttention then)
    "gemma4-e": ("Gemma4TextConfig", "Gemma4ForCausalLM", {**GEMMA4, "num_kv_shared_layers": 2},
                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # the multimodal checkpoint (the form Gemma 4 ships in, and the builder's input), its text decoder adapted
    "gemma4-multimodal": ("Gemma4Config", "Gemma4ForConditionalGeneration",
                          dict(text_config=GEMMA4, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                     num_hidden_layers=1, num_attention_heads=2,
                                                                     num_key_value_heads=2, head_dim=16, patch_size=4,
                                                                     position_embedding_size=64, pooling_kernel_size=2),
                               image_token_id=0, boi_token_id=125, eoi_token_id=126, video_token_id=None,
                               audio_token_id=None, boa_token_id=None, eoa_token_index=None),
                          r"model\.language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4),
              ["in_proj", "x_proj"]),
    "qwen3.5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
                dict(**COMMON, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                     linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
                ["q_proj", "v_proj", "in_proj_qkv", "out_proj"]),
    "kimi-linear": ("KimiLinearConfig", "KimiLinearForCausalLM",
                    dict(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, linear_head_dim=16,
                         linear_num_heads=4, layer_types=["linear_attention", "full_attention"],
                         mlp_layer_types=["dense", "sparse"]),
                    ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "bamba": ("BambaConfig", "BambaForCausalLM",
              dict(**COMMON, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4,
                   attn_layer_indices=[1]),
              ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def _package(arch: str, root: Path) -> tuple[Any, float]:
    """The tiny ``arch`` with its PEFT adapter (eval mode) and the seconds its package export took."""
    import peft
    import transformers

    from flora_graph.llm_demo import save_word_tokenizer
    from flora_graph.serving.genai import export_genai

    cfg_cls, model_cls, cfg, targets = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**cfg)).eval()
    model.config.eos_token_id = None
    model.save_pretrained(root / "base")
    save_word_tokenizer(root / "base", 128)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                         init_lora_weights=False)).eval()
    adapted.save_pretrained(root / "ad")
    t0 = time.perf_counter()
    report = export_genai(root / "base", root / "pkg", {"ad": root / "ad"})
    seconds = time.perf_counter() - t0
    adapted.base_model.model.generation_config.eos_token_id = None
    return adapted, seconds, report.not_for_genai is None


def _builder(root: Path) -> tuple[float | None, str]:
    """The model builder on ``root / "base"`` with the adapter baked in: ``(seconds, "")``, or ``(None, why)``."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "base"), "-o",
                           str(root / "builder"), "-p", "fp32", "-e", "cpu", "--extra_options",
                           f"adapter_path={root / 'ad'}"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        return None, (lines[-1] if lines else f"exit {done.returncode}")[:200]
    return seconds, ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS), help="models to run")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens generated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians printed)")
    ap.add_argument("--builder", action=argparse.BooleanOptionalAction, default=True,
                    help="try the ONNX Runtime GenAI model builder on each model")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    prompt = [3 + (7 * i) % 120 for i in range(args.prompt)]
    results: dict[str, Any] = {}
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[arch] = _measure(arch, Path(tmp), prompt, args)
    return results


def _measure(arch: str, root: Path, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """``arch``'s package (and the builder's model) under ``root``, timed against eager PEFT; prints a line."""
    import onnxruntime_genai as og
    from generate import _genai_runner  # benchmarks/generate.py: GenAI on one thread

    from flora_graph.serving.generate import Generator

    adapted, export_s, genai_ok = _package(arch, root)
    builder_s, builder_why = _builder(root) if args.builder else (None, "not run (--no-builder)")
    gen = Generator(root / "pkg", threads=1)
    ids = torch.tensor([prompt])
    # every runner holds the package's end-of-text ids back for all the new tokens (GenAI's min_length does)
    held = sorted(gen.eos)
    runs: dict[str, Any] = {"generator": lambda: gen.generate([prompt], adapters="ad", max_new_tokens=args.new,
                                                              min_new_tokens=args.new)[0]}
    if genai_ok:
        package = _genai_runner(og, root / "pkg", {"ad": root / "pkg" / "adapters" / "ad.onnx_adapter"}, prompt)
        runs["genai"] = lambda: package("ad", args.new)[0]
    if builder_s is not None:
        built = _genai_runner(og, root / "builder", {}, prompt)
        runs["builder"] = lambda: built(None, args.new)[0]

    def eager() -> list[int]:
        with torch.no_grad():
            return adapted.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=args.new, min_new_tokens=args.new,
                                    eos_token_id=held or None)[0, len(prompt):].tolist()

    runs["eager"] = eager
    speed: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            tokens[k] = run()
            speed[k].append(args.new / (time.perf_counter() - t0))
    r: dict[str, Any] = {"export_s": export_s, "builder_s": builder_s, "builder_failed": builder_why or None}
    r.update({f"{k}_tok_s": statistics.median(v) for k, v in speed.items()})
    r["tokens_equal"] = {k: t == tokens["eager"] for k, t in tokens.items() if k != "eager"}
    cols = [f"{k} {r[f'{k}_tok_s']:.0f} tokens/s ({r[f'{k}_tok_s'] / r['eager_tok_s']:.1f}x eager, tokens equal: "
            f"{r['tokens_equal'][k]})" for k in runs if k != "eager"]
    done = f"{builder_s:.1f} s" if builder_s is not None else (builder_why if not args.builder else f"failed: {builder_why}")
    print(f"{arch}: package export {export_s:.1f} s, model builder {done}; decode ({args.prompt} + {args.new} "
          f"tokens, 1 thread, median of {args.rounds}): eager transformers + PEFT with its cache "
          f"{r['eager_tok_s']:.0f} tokens/s; " + "; ".join(cols), flush=True)
    return r


if __name__ == "__main__":
    main()
