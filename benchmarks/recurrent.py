"""Models with recurrent layers: package export time and decode speed with the Generator against eager PEFT.

For each ``--arch`` (tiny configs, hidden 64, 2 layers, vocab 128): Mamba (Mamba-1's selective scan, one
``LinearScan``), Qwen3.5 and Kimi Linear (the gated delta rule, one ``GatedDeltaRule``: ONNX Runtime's
``LinearAttention`` in the package; Kimi's decay per key channel, beside latent attention) and Bamba (Mamba-2's
chunked scan beside attention), it builds the model with a PEFT LoRA adapter (r 8, nonzero ``B``), exports the
GenAI package (``export_genai``: the time is printed) and then, interleaved for ``--rounds`` rounds, generates
``--new`` greedy tokens after a ``--prompt``-token prompt with the adapter active, with the Generator and with
eager transformers + PEFT and its cache (``generate``), both on 1 thread (ONNX Runtime with no worker threads,
none to spin). It prints the median tokens/s of each, their ratio, and whether the tokens are equal.
Run: ``python benchmarks/recurrent.py``.
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
ARCHS: dict[str, tuple[str, str, dict[str, Any], list[str]]] = {
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
    export_genai(root / "base", root / "pkg", {"ad": root / "ad"})
    seconds = time.perf_counter() - t0
    adapted.base_model.model.generation_config.eos_token_id = None
    return adapted, seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS), help="models to run")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens generated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians printed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from flora_graph.serving.generate import Generator

    prompt = [3 + (7 * i) % 120 for i in range(args.prompt)]
    ids = torch.tensor([prompt])
    results: dict[str, Any] = {}
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapted, export_s = _package(arch, Path(tmp))
            gen = Generator(Path(tmp) / "pkg", threads=1)
            ours, eager, equal = [], [], True
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                got = gen.generate([prompt], adapters="ad", max_new_tokens=args.new, stop_tokens=[])[0]
                ours.append(args.new / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                with torch.no_grad():
                    want = adapted.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=args.new, min_new_tokens=args.new)[0, len(prompt):].tolist()
                eager.append(args.new / (time.perf_counter() - t0))
                equal = equal and got == want
        r = {"export_s": export_s, "generator_tok_s": statistics.median(ours), "eager_tok_s": statistics.median(eager),
             "tokens_equal": equal}
        r["ratio"] = r["generator_tok_s"] / r["eager_tok_s"]
        results[arch] = r
        print(f"{arch}: package export {export_s:.1f} s; decode ({args.prompt} + {args.new} tokens, 1 thread, median of "
              f"{args.rounds}): Generator {r['generator_tok_s']:.0f} tokens/s, eager transformers + PEFT with its cache "
              f"{r['eager_tok_s']:.0f}: {r['ratio']:.1f}x; tokens equal: {equal}", flush=True)
    return results


if __name__ == "__main__":
    main()
