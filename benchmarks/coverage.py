"""Coverage matrix: tiny architectures and PEFT variants through flora_graph and ``torch.onnx``, side by side.

Run: python benchmarks/coverage.py [--cases NAME ...] [--quick] [--out DIR] [--no-torch-onnx]

Needs the ``bench`` extra (``onnxscript`` for ``torch.onnx.export(..., dynamo=True)``, peft,
transformers, diffusers). Every case is built from a tiny config (no download), seeded, in eval mode:
decoders, encoders, encoder-decoders, a text encoder, vision transformers and conv nets, speech
encoders, a mixture of experts, diffusion models (diffusers' Stable Diffusion UNet, Flux transformer and
LTX-Video VAE),
``torch.nn`` transformer blocks, and PEFT variants (rsLoRA,
rank/alpha patterns, embedding LoRA, two adapters active at once, a second adapter set active,
a weighted combination, ``modules_to_save``, DoRA, AdaLoRA, Conv2d and Conv1d LoRA, and PEFT tuners other than
LoRA: HRA, SHiRA, BOFT, C3A). Each model carries a
PEFT LoRA with a nonzero ``B`` (``init_lora_weights=False``); a model that takes an
``attention_mask`` gets one whose first row is left-padded by two positions.

Per case:

* eager PEFT gives the reference outputs at two check shapes (``batch x seq`` 1x5 and 3x11 for
  token models, batch 1 and 3 for images and audio), both other than the example's (2x8);
* **flora_graph export**: ``capture`` + ``optimize(graph, "merged", backend="onnxruntime")`` +
  ``save_onnx``, timed with ``time.process_time()`` (CPU seconds) and wall clock, one run;
* **flora_graph cells**: ``fused`` and ``merged`` x ``onnxruntime`` and ``torchscript``, each
  optimized from the captured graph, compiled and run at both check shapes; the error of a cell
  is ``max |got - want| / max |want|`` over every output (relative to the largest reference value);
* **torch.onnx**: ``merge_and_unload()`` of a deep copy of the PEFT model (the copy made before
  timing; where PEFT refuses to merge, the PEFT model itself) + ``torch.onnx.export(model, (),
  kwargs=example, dynamo=True, dynamic_shapes=...)`` + ``ONNXProgram.save``, timed the same way
  (the dims as strings, which torch.onnx turns into ``Dim.DYNAMIC``), then its file run in ONNX
  Runtime at both check shapes against eager PEFT, over every position and over the positions the
  padding mask keeps (a left-padded query sees no key, and what a model returns there is arbitrary:
  torch.onnx's files differ from eager there; flora_graph's match eager at every position).

Eager PEFT runs with the ``nn.MultiheadAttention`` fast path off (see :func:`no_fastpath`).

One thread everywhere (``torch.set_num_threads(1)``, ORT one intra-op thread, no spinning). Both
exporters are warmed up once on a small PEFT MLP before the matrix, and the order of the two
exports alternates from case to case. Every exception is caught per cell and recorded as its
type and the first line of its message. The printed table is followed by the counts and three
targets: no case where torch.onnx succeeds (exports, and matches eager within ``--tol`` at the
unpadded positions) and flora_graph fails (capture, export, or any cell off by more than ``--tol``
anywhere); a median export speed-up (torch.onnx CPU s / flora_graph CPU s, over the cases both
export) of at least 5x; every preset x backend within ``--tol`` relative of eager PEFT.
``--out DIR`` writes ``DIR/coverage.json`` (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import logging
import math
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TOL = 1e-4
PRESETS = ("fused", "merged")
BACKENDS = ("onnxruntime", "torchscript")
VOCAB = 128
MAX_POS = 64
EXAMPLE = (2, 8)  # (batch, seq) of the example the exporters trace with
CHECKS = ((1, 5), (3, 11))  # (batch, seq) of the two check inputs, both other than the example's
TOKEN_DIMS = {0: "batch", 1: "seq"}
TARGET_SPEEDUP = 5.0


# --------------------------------------------------------------------------------------------- cases
@dataclass
class Built:
    """A case's model and inputs: ``model`` (a PeftModel or a plain module, eval mode), the example the
    exporters trace with, its named dynamic dims, upper bounds (``dim_max``) or None, two check inputs."""

    model: nn.Module
    example: dict[str, torch.Tensor]
    dynamic_dims: dict[str, dict[int, str]]
    dim_max: dict[str, int] | None
    checks: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    build: Callable[[], Built]
    about: str = ""


CASES: dict[str, Case] = {}
QUICK: list[str] = []  # the representative subset (--quick, and the default test suite)


def register(name: str, family: str, build: Callable[[], Built], about: str = "", quick: bool = False) -> None:
    CASES[name] = Case(name, family, build, about)
    if quick:
        QUICK.append(name)


def lora(model: nn.Module, *, adapter_name: str = "default", **cfg: Any) -> nn.Module:
    """``model`` wrapped by PEFT with a LoRA whose ``A`` and ``B`` are random (nonzero ``B``), eval mode."""
    import peft

    torch.manual_seed(1)
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("target_modules", "all-linear")
    return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **cfg), adapter_name=adapter_name).eval()


def tokens(batch: int, seq: int, seed: int, *, mask: bool = True, types: bool = False,
           decoder_seq: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` (ids 4.., no special token), with an ``attention_mask`` whose first row is
    left-padded by two, ``token_type_ids`` (two segments), ``decoder_input_ids`` where asked."""
    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(4, VOCAB, (batch, seq), generator=gen)}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.int64)
        m[0, :2] = 0
        out["attention_mask"] = m
    if types:
        t = torch.zeros(batch, seq, dtype=torch.int64)
        t[:, seq // 2:] = 1
        out["token_type_ids"] = t
    if decoder_seq is not None:
        out["decoder_input_ids"] = torch.randint(4, VOCAB, (batch, decoder_seq), generator=gen)
    return out


def token_case(model: nn.Module, *, mask: bool = True, types: bool = False, dim_max: dict[str, int] | None = None,
               decoder: bool = False) -> Built:
    """A token model's example (2x8) and checks (1x5, 3x11); an encoder-decoder's decoder ids are 6, 3, 7 long."""
    dec = (6, 3, 7) if decoder else (None, None, None)
    example = tokens(*EXAMPLE, 0, mask=mask, types=types, decoder_seq=dec[0])
    checks = tuple(tokens(b, s, k + 1, mask=mask, types=types, decoder_seq=dec[k + 1]) for k, (b, s) in enumerate(CHECKS))
    dims = {n: dict(TOKEN_DIMS) for n in example}
    if decoder:
        dims["decoder_input_ids"] = {0: "batch", 1: "dec_seq"}
    return Built(model, example, dims, dim_max, checks)  # type: ignore[arg-type]


def batch_case(model: nn.Module, make: Callable[[int, int], dict[str, torch.Tensor]],
               dims: dict[str, dict[int, str]], dim_max: dict[str, int] | None = None) -> Built:
    """A model fed by ``make(batch, seed)``: example batch 2, checks batch 1 and 3."""
    return Built(model, make(2, 0), dims, dim_max, (make(1, 1), make(3, 2)))


def hf(config_cls: str, model_cls: str, **cfg: Any) -> nn.Module:
    """``transformers.<model_cls>(transformers.<config_cls>(**cfg))``, seeded, float32."""
    import transformers

    torch.manual_seed(0)
    attn = cfg.pop("attn_implementation", None)
    config = getattr(transformers, config_cls)(**cfg)
    if attn is not None:
        config._attn_implementation = attn
    return getattr(transformers, model_cls)(config).eval()


SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": MAX_POS}
GQA = {**SMALL, "num_key_value_heads": 2}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOUNDED = {"seq": MAX_POS}  # a learned position table of MAX_POS rows, sliced by seq


def decoder(config_cls: str, model_cls: str, *, dim_max: dict[str, int] | None = None, lora_cfg: dict | None = None,
            mask: bool = True, **cfg: Any) -> Callable[[], Built]:
    def build() -> Built:
        return token_case(lora(hf(config_cls, model_cls, use_cache=False, **cfg), **(lora_cfg or {})), mask=mask,
                          dim_max=dim_max)
    return build


# decoders
register("llama", "decoder", decoder("LlamaConfig", "LlamaForCausalLM", **GQA), "GQA 4/2, RoPE")
register("mistral", "decoder", decoder("MistralConfig", "MistralForCausalLM", **GQA))
register("qwen2", "decoder", decoder("Qwen2Config", "Qwen2ForCausalLM", **GQA), "q/k/v biases")
register("qwen3", "decoder", decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **GQA), "q/k norms")
register("phi3", "decoder", decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    **GQA), "fused qkv_proj, gate_up_proj")
register("gemma", "decoder", decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8, **GQA), "scaled embeddings")
register("gemma2", "decoder", decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, attn_implementation="eager",
                                      **GQA), "eager attention, soft-capping, sliding window")
register("gpt2", "decoder", decoder("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                    n_positions=MAX_POS, bos_token_id=0, eos_token_id=0, dim_max=BOUNDED),
         "Conv1D (fan_in_fan_out), learned positions", quick=True)
register("gpt-neox", "decoder", decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", bos_token_id=0, eos_token_id=0, **SMALL),
         "partial rotary, parallel residual")
register("ctrl", "decoder", decoder("CTRLConfig", "CTRLLMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                    dff=64, n_positions=MAX_POS, dim_max=BOUNDED, lora_cfg={"target_modules": ["Wq", "Wv"]}),
         "sinusoidal position table re-assigned to itself on every call (a buffer write that carries no state)")
register("gpt-j", "decoder", decoder("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=MAX_POS, rotary_dim=4, bos_token_id=0, eos_token_id=0),
         "interleaved rotary")
register("falcon", "decoder", decoder("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=0),
         "multi-query attention")
register("bloom", "decoder", decoder("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0), "ALiBi")
register("opt", "decoder", decoder("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   ffn_dim=64, num_attention_heads=4, max_position_embeddings=MAX_POS,
                                   word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                   dim_max=BOUNDED), "learned positions from the mask's cumsum")
register("gemma3", "decoder", decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=4, **GQA),
         "q/k norms, local and global layers")
register("smollm3", "decoder", decoder("SmolLM3Config", "SmolLM3ForCausalLM", pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2, **GQA), "no rotary on every fourth layer")
register("olmo2", "decoder", decoder("Olmo2Config", "Olmo2ForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     **GQA), "post-norms, q/k norms over all heads")
register("phi", "decoder", decoder("PhiConfig", "PhiForCausalLM", bos_token_id=1, eos_token_id=2, **SMALL),
         "partial rotary, parallel attention and MLP, LayerNorm")
register("stablelm", "decoder", decoder("StableLmConfig", "StableLmForCausalLM", bos_token_id=1, eos_token_id=2, **GQA),
         "partial rotary, LayerNorm")
register("gpt-bigcode", "decoder", decoder("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=32,
                                           n_layer=2, n_head=4, n_positions=MAX_POS, dim_max=BOUNDED),
         "StarCoder's multi-query attention, one fused c_attn")
register("codegen", "decoder", decoder("CodeGenConfig", "CodeGenForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2,
                                       n_head=4, n_positions=MAX_POS, rotary_dim=4, bos_token_id=0, eos_token_id=0),
         "fused qkv in a mixed head order, interleaved partial rotary")
register("openai-gpt", "decoder", decoder("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", vocab_size=VOCAB, n_embd=32,
                                          n_layer=2, n_head=4, n_positions=MAX_POS, dim_max=BOUNDED),
         "a seq != n_positions guard torch.export suggests no bound for")
register("mpt", "decoder", decoder("MptConfig", "MptForCausalLM", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                                   max_seq_len=MAX_POS), "ALiBi built for max_seq_len, bias[..., max(0, n - seq):]")
register("roformer-causal", "decoder", decoder("RoFormerConfig", "RoFormerForCausalLM", is_decoder=True, **SMALL),
         "rotary through reshape_as")
register("lfm2", "decoder", decoder("Lfm2Config", "Lfm2ForCausalLM", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                    **{**GQA, "num_hidden_layers": 3},
                                    layer_types=["conv", "full_attention", "conv"]),
         "short convolutions around an attention layer, mask[:, -seq:]")
# mixture of experts: LoRA on the attention (the experts are fused parameters, not Linear layers)
register("mixtral", "moe", decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                                   lora_cfg={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, **GQA),
         "4 experts, top 2", quick=True)

register("deepseek-v3", "moe", decoder("DeepseekV3Config", "DeepseekV3ForCausalLM", **{**GQA, "num_key_value_heads": 4},
                                       moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                       topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12,
                                       qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                                       lora_cfg={"target_modules": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                    "kv_b_proj", "o_proj"]}),
         "multi-head latent attention, grouped routing, a dense first layer")
register("deepseek-v2", "moe", decoder("DeepseekV2Config", "DeepseekV2ForCausalLM", **{**GQA, "num_key_value_heads": 4},
                                       moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                       topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None,
                                       qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                                       lora_cfg={"target_modules": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                                    "o_proj"]}),
         "complex rotary (torch.polar), multi-head latent attention")
register("deepseek-v3.2", "moe", decoder("DeepseekV32Config", "DeepseekV32ForCausalLM",
                                         **{**GQA, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                         n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                         first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                                         qk_nope_head_dim=8, v_head_dim=8, index_topk=8, index_n_heads=16,
                                         index_head_dim=8, mlp_layer_types=["dense", "sparse"],
                                         lora_cfg={"target_modules": ["q_b_proj", "kv_b_proj", "o_proj"]}),
         "sparse attention: an indexer keeps the best min(8, keys) keys of each query (fewer keys at 5 tokens)")
register("llama4", "moe", decoder("Llama4TextConfig", "Llama4ForCausalLM", **{**GQA, "num_hidden_layers": 4}, head_dim=8,
                                  intermediate_size_mlp=64, num_local_experts=2, attention_chunk_size=4,
                                  lora_cfg={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
         "complex rotary, chunked attention, a layer without rotary, a shared expert")
# state-space hybrids: Mamba-2's chunked scan (chunks of 3, so that the example's 8 tokens and the checks' 5 and 11
# span several) beside attention; LoRA on the attention
ATTN_LORA = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
register("granite-4-hybrid", "hybrid", decoder("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", **GQA,
                                               num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4,
                                               mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=3,
                                               layer_types=["mamba", "attention"], lora_cfg=ATTN_LORA),
         "Mamba-2 and attention layers, experts")
register("falcon-h1", "hybrid", decoder("FalconH1Config", "FalconH1ForCausalLM", **GQA, head_dim=8, mamba_d_ssm=32,
                                        mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=3,
                                        lora_cfg=ATTN_LORA), "Mamba-2 and attention side by side in each layer")
register("bamba", "hybrid", decoder("BambaConfig", "BambaForCausalLM", **GQA, mamba_n_heads=4, mamba_d_head=16,
                                    mamba_d_state=8, mamba_chunk_size=3, attn_layer_indices=[1], lora_cfg=ATTN_LORA),
         "Mamba-2 layers, one attention layer")
register("mamba2", "hybrid", decoder("Mamba2Config", "Mamba2ForCausalLM", vocab_size=VOCAB, hidden_size=32,
                                     num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8, chunk_size=3,
                                     n_groups=1, lora_cfg={"target_modules": ["in_proj"]}),
         "state-space layers alone (Mamba-2's chunked scan)")
register("mamba", "hybrid", decoder("MambaConfig", "MambaForCausalLM", vocab_size=VOCAB, hidden_size=32,
                                    num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                                    lora_cfg={"target_modules": ["in_proj", "x_proj"]}),
         "Mamba-1's selective scan, a Python loop over positions (one LinearScan)")
register("falcon-mamba", "hybrid", decoder("FalconMambaConfig", "FalconMambaForCausalLM", vocab_size=VOCAB,
                                           hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                                           lora_cfg={"target_modules": ["in_proj", "x_proj"]}),
         "Mamba-1 with RMS norms on B, C and dt")
register("jamba", "hybrid", decoder("JambaConfig", "JambaForCausalLM", **{**GQA, "num_hidden_layers": 4},
                                    mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8, num_experts=4,
                                    num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                                    expert_layer_period=2, expert_layer_offset=1, use_mamba_kernels=False,
                                    lora_cfg={"target_modules": ["q_proj", "v_proj", "in_proj", "x_proj"]}),
         "Mamba-1 and attention layers, experts on every other layer")
register("qwen3.5", "hybrid", decoder("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", **GQA, head_dim=8,
                                      linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                                      linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"],
                                      lora_cfg=ATTN_LORA),
         "gated delta rule: a Python loop over chunks of 64 (one GatedDeltaRule)")
register("kimi-linear", "hybrid", decoder("KimiLinearConfig", "KimiLinearForCausalLM",
                                          **{**SMALL, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2, moe_intermediate_size=16, num_local_experts=4,
                                          num_experts_per_tok=2, kv_lora_rank=16, qk_rope_head_dim=8,
                                          qk_nope_head_dim=8, v_head_dim=8, linear_head_dim=8, linear_num_heads=4,
                                          layer_types=["linear_attention", "full_attention"],
                                          mlp_layer_types=["dense", "sparse"],
                                          lora_cfg={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
         "Kimi delta attention (a decay per key channel) beside multi-head latent attention, experts")
register("bailing-hybrid", "hybrid", decoder("BailingHybridConfig", "BailingHybridForCausalLM",
                                             **{**SMALL, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2, head_dim=8, kv_lora_rank=16, q_lora_rank=16,
                                             qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, num_local_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=16,
                                             layer_types=["linear_attention", "full_attention"],
                                             lora_cfg={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
         "Kimi delta attention split at a dynamic index (tensor_split) beside latent attention, experts")
register("minimax", "hybrid", decoder("MiniMaxConfig", "MiniMaxForCausalLM", **GQA, head_dim=8, num_local_experts=4,
                                      num_experts_per_tok=2, block_size=3,
                                      layer_types=["linear_attention", "full_attention"],
                                      lora_cfg={"target_modules": ["qkv_proj", "out_proj", "q_proj", "v_proj"]}),
         "lightning attention (a decayed linear attention looped over blocks of 3) beside attention, experts")
register("recurrent-gemma", "hybrid", decoder("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", **{**GQA, "num_hidden_layers": 3},
                                              head_dim=8, lru_width=32, attention_window_size=4, mask=False,
                                              lora_cfg={"target_modules": ["linear_x", "linear_y", "linear_out",
                                                                           "q_proj", "v_proj"]}),
         "Griffin: RG-LRU recurrent blocks (a scan transformers loops over positions) beside windowed attention; "
         "unpadded: transformers convolves a row's padding into its first tokens, which the export treats as absent")
register("dbrx", "moe", decoder("DbrxConfig", "DbrxForCausalLM", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                                 max_seq_len=MAX_POS, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                 ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2, "hidden_size": 32},
                                 lora_cfg={"target_modules": ["Wqkv", "out_proj"]}),
         "experts stacked in one parameter each, looped over the experts hit (data-dependent); clipped fused qkv")
register("rwkv", "hybrid", decoder("RwkvConfig", "RwkvForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   attention_hidden_size=32, intermediate_size=64, context_length=MAX_POS, mask=False,
                                   lora_cfg={"target_modules": ["key", "value", "receptance", "output"]}),
         "RWKV-4: token shifts and the WKV recurrence, which transformers loops over positions with its states in a "
         "list; unpadded: transformers ignores the mask")
register("xlstm", "hybrid", decoder("xLSTMConfig", "xLSTMForCausalLM", vocab_size=VOCAB, hidden_size=128, embedding_dim=128,
                                    num_hidden_layers=2, num_blocks=2, num_heads=4, mode="inference", mask=False,
                                    lora_cfg={"target_modules": ["q", "k", "v", "out_proj", "proj_down"]}),
         "mLSTM matrix memories (a loop over positions, a chunked kernel, a step kernel) in a cache class of its own; "
         "unpadded: transformers reads no mask; hidden 128, as its config rounds its widths up to 64")
INKLING2 = {**GQA, "head_dim": 8, "unpadded_vocab_size": VOCAB, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
            "swa_head_dim": 8, "sliding_window_size": 3, "rel_extent": 4, "log_scaling_n_floor": 4,
            "n_layers_per_attn_res_block": 1, "layer_types": ["hybrid_sliding", "hybrid"], "n_routed_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "lora_cfg": {"target_modules": ["linear", "gate_proj"]}}
register("inkling2", "hybrid", decoder("Inkling2TextConfig", "Inkling2ForCausalLM", **INKLING2),
         "short convolutions on every projection, whose key/value taps are projected per token (windows of a padded "
         "sequence: unfold over a dynamic axis), a relative position bias, attention residuals over blocks, experts")
register("inkling2-loop", "hybrid", decoder("Inkling2LoopTextConfig", "Inkling2LoopForCausalLM",
                                            **{**INKLING2, "num_hidden_layers": 4, "layer_types": ["hybrid_sliding", "hybrid"] * 2},
                                            loop_layer_index_start=2, loop_layer_index_end=4, loop_num_passes=2,
                                            loop_gate_rank=8),
         "Inkling 2 with its last two layers run twice, gated by the first pass's block states")
register("kolibri1.1", "moe", decoder("Kolibri1_1Config", "Kolibri1_1ForCausalLM", **{**GQA, "num_hidden_layers": 3},
                                       head_dim=16, sliding_window=3, index_layers=[1], kv_source_layers=[0, 1, 1],
                                       layer_types=["sliding_attention", "indexed_attention", "indexed_attention"],
                                       mlp_only_layers=[0], mlp_only_intermediate_size=64, num_experts=4,
                                       num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                       index_num_heads=2, index_topk=2, index_pool_size=4, index_compression=2,
                                       index_num_local_tokens=2, index_num_sink_tokens=1, lora_cfg=ATTN_LORA),
         "sparse attention whose indexer pools blocks of keys, then keeps each query's best, its sinks and its local "
         "keys (transformers loops over rows and groups of queries); NVFP4 keys and values (8-bit float scales); "
         "layers reading an earlier layer's keys and values")
register("mimo-v2-flash", "moe", decoder("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", **GQA, head_dim=12,
                                         v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16, sliding_window=3,
                                         layer_types=["sliding_attention", "full_attention"], lora_cfg=ATTN_LORA),
         "values narrower than keys, windowed layers with sinks and twice the heads, experts")
register("gemma4", "decoder", decoder("Gemma4TextConfig", "Gemma4ForCausalLM", **{**GQA, "num_hidden_layers": 4},
                                      head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                                      attention_k_eq_v=True, vocab_size_per_layer_input=VOCAB,
                                      hidden_size_per_layer_input=8, sliding_window=3,
                                      layer_types=["sliding_attention", "full_attention"] * 2),
         "full attention layers with wider, fewer heads (keys as values), per-layer inputs, windows")
register("nemotron-h", "hybrid", decoder("NemotronHConfig", "NemotronHForCausalLM", vocab_size=VOCAB, hidden_size=32,
                                         intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=MAX_POS, mamba_num_heads=4, mamba_head_dim=16,
                                         ssm_state_size=8, chunk_size=3, hybrid_override_pattern="M*-", n_groups=1,
                                         lora_cfg=ATTN_LORA), "Mamba-2, attention and MLP blocks by pattern")
register("jetmoe", "moe", decoder("JetMoeConfig", "JetMoeForCausalLM", **{**GQA, "num_attention_heads": 4},
                                  kv_channels=8, num_local_experts=4, num_experts_per_tok=2,
                                  lora_cfg={"target_modules": ["layer"]}),
         "experts of tokens sorted by expert and split by counts read into Python (tolist), for the MLP and attention")
register("qwen3-moe", "moe", decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=8, num_experts=4,
                                     num_experts_per_tok=2, moe_intermediate_size=16, **GQA),
         "experts as fused 3-d parameters (torch.onnx cannot convert transformers' grouped_mm)")

def encoder(config_cls: str, model_cls: str, *, types: bool = False, lora_cfg: dict | None = None,
            **cfg: Any) -> Callable[[], Built]:
    def build() -> Built:
        return token_case(lora(hf(config_cls, model_cls, **cfg), **(lora_cfg or {})), types=types, dim_max=BOUNDED)
    return build


register("bert", "encoder", encoder("BertConfig", "BertModel", types=True, **SMALL),
         "segments, pooler (two outputs)", quick=True)
register("roberta", "encoder", encoder("RobertaConfig", "RobertaModel", pad_token_id=1,
                                       **{**SMALL, "max_position_embeddings": MAX_POS + 2}),
         "positions from the ids")
register("distilbert", "encoder", encoder("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=32, n_layers=2,
                                          n_heads=4, hidden_dim=64, max_position_embeddings=MAX_POS))
register("xlnet", "encoder", encoder("XLNetConfig", "XLNetLMHeadModel", vocab_size=VOCAB, d_model=32, n_layer=2,
                                     n_head=4, d_inner=64, use_mems_eval=False),
         "relative positions counted down past zero, arange(klen, -qlen, -1.0) (torch.onnx fails)")
register("deberta", "encoder", encoder("DebertaConfig", "DebertaModel", relative_attention=True,
                                       pos_att_type=["c2p", "p2c"], max_relative_positions=-1,
                                       position_biased_input=False, **SMALL),
         "disentangled attention over relative embeddings cut by torch.tensor(min(seq, max)) read back as numbers")
register("deberta-v2", "encoder", encoder("DebertaV2Config", "DebertaV2Model", relative_attention=True,
                                          position_buckets=16, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                                          **SMALL), "disentangled relative attention")
register("albert", "encoder", encoder("AlbertConfig", "AlbertModel", types=True, embedding_size=16, **SMALL),
         "shared layers, factorised embeddings")
register("electra", "encoder", encoder("ElectraConfig", "ElectraModel", types=True, embedding_size=16, **SMALL))
register("mobilebert", "encoder", encoder("MobileBertConfig", "MobileBertModel", types=True, embedding_size=16,
                                          intra_bottleneck_size=16, num_feedforward_networks=2, **SMALL),
         "trigram embedding (x[:, 1:] of the tokens), bottlenecks")
register("flaubert", "encoder", encoder("FlaubertConfig", "FlaubertModel", vocab_size=VOCAB, emb_dim=32, n_layers=2,
                                        n_heads=4, max_position_embeddings=MAX_POS, pad_index=0),
         "lengths from the ids, checked with .item() for an assertion alone")
register("clip-text", "encoder", encoder("CLIPTextConfig", "CLIPTextModel", bos_token_id=0, eos_token_id=2, **SMALL),
         "causal mask, pooled at argmax id")

register("xlm-roberta", "encoder", encoder("XLMRobertaConfig", "XLMRobertaModel", pad_token_id=1,
                                           **{**SMALL, "max_position_embeddings": MAX_POS + 2}))
register("xmod", "encoder", encoder("XmodConfig", "XmodModel", pad_token_id=1, languages=("en_XX", "de_DE"),
                                   default_language="de_DE", **{**SMALL, "max_position_embeddings": MAX_POS + 2},
                                   lora_cfg={"target_modules": ["query", "value", "dense1", "dense2"]}),
         "a per-language adapter per layer, its rows taken by a bool mask (run densely)")
register("fnet", "encoder", lambda: token_case(lora(hf("FNetConfig", "FNetModel", **{
    k: v for k, v in SMALL.items() if k != "num_attention_heads"}, pad_token_id=0), target_modules=["dense"]),
    mask=False, dim_max=BOUNDED), "token mixing by a 2-D FFT (fftn over tokens and features, real part)")
register("funnel", "encoder", encoder("FunnelConfig", "FunnelModel", vocab_size=VOCAB, block_sizes=[1, 1], d_model=32,
                                      n_head=4, d_head=8, d_inner=64, num_decoder_layers=1,
                                      max_position_embeddings=MAX_POS, attention_type="factorized",
                                      lora_cfg={"target_modules": ["q_head", "v_head"]}),
         "the sequence pooled between blocks (ceil-mode average, x[:-1:2] of seq + 1 positions), upsampled back")
register("longformer", "encoder", encoder("LongformerConfig", "LongformerForSequenceClassification", pad_token_id=1,
                                          attention_window=4, num_labels=3,
                                          **{**SMALL, "max_position_embeddings": MAX_POS + 2}),
         "a sliding window of 4 tokens and its first token global: one masked attention for any length "
         "(torch.onnx fails)")
register("mpnet", "encoder", encoder("MPNetConfig", "MPNetModel", pad_token_id=1,
                                     **{**SMALL, "max_position_embeddings": MAX_POS + 2}),
         "relative position buckets shared by the layers")
register("modernbert", "encoder", encoder("ModernBertConfig", "ModernBertModel", pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2, cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2,
                                          local_attention=4, **SMALL), "rotary, local (sliding) and global layers")
register("esm", "encoder", encoder("EsmConfig", "EsmModel", pad_token_id=1, mask_token_id=2,
                                   position_embedding_type="rotary", **SMALL), "protein LM, rotary")

def seq2seq(config_cls: str, model_cls: str, **cfg: Any) -> Callable[[], Built]:
    def build() -> Built:
        return token_case(lora(hf(config_cls, model_cls, use_cache=False, **cfg)), decoder=True, dim_max=None)
    return build


register("t5", "encoder-decoder", seq2seq("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8,
                                          d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
         "relative position buckets")
register("bart", "encoder-decoder", seq2seq("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                                            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                            max_position_embeddings=MAX_POS), "learned positions", quick=True)
register("switch-transformers", "encoder-decoder",
         seq2seq("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                 d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4, expert_capacity=4,
                 encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=0),
         "every layer a mixture of experts with a capacity (tokens over it dropped); its loop over the experts hit runs "
         "densely while tracing; torch.onnx fails on the router's Module.to and that loop")
register("nllb-moe", "encoder-decoder",
         seq2seq("NllbMoeConfig", "NllbMoeForConditionalGeneration", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                 decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, max_position_embeddings=MAX_POS, num_experts=4, expert_capacity=4,
                 encoder_sparse_step=2, decoder_sparse_step=2),
         "top-2 routing into experts in every second layer, a capacity of ceil(fraction * tokens); its loop over the "
         "experts hit runs densely while tracing; torch.onnx fails on the router's Module.to and that loop")
register("bart-qa", "encoder-decoder", encoder("BartConfig", "BartForQuestionAnswering", vocab_size=VOCAB, d_model=32,
                                               encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                               max_position_embeddings=MAX_POS, pad_token_id=0, use_cache=False),
         "decoder ids shifted from the input ids (scatters along the sequence)")

def eos_classifier(config_cls: str, model_cls: str, **cfg: Any) -> Callable[[], Built]:
    """A sequence classifier read at each row's last end-of-sequence token (id 2): every row of the example and checks
    holds a premise/hypothesis pair's three, ``A </s></s> B </s>``."""
    def build() -> Built:
        case = token_case(lora(hf(config_cls, model_cls, use_cache=False, **cfg)), dim_max=BOUNDED)
        for x in (case.example, *case.checks):
            ids = x["input_ids"]
            ids[:, -1] = ids[:, 1] = ids[:, 2] = 2
        return case
    return build


register("bart-mnli", "encoder-decoder", eos_classifier("BartConfig", "BartForSequenceClassification", vocab_size=VOCAB,
                                                        d_model=32, encoder_layers=2, decoder_layers=2,
                                                        encoder_attention_heads=4, decoder_attention_heads=4,
                                                        encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=3,
                                                        max_position_embeddings=MAX_POS, pad_token_id=0),
         "the zero-shot classifier's form: each row's state at its last end-of-sequence token, picked by a bool mask "
         "and regrouped per row by a view")

register("longt5", "encoder-decoder", seq2seq("LongT5Config", "LongT5ForConditionalGeneration", vocab_size=VOCAB,
                                              d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                              decoder_start_token_id=0),
         "local attention in blocks (logical_and of int64 masks)")
register("pegasus-x", "encoder-decoder", seq2seq("PegasusXConfig", "PegasusXForConditionalGeneration", vocab_size=VOCAB,
                                                 d_model=32, encoder_layers=2, decoder_layers=2,
                                                 encoder_attention_heads=4, decoder_attention_heads=4,
                                                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=MAX_POS,
                                                 block_size=6, num_global_tokens=4, pad_token_id=0,
                                                 decoder_start_token_id=0),
         "staggered blocks: padded by block - seq % block")
register("prophetnet", "encoder-decoder", seq2seq("ProphetNetConfig", "ProphetNetForConditionalGeneration",
                                                  vocab_size=VOCAB, hidden_size=32, encoder_ffn_dim=64,
                                                  decoder_ffn_dim=64, num_encoder_layers=2, num_decoder_layers=2,
                                                  num_encoder_attention_heads=4, num_decoder_attention_heads=4,
                                                  max_position_embeddings=MAX_POS, relative_max_distance=16),
         "n-gram streams: (1 + ngram) * seq rows cut in seq (torch.onnx fails)")
register("mt5", "encoder-decoder", seq2seq("MT5Config", "MT5ForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                                           d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
         "gated GELU feed-forward")
register("pegasus", "encoder-decoder", seq2seq("PegasusConfig", "PegasusForConditionalGeneration", vocab_size=VOCAB,
                                               d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                               max_position_embeddings=MAX_POS, pad_token_id=0,
                                               decoder_start_token_id=0), "sinusoidal positions")
register("marian", "encoder-decoder", seq2seq("MarianConfig", "MarianMTModel", vocab_size=VOCAB, d_model=32,
                                              encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                              max_position_embeddings=MAX_POS, pad_token_id=0,
                                              decoder_start_token_id=0), "sinusoidal positions, scaled embeddings")

def _noise(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(batch: int, seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


IMAGE_DIMS = {"pixel_values": {0: "batch"}}
VIT = {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 2,
       "num_attention_heads": 4, "intermediate_size": 64}


def vision(config_cls: str, model_cls: str, lora_cfg: dict | None = None, jitter: bool = False,
           **cfg: Any) -> Callable[[], Built]:
    """An image model of ``cfg`` on 32x32 images; ``jitter``: its weights and norm statistics moved off their
    initial values (see :func:`jittered`)."""
    def build() -> Built:
        model = hf(config_cls, model_cls, **cfg)
        return batch_case(lora(jittered(model) if jitter else model, **(lora_cfg or {})), images, IMAGE_DIMS)
    return build


def jittered(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """``model`` with seeded noise on every weight and norm statistic (variances kept positive): a model whose
    initial weights make its output zero (EfficientNet's last norm starts at zero) would pass any check."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(b.abs() + 0.5 if name.endswith("running_var") else b + torch.randn(b.shape, generator=gen) * scale)
    return model


register("vit", "vision", vision("ViTConfig", "ViTForImageClassification", num_labels=5, **VIT), "patch conv, CLS head",
         quick=True)
register("convnext", "conv", vision("ConvNextConfig", "ConvNextForImageClassification", num_channels=3, num_stages=2,
                                    hidden_sizes=[8, 16], depths=[1, 1], num_labels=5),
         "depthwise 7x7 convs, LoRA on the pointwise Linears")
register("resnet", "conv", vision("ResNetConfig", "ResNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                                  depths=[1, 1], layer_type="basic", num_labels=5),
         "batch norm, max pool; LoRA on the classifier")

register("clip-vision", "vision", vision("CLIPVisionConfig", "CLIPVisionModel", **VIT), "pre-norm, class embedding")
register("siglip-vision", "vision", vision("SiglipVisionConfig", "SiglipVisionModel", **VIT),
         "attention-pooling head (torch.onnx's file is off)")
def tipsv2() -> Built:
    """TIPSv2's vision tower on 48-pixel images with a 32-pixel config: its position table resized to the 6x6
    patch grid by antialiased bilinear interpolation."""
    model = hf("Tipsv2VisionConfig", "Tipsv2VisionModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, image_size=32, patch_size=8)

    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": _noise(seed, batch, 3, 48, 48)}
    return batch_case(lora(jittered(model)), make, IMAGE_DIMS)


register("tipsv2", "vision", tipsv2, "position table resized with antialiasing")
register("dinov2", "vision", vision("Dinov2Config", "Dinov2Model", image_size=32, patch_size=8, num_channels=3,
                                    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2),
         "layer scale, interpolated positions")
register("dinov2-registers", "vision", vision("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", image_size=64,
                                              patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, mlp_ratio=2, num_register_tokens=2),
         "register tokens, a position table for 64x64 resized to 32x32 (antialiased bicubic)")
register("swin", "vision", vision("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=4, num_channels=3,
                                  embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5),
         "shifted windows, patch merging")
register("segformer", "vision", vision("SegformerConfig", "SegformerForSemanticSegmentation", num_channels=3,
                                       num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                       mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5),
         "overlapping patch convs, reduced keys, segmentation head")
register("efficientnet", "conv", vision("EfficientNetConfig", "EfficientNetForImageClassification", image_size=32,
                                        width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=5,
                                        lora_cfg={"target_modules": ["classifier", "project_conv"]}, jitter=True),
         "squeeze-excitation, depthwise convs, a ceil-mode average pool wider than its input; LoRA on 1x1 convs")
register("hgnet-v2", "conv", vision("HGNetV2Config", "HGNetV2ForImageClassification", embedding_size=16,
                                    stem_channels=[3, 8, 16], stage_in_channels=[16, 32], stage_mid_channels=[8, 16],
                                    stage_out_channels=[32, 64], stage_num_blocks=[1, 1], stage_downsample=[False, True],
                                    stage_downsample_strides=[2, 2], stage_light_block=[False, True],
                                    stage_kernel_size=[3, 5], stage_numb_of_layers=[2, 2], hidden_sizes=[32, 64],
                                    depths=[1, 1], num_labels=5, jitter=True,
                                    lora_cfg={"target_modules": r".*(stem1|aggregation\.\d)\.convolution|fc"}),
         "ceil-mode max pool in the stem, aggregated stage convs; LoRA on the convs")
register("depth-anything", "vision", vision("DepthAnythingConfig", "DepthAnythingForDepthEstimation", jitter=True,
                                            backbone_config={"model_type": "dinov2", "image_size": 32, "patch_size": 8,
                                                             "hidden_size": 32, "num_hidden_layers": 4,
                                                             "num_attention_heads": 4, "mlp_ratio": 2,
                                                             "out_features": ["stage1", "stage2", "stage3", "stage4"],
                                                             "reshape_hidden_states": False},
                                            reassemble_hidden_size=32, patch_size=8, neck_hidden_sizes=[8, 16, 32, 32],
                                            fusion_hidden_size=16, head_hidden_size=8),
         "DINOv2 features reassembled by transposed convolutions, fused upward (bilinear), a depth map")
def detector(config_cls: str, model_cls: str, backbone: dict[str, Any], **cfg: Any) -> Callable[[], Built]:
    """A detection or segmentation model of ``cfg`` on a transformers ``backbone`` config (no timm, no pretrained
    weights), on 64x64 images: at 32x32 the coarsest feature level leaves its group norms one value per group."""
    def build() -> Built:
        model = hf(config_cls, model_cls, use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
                   backbone_config=backbone, **cfg)

        def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": _noise(seed, batch, 3, 64, 64)}
        return batch_case(lora(model), make, IMAGE_DIMS)
    return build


register("deformable-detr", "vision", detector(
    "DeformableDetrConfig", "DeformableDetrModel",
    {"model_type": "resnet", "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
     "out_features": ["stage2", "stage3", "stage4"]},
    d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
    decoder_attention_heads=2, num_queries=10, encoder_n_points=2, decoder_n_points=2, num_feature_levels=3),
         "multi-scale deformable attention (grid_sample) over three ResNet levels, reference points from meshgrid")
_RT_DETR = dict(encoder_hidden_dim=32, feat_strides=[8, 16, 32], encoder_layers=1, encoder_ffn_dim=64,
                encoder_attention_heads=2, encode_proj_layers=[2], d_model=32, num_queries=30,
                decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, num_feature_levels=3, decoder_layers=2,
                decoder_attention_heads=2, num_denoising=0, disable_custom_kernels=True, decoder_n_levels=3,
                decoder_offset_scale=0.5, with_box_refine=True)
_HGNET = {"model_type": "hgnet_v2", "stem_channels": [3, 16, 16], "stage_in_channels": [16, 64, 128, 256],
          "stage_mid_channels": [16, 32, 64, 128], "stage_out_channels": [64, 128, 256, 512],
          "stage_num_blocks": [1, 1, 2, 1], "stage_downsample": [False, True, True, True],
          "stage_light_block": [False, False, True, True], "stage_kernel_size": [3, 3, 5, 5],
          "stage_numb_of_layers": [3, 3, 3, 3], "embedding_size": 10, "hidden_sizes": [64, 128, 256, 512],
          "depths": [1, 1, 2, 1], "out_features": ["stage2", "stage3", "stage4"], "use_lab": True}


def rt_detr_like(config_cls: str, model_cls: str, **cfg: Any) -> Callable[[], Built]:
    """An RT-DETR-family detector (a hybrid encoder over three backbone levels, the best ``num_queries`` of its
    scores picked by top-k, deformable attention read by ``grid_sample``) on 64x64 images, its weights jittered: at
    their initial values the score head gives every position one score, and which of the tied positions top-k picks
    is up to each runtime."""
    def build() -> Built:
        model = jittered(hf(config_cls, model_cls, **_RT_DETR, **cfg), scale=0.2)
        model.get_input_embeddings = nn.Identity  # the class raises NotImplementedError, which PEFT's check calls

        def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": _noise(seed, batch, 3, 64, 64)}
        return batch_case(lora(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]), make,
                          IMAGE_DIMS)
    return build


register("rt-detr-v2", "vision", rt_detr_like(
    "RTDetrV2Config", "RTDetrV2ForObjectDetection", decoder_n_points=4, encoder_in_channels=[20, 30, 40],
    backbone_config={"model_type": "rt_detr_resnet", "embeddings_size": 10, "hidden_sizes": [10, 20, 30, 40],
                     "depths": [1, 1, 2, 1], "out_features": ["stage2", "stage3", "stage4"]}),
         "a hybrid encoder, top-k queries, deformable attention by grid_sample; transformers' tensor checks "
         "(torch.onnx cannot convert them)")
register("d-fine", "vision", rt_detr_like(
    "DFineConfig", "DFineForObjectDetection", backbone_config=_HGNET, encoder_in_channels=[128, 256, 512],
    decoder_n_points=[3, 6, 3], eval_idx=-1, layer_scale=1, reg_max=32, reg_scale=4.0, depth_mult=0.34),
         "RT-DETR's layout with boxes as distributions over bins (a linear by a vector)")
register("mask2former", "vision", detector(
    "Mask2FormerConfig", "Mask2FormerModel",
    {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2,
     "image_size": 64, "out_features": ["stage1", "stage2", "stage3", "stage4"]},
    hidden_dim=32, mask_feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
    dim_feedforward=64, encoder_feedforward_dim=64, num_queries=8),
         "Swin features, a deformable-attention pixel decoder, masked attention by bool masks multiplied")


def videomae() -> Built:
    model = lora(hf("VideoMAEConfig", "VideoMAEForVideoClassification", image_size=32, patch_size=8, num_frames=4,
                    tubelet_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    num_labels=5))

    def videos(batch: int, seed: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(batch, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}
    return batch_case(model, videos, IMAGE_DIMS)


register("videomae", "vision", videomae, "tubelets of two frames (a 3-D convolution), fixed sinusoidal positions")
register("mobilevit", "conv", vision("MobileViTConfig", "MobileViTForImageClassification", image_size=32,
                                     hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48], num_labels=5),
         "inverted residuals with transformer blocks over unfolded patches")

def sam() -> Built:
    """SAM (a tiny config: 128-pixel images, windowed and global attention with relative positions) on images and
    two prompt points per image, LoRA on its attention projections."""
    import transformers

    torch.manual_seed(0)
    vision = transformers.SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4,
                                          image_size=128, patch_size=16, window_size=4, global_attn_indexes=(1,),
                                          num_pos_feats=8, mlp_dim=64)
    prompt = transformers.SamPromptEncoderConfig(hidden_size=16, image_size=128, patch_size=16, mask_input_channels=4)
    decoder = transformers.SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                                iou_head_hidden_dim=16)
    config = transformers.SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                                    mask_decoder_config=decoder.to_dict())
    model = lora(transformers.SamModel(config).eval(), target_modules=["qkv", "q_proj", "k_proj", "v_proj", "out_proj"])

    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, 3, 128, 128, generator=gen),
                "input_points": torch.rand(batch, 1, 2, 2, generator=gen) * 128}
    return batch_case(model, make, {"pixel_values": {0: "batch"}, "input_points": {0: "batch"}})


register("sam", "vision", sam, "windowed attention with relative positions, prompt points (cat of int and float)")


def whisper_encoder(lora_cfg: dict | None = None) -> Callable[[], Built]:
    def build() -> Built:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        torch.manual_seed(0)
        import transformers

        cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2,
                                         encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
                                         decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=16,
                                         max_target_positions=MAX_POS, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, decoder_start_token_id=1)
        model = lora(WhisperEncoder(cfg).eval(), **(lora_cfg or {}))

        def feats(batch: int, seed: int) -> dict[str, torch.Tensor]:
            return {"input_features": torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed))}
        return batch_case(model, feats, {"input_features": {0: "batch"}})
    return build


register("whisper-encoder", "speech", whisper_encoder(), "conv1d stem, fixed 32 frames", quick=True)


def speech(config_cls: str, model_cls: str, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj"),
           **cfg: Any) -> Callable[[], Built]:
    """A tiny wav2vec 2.0-style model (``config_cls``, ``model_cls``, ``cfg`` beside the sizes) on raw audio of a
    dynamic length, LoRA on its attention projections ``targets`` and feed-forward layers."""
    def build() -> Built:
        model = lora(hf(config_cls, model_cls, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=VOCAB, **cfg),
                     target_modules=[*targets, "intermediate_dense", "output_dense"])

        def audio(batch: int, seed: int) -> dict[str, torch.Tensor]:
            n = {0: 400, 1: 320, 2: 480}[seed]  # samples: the check inputs differ in length too
            return {"input_values": torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))}
        return batch_case(model, audio, {"input_values": {0: "batch", 1: "samples"}})
    return build


register("wav2vec2", "speech", speech("Wav2Vec2Config", "Wav2Vec2Model"),
         "strided conv feature extractor over a dynamic length, conv positions")
register("wavlm", "speech", speech("WavLMConfig", "WavLMForCTC"),
         "gated relative position bias (broadcast_to), CTC head (torch.onnx's file is off)")
register("sew", "speech", speech("SEWConfig", "SEWForCTC"),
         "frames pooled, upsampled and padded back by their parity (n - 2*(n//2))")
register("wav2vec2-conformer", "speech",
         speech("Wav2Vec2ConformerConfig", "Wav2Vec2ConformerForCTC", ("linear_q", "linear_k", "linear_v", "linear_out"),
                position_embeddings_type="relative", conv_depthwise_kernel_size=3),
         "relative positions: a window around the centre of a static table (start c + 1 - frames)")


# torch.nn
class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, batch first, nested tensors off) between two Linears; ``padding_mask``
    is a bool key-padding mask (True: padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding_mask))


class AttentionBlock(nn.Module):
    """Pre-norm ``nn.MultiheadAttention`` with a key-padding mask, then a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding_mask, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def sequences(width: int) -> Callable[[int, int, int], dict[str, torch.Tensor]]:
    def make(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(batch, seq, dtype=torch.bool)
        mask[0, :2] = True  # the first row left-padded by two
        return {"x": torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seed)), "padding_mask": mask}
    return make


def torch_nn(module: Callable[[], nn.Module], width: int, targets: list[str]) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(0)
        model = lora(module().eval(), target_modules=targets)
        make = sequences(width)
        return Built(model, make(*EXAMPLE, 0), {"x": dict(TOKEN_DIMS), "padding_mask": dict(TOKEN_DIMS)}, None,
                     (make(*CHECKS[0], 1), make(*CHECKS[1], 2)))
    return build


register("nn-transformer-encoder", "torch.nn", torch_nn(TorchEncoder, 16, ["embed", "linear1", "linear2", "head"]),
         "nn.TransformerEncoder, key-padding mask (eager reference without the fused fast path)")
register("nn-multihead-attention", "torch.nn", torch_nn(AttentionBlock, 16, ["attn", "fc1", "fc2"]),
         "LoRA on nn.MultiheadAttention itself", quick=True)


# PEFT variants
def llama_peft(**lora_cfg: Any) -> Callable[[], Built]:
    return decoder("LlamaConfig", "LlamaForCausalLM", lora_cfg={"target_modules": LLAMA_TARGETS, **lora_cfg}, **GQA)


register("llama-rslora", "peft", llama_peft(r=8, lora_alpha=16, use_rslora=True), "alpha / sqrt(r)")
register("llama-patterns", "peft", llama_peft(rank_pattern={"k_proj": 2, "down_proj": 6,
                                                            "model.layers.1.self_attn.q_proj": 8},
                                              alpha_pattern={"v_proj": 32, "up_proj": 2}),
         "rank_pattern / alpha_pattern: ranks 2, 4, 6, 8")
register("llama-embedding-lora", "peft", llama_peft(target_modules=["embed_tokens", "q_proj", "v_proj"]),
         "LoRA on the token embedding")


def llama_two_adapters(mode: str) -> Callable[[], Built]:
    def build() -> Built:
        import peft

        built = decoder("LlamaConfig", "LlamaForCausalLM", lora_cfg={"target_modules": ["q_proj", "v_proj", "o_proj"]},
                        **GQA)()
        pm = built.model
        torch.manual_seed(2)
        pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "down_proj"]))
        if mode == "both":  # both adapters active: each site sums its adapters
            pm.base_model.set_adapter(["default", "second"])
        elif mode == "second":
            pm.set_adapter("second")
        else:  # a weighted combination, as a new adapter
            pm.add_weighted_adapter(["default", "second"], [0.7, 0.5], "combo", combination_type="cat")
            pm.set_adapter("combo")
        built.model = pm.eval()
        return built
    return build


register("llama-two-adapters", "peft", llama_two_adapters("both"), "two adapters active at once", quick=True)
register("llama-set-adapter", "peft", llama_two_adapters("second"), "add_adapter + set_adapter (the second)")
register("llama-weighted-adapter", "peft", llama_two_adapters("combo"), "add_weighted_adapter (cat) of two")


def bert_modules_to_save() -> Built:
    model = hf("BertConfig", "BertForSequenceClassification", num_labels=3, **SMALL)
    pm = lora(model, target_modules=["query", "value"], modules_to_save=["classifier"])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the saved copy of the head differs from the original one
        for m in pm.modules():
            if hasattr(m, "modules_to_save") and isinstance(m.modules_to_save, nn.ModuleDict):
                for p in m.modules_to_save.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return token_case(pm, types=True, dim_max=BOUNDED)


register("bert-modules-to-save", "peft", bert_modules_to_save, "sequence classification, a trained head copy")


def llama_dora() -> Built:
    built = llama_peft(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # magnitudes that are not the weight norms
        for m in built.model.modules():
            for vec in getattr(m, "lora_magnitude_vector", {}).values():
                vec.weight.mul_(1.0 + 0.5 * torch.rand(vec.weight.shape, generator=gen))
    return built


register("llama-dora", "peft", llama_dora, "use_dora, magnitudes off the weight norms")


def llama_tuner(config_cls: str, **cfg: Any) -> Callable[[], Built]:
    """The Llama with a PEFT tuner other than LoRA (``peft.<config_cls>(**cfg)``) on q/v/down, every trainable
    weight random (the tuners that start as the identity change nothing otherwise)."""
    def build() -> Built:
        import peft

        model = hf("LlamaConfig", "LlamaForCausalLM", use_cache=False, **GQA)
        torch.manual_seed(1)
        model = peft.get_peft_model(model, getattr(peft, config_cls)(target_modules=["q_proj", "v_proj", "down_proj"],
                                                                     init_weights=False, **cfg)).eval()
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and not p.any():
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        return token_case(model)
    return build


def llama_adalora() -> Built:
    """The Llama with an AdaLoRA adapter on q/v/down (``x (A * E)^T B^T * alpha / (ranknum + 1e-5)``), ``A``, ``E`` and
    ``B`` random (AdaLoRA starts ``E`` at zero)."""
    import peft

    model = hf("LlamaConfig", "LlamaForCausalLM", use_cache=False, **GQA)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, total_step=10,
                                                          target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((0.5 if ".lora_E." in name else 0.2) * torch.randn(p.shape, generator=gen))
    return token_case(model)


register("llama-adalora", "peft", llama_adalora, "AdaLoRA (singular values E between A and B)")
register("llama-hra", "peft", llama_tuner("HRAConfig", r=4), "HRA (Householder reflections), captured merged")
register("llama-shira", "peft", llama_tuner("ShiraConfig", r=4), "SHiRA (a sparse high-rank adapter), captured merged")
register("llama-boft", "peft", llama_tuner("BOFTConfig", boft_block_size=4),
         "BOFT (butterfly orthogonal factors, a linear solve), captured merged")
register("llama-c3a", "peft", llama_tuner("C3AConfig", block_size=8),
         "C3A (circular convolutions as complex FFTs), captured merged")
register("resnet-conv2d-lora", "peft", vision("ResNetConfig", "ResNetForImageClassification", embedding_size=8,
                                              hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5,
                                              lora_cfg={"target_modules": ["convolution"], "r": 2, "lora_alpha": 4}),
         "LoRA on every Conv2d (stem 7x7/2, 3x3, 1x1 shortcut)", quick=True)


class TemporalConvNet(nn.Module):
    """Two ``nn.Conv1d`` (kernels 3 and 5, stride 1, same padding) over a dynamic length, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(16, 16, 5, padding=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(x.transpose(1, 2)))))
        return self.head(h.transpose(1, 2))


def conv1d_lora() -> Built:
    torch.manual_seed(0)
    model = lora(TemporalConvNet().eval(), target_modules=["conv1", "conv2", "head"], r=2, lora_alpha=4)

    def make(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(batch, seq, 8, generator=torch.Generator().manual_seed(seed))}
    return Built(model, make(*EXAMPLE, 0), {"x": dict(TOKEN_DIMS)}, None, (make(*CHECKS[0], 1), make(*CHECKS[1], 2)))


register("tcn-conv1d-lora", "peft", conv1d_lora, "LoRA on two Conv1d over a dynamic length")
register("llama-lora-bias", "peft", llama_peft(lora_bias=True, target_modules=["q_proj", "v_proj", "down_proj"]),
         "lora_bias: a bias on each B")


# --------------------------------------------------------------------------------------------- diffusion models
DIFFUSION_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the modules diffusers' own LoRA training targets


def sd_unet() -> Built:
    """A Stable Diffusion UNet (``UNet2DConditionModel``: ResNet blocks, self- and cross-attention over text, a
    timestep embedding), LoRA on the attention projections and on the ResNet blocks' convolutions (LoCon)."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8)
    model = lora(jittered(unet.eval()), target_modules=[*DIFFUSION_ATTENTION, "conv1", "conv2"])

    def make(batch: int, text: int, seed: int) -> dict[str, torch.Tensor]:
        return {"sample": _noise(seed, batch, 4, 8, 8), "timestep": torch.full((batch,), 10.0 + 97 * seed),
                "encoder_hidden_states": _noise(seed + 9, batch, text, 24)}
    dims = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "text"}}
    return Built(model, make(2, 6, 0), dims, None, (make(1, 5, 1), make(3, 11, 2)))


def flux() -> Built:
    """A Flux transformer (``FluxTransformer2DModel``: joint text-image blocks whose tokens are concatenated and
    split back, single-stream blocks, 3-axis rotary positions), LoRA on every Linear, text of any length."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                             pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])
    model = lora(jittered(model.eval()))
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)

    def make(batch: int, text: int, seed: int) -> dict[str, torch.Tensor]:
        return {"hidden_states": _noise(seed, batch, 16, 8), "encoder_hidden_states": _noise(seed + 1, batch, text, 24),
                "pooled_projections": _noise(seed + 2, batch, 16), "timestep": torch.full((batch,), 0.5 + seed / 10),
                "img_ids": grid.reshape(-1, 3), "txt_ids": torch.zeros(text, 3)}
    dims = {"hidden_states": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "text"},
            "pooled_projections": {0: "batch"}, "timestep": {0: "batch"}, "txt_ids": {0: "text"}}
    return Built(model, make(2, 6, 0), dims, None, (make(1, 5, 1), make(3, 11, 2)))


def video_vae() -> Built:
    """LTX-Video's VAE (``AutoencoderKLLTXVideo``, encoded and decoded): causal 3-D convolutions (the first frame
    repeated before the clip, kernel 3 over overlapping frames), strided 3-D downsampling; LoRA on every
    ``Conv3d`` (each causal convolution's inner one)."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    convs = [n for n, m in vae.named_modules() if type(m) is nn.Conv3d]
    model = lora(jittered(vae.eval()), target_modules=convs, r=2, lora_alpha=4)

    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        return {"sample": _noise(seed, batch, 3, 9, 16, 16)}
    return batch_case(model, make, {"sample": {0: "batch"}})


register("sd-unet", "diffusion", sd_unet, "UNet with cross-attention; output 'sample' named as an input; LoCon",
         quick=True)
register("flux", "diffusion", flux, "joint text-image tokens cat and split by [text, image]")
register("ltx-video-vae", "diffusion", video_vae, "causal and strided 3-D convolutions; Conv3d LoRA")


# --------------------------------------------------------------------------------------------- measuring
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in ANSI.sub("", str(exc)).strip().splitlines()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines and lines[0] else type(exc).__name__


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), and the same of the exception that
    caused it, where there is one (torch.onnx wraps the real error in a ``ConversionError``)."""
    line, cause = first_line(exc), exc.__cause__ or exc.__context__
    inner = first_line(cause).split(": ", 1)[-1] if cause is not None and cause is not exc else ""
    return f"{line} <- {first_line(cause)}" if inner and inner not in line else line


def rel_err(got: list[np.ndarray], want: list[np.ndarray], valid: np.ndarray | None = None) -> float:
    """Largest ``max |got - want| / max |want|`` over the outputs (in order): ``inf`` when their counts or
    shapes differ, ``nan`` when a value is NaN. ``valid`` (``[batch, seq]`` booleans): compare only those
    positions of outputs whose leading dims are ``[batch, seq]`` (the others whole)."""
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            return math.inf
        if valid is not None and g.shape[:2] == valid.shape:
            g, w = g[valid], w[valid]
        if not g.size:
            continue
        err = float(np.max(np.abs(g - w))) / max(float(np.max(np.abs(w))), 1e-30)
        if err != err:
            return err
        worst = max(worst, err)
    return worst


def unpadded(x: dict[str, torch.Tensor]) -> np.ndarray | None:
    """The positions an input's padding mask keeps (``attention_mask`` 1, ``padding_mask`` False), if it has one."""
    if "attention_mask" in x:
        return x["attention_mask"].numpy() != 0
    if "padding_mask" in x:
        return ~x["padding_mask"].numpy()
    return None


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Switch off the inference fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``.

    Under ``torch.no_grad()`` in eval mode, ``nn.TransformerEncoderLayer`` runs one fused kernel that reads
    ``linear1.weight`` / ``linear2.weight`` directly: a PEFT LoRA on them is silently skipped, so "eager PEFT"
    would be the model without those adapters. The reference is the modules' own forward, which is what
    both exporters trace."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def eager(model: nn.Module, x: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The model's outputs at ``x`` (every tensor, in the captured graph's order), as numpy."""
    from flora_graph.frontend import output_tensors

    with torch.no_grad(), no_fastpath():
        return [t.detach().numpy() for t in output_tensors(model(**x))]


def is_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


@contextlib.contextmanager
def clock(into: dict[str, float], key: str) -> Iterator[None]:
    """Add the CPU seconds (``time.process_time``) and wall seconds of the block to ``into[key + "_cpu_s"]``/``_wall_s``."""
    c0, w0 = time.process_time(), time.perf_counter()
    try:
        yield
    finally:
        into[f"{key}_cpu_s"] = into.get(f"{key}_cpu_s", 0.0) + time.process_time() - c0
        into[f"{key}_wall_s"] = into.get(f"{key}_wall_s", 0.0) + time.perf_counter() - w0


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def flora_export(built: Built, names: list[str] | None, path: Path, times: dict[str, float]) -> Any:
    """capture + optimize (merged, for onnxruntime) + save_onnx, timed into ``times``; returns the captured graph."""
    from flora_graph.frontend import capture
    from flora_graph.passes import optimize
    from flora_graph.runtimes.onnx_writer import save_onnx

    with clock(times, "export"):
        with clock(times, "capture"), quiet():
            graph = capture(built.model, built.example, built.dynamic_dims, dim_max=built.dim_max, output_names=names)
        save_onnx(optimize(graph, "merged", backend="onnxruntime"), path)
    return graph


def graph_feeds(x: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A check input as the captured graph takes it: the tensors inside a dict or list input named ``input.key``,
    numbers and flags left out (the capture made them constants)."""
    from flora_graph.frontend.model_outputs import leaf_keys

    out = {}
    for name, value in x.items():
        for keys, leaf in leaf_keys(value):
            if isinstance(leaf, torch.Tensor):
                out[".".join([name, *keys])] = leaf
    return out


def flora_cells(graph: Any, built: Built, want: list[list[np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Every preset x backend of the captured ``graph`` at the check inputs: ``{"fused/onnxruntime": {"rel_err":
    [at check 0, at check 1]} or {"error": ...}}``."""
    from flora_graph.bench.latency import backend_options
    from flora_graph.passes import optimize
    from flora_graph.runtimes import compile

    cells: dict[str, dict[str, Any]] = {}
    for preset in PRESETS:
        for backend in BACKENDS:
            key = f"{preset}/{backend}"
            try:
                with quiet():
                    exe = compile(optimize(graph, preset, backend=backend), backend, **backend_options(backend, 1))
                    cells[key] = {"rel_err": [rel_err(list(exe(**graph_feeds(x)).values()), w)
                                              for x, w in zip(built.checks, want, strict=True)]}
            except Exception as exc:
                cells[key] = {"error": describe(exc)}
    return cells


def torch_onnx_export(model: nn.Module, built: Built, path: Path, times: dict[str, float]) -> str:
    """PEFT ``merge_and_unload`` (of ``model``, a copy) + ``torch.onnx.export(dynamo=True)`` + save, timed into
    ``times``; where PEFT refuses to merge (``lora_bias`` on a layer without a bias), the PEFT model itself is
    exported and only that is timed. Returns the route taken."""
    route = "plain"
    if is_peft(model):
        spare = copy.deepcopy(model)
        try:
            with clock(times, "export"), quiet():
                model, route = model.merge_and_unload(), "merged"
        except Exception as exc:
            # the adapted model PEFT wraps (PeftModel.forward takes **kwargs, which dynamic_shapes cannot name)
            model, route = spare.get_base_model(), f"unmerged (merge_and_unload: {describe(exc)})"
            times.clear()
    with clock(times, "export"), quiet():
        import torch.utils._pytree as pytree

        # torch.export wants every input named, static ones as None (a container's members each)
        dims = {n: {ax: str(d) for ax, d in built.dynamic_dims[n].items()} if n in built.dynamic_dims
                else None if isinstance(v, torch.Tensor) else pytree.tree_map(lambda _: None, v)
                for n, v in built.example.items()}
        program = torch.onnx.export(model, (), kwargs=built.example, dynamo=True, dynamic_shapes=dims, verbose=False)
        program.save(str(path))
    return route


def ort_rel_errs(path: Path, built: Built, want: list[list[np.ndarray]]) -> tuple[list[float], list[float]]:
    """The relative error of the ONNX file at ``path`` in ONNX Runtime at each check input, over every position
    and over the positions the padding mask keeps."""
    import onnxruntime as ort

    from flora_graph.bench.latency import backend_options
    from flora_graph.runtimes.onnxrt import make_session_options

    sess = ort.InferenceSession(str(path), sess_options=make_session_options(**backend_options("onnxruntime", 1)),
                                providers=["CPUExecutionProvider"])
    errs, kept = [], []
    for x, w in zip(built.checks, want, strict=True):
        missing = [i.name for i in sess.get_inputs() if i.name not in x]
        if missing:
            raise RuntimeError(f"the file declares inputs {missing} the model was not given")
        got = sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})
        errs.append(rel_err(got, w))
        kept.append(rel_err(got, w, unpadded(x)))
    return errs, kept


def adapter_effect(model: nn.Module, x: dict[str, torch.Tensor], want: list[np.ndarray]) -> float | None:
    """How far the adapters move the output: relative difference of eager with and without them."""
    if not is_peft(model):
        return None
    with model.disable_adapter():
        return rel_err(eager(model, x), want)


def run_case(case: Case, workdir: Path, *, torch_onnx: bool = True, torch_onnx_first: bool = False,
             tol: float = TOL) -> dict[str, Any]:
    """Build ``case``, export it with flora_graph (and torch.onnx), run every cell; never raises."""
    from flora_graph.frontend.model_outputs import output_names
    from flora_graph.passes import find_lora

    res: dict[str, Any] = {"case": case.name, "family": case.family, "about": case.about, "tol": tol}
    try:
        with quiet():
            built = case.build()
            want = [eager(built.model, x) for x in built.checks]
            with torch.no_grad():
                names = output_names(built.model(**built.example), built.example)
            res["adapter_effect"] = adapter_effect(built.model, built.checks[1], want[1])
    except Exception as exc:
        res["build_error"] = describe(exc)
        return res
    res["outputs"] = names
    res["shapes"] = [{k: list(v.shape) for k, v in x.items() if isinstance(v, torch.Tensor)} for x in built.checks]
    flora: dict[str, Any] = {"times": {}}
    onnx_side: dict[str, Any] = {"times": {}}
    graph = None

    def do_flora() -> None:
        nonlocal graph
        try:
            graph = flora_export(built, names, workdir / f"{case.name}.flora.onnx", flora["times"])
        except Exception as exc:
            flora["error"] = describe(exc)
            flora["times"] = {}

    def do_torch_onnx() -> None:
        model = copy.deepcopy(built.model) if is_peft(built.model) else built.model  # merge_and_unload consumes it
        try:
            onnx_side["route"] = torch_onnx_export(model, built, workdir / f"{case.name}.torch.onnx", onnx_side["times"])
        except Exception as exc:
            onnx_side["error"] = describe(exc)
            onnx_side["times"] = {}

    order = [do_torch_onnx, do_flora] if torch_onnx_first else [do_flora, do_torch_onnx]
    for step in order:
        if step is do_flora or torch_onnx:
            gc.collect()
            step()
    if graph is not None:
        flora["lora_sites"] = len(list(find_lora(graph)))
        flora["cells"] = flora_cells(graph, built, want)
    res["flora_graph"] = flora
    if torch_onnx:
        if "error" not in onnx_side:
            try:
                onnx_side["rel_err"], onnx_side["rel_err_unpadded"] = ort_rel_errs(workdir / f"{case.name}.torch.onnx", built, want)
            except Exception as exc:
                onnx_side["run_error"] = describe(exc)
        res["torch_onnx"] = onnx_side
    for p in workdir.iterdir():  # keep the temporary folder small
        p.unlink()
    return res


# --------------------------------------------------------------------------------------------- verdicts
def flora_worst(res: dict[str, Any]) -> float:
    """The worst relative error over every flora_graph cell and check (``inf`` where a cell failed)."""
    cells = res.get("flora_graph", {}).get("cells")
    if not cells:
        return math.inf
    errs = [e for c in cells.values() for e in c.get("rel_err", [math.inf])]
    return max(errs, key=lambda e: math.inf if e != e else e)


def flora_ok(res: dict[str, Any]) -> bool:
    """Captured, exported, and every preset x backend within tolerance at both checks."""
    fl = res.get("flora_graph", {})
    return "error" not in fl and flora_worst(res) <= res["tol"]


def torch_onnx_exported(res: dict[str, Any]) -> bool:
    return "torch_onnx" in res and "error" not in res["torch_onnx"]


def torch_onnx_ok(res: dict[str, Any], unpadded: bool = False) -> bool:
    """Exported, ran in ONNX Runtime at both checks within tolerance (``unpadded``: at the positions the
    padding mask keeps; a left-padded position is a query that sees no key)."""
    t = res.get("torch_onnx", {})
    errs = t.get("rel_err_unpadded" if unpadded else "rel_err")
    return torch_onnx_exported(res) and bool(errs) and max(errs) <= res["tol"]


def speedup(res: dict[str, Any]) -> float | None:
    """torch.onnx export CPU s / flora_graph export CPU s, where both exported."""
    f = res.get("flora_graph", {}).get("times", {}).get("export_cpu_s")
    t = res.get("torch_onnx", {}).get("times", {}).get("export_cpu_s")
    return t / f if f and t else None


def summarize(results: list[dict[str, Any]], tol: float) -> dict[str, Any]:
    """The counts and the three targets."""
    ran_onnx = [r for r in results if "torch_onnx" in r]
    cells = [(r["case"], k, c) for r in results for k, c in r.get("flora_graph", {}).get("cells", {}).items()]
    bad_cells = [f"{case} {k}" for case, k, c in cells
                 if "error" in c or not max(c["rel_err"], key=lambda e: math.inf if e != e else e) <= tol]
    # lenient to torch.onnx: it succeeds where it matches eager at the positions the padding mask keeps
    regress = [r["case"] for r in ran_onnx if torch_onnx_ok(r, unpadded=True) and not flora_ok(r)]
    ratios = [s for r in results if (s := speedup(r)) is not None]
    both = [r for r in results if speedup(r) is not None]
    median_ratio = statistics.median(ratios) if ratios else None
    med_flora = statistics.median(r["flora_graph"]["times"]["export_cpu_s"] for r in both) if both else None
    med_onnx = statistics.median(r["torch_onnx"]["times"]["export_cpu_s"] for r in both) if both else None
    counts = {
        "cases": len(results),
        "built": sum("build_error" not in r for r in results),
        "flora_captured": sum("flora_graph" in r and "error" not in r["flora_graph"] for r in results),
        "flora_ok": sum(flora_ok(r) for r in results),
        "flora_cells": len(cells),
        "flora_cells_within_tol": len(cells) - len(bad_cells),
        "torch_onnx_run": len(ran_onnx),
        "torch_onnx_exported": sum(torch_onnx_exported(r) for r in ran_onnx),
        "torch_onnx_ok": sum(torch_onnx_ok(r) for r in ran_onnx),
        "torch_onnx_ok_unpadded": sum(torch_onnx_ok(r, unpadded=True) for r in ran_onnx),
        "torch_onnx_ok_flora_not": len(regress),
        "flora_ok_torch_onnx_not": sum(flora_ok(r) and not torch_onnx_ok(r) for r in ran_onnx),
    }
    targets = {
        "no_case_torch_onnx_ok_flora_fails": {"met": not regress if ran_onnx else None, "cases": regress},
        "median_speedup_at_least_5x": {
            "met": median_ratio >= TARGET_SPEEDUP if median_ratio is not None else None,
            "median_speedup": median_ratio, "cases": len(ratios),
            "median_flora_cpu_s": med_flora, "median_torch_onnx_cpu_s": med_onnx},
        "every_cell_within_tol": {"met": not bad_cells and bool(cells), "tol": tol, "cells": len(cells),
                                  "outside": bad_cells},
    }
    return {"counts": counts, "targets": targets}


# --------------------------------------------------------------------------------------------- output
def fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


def fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}"


def print_report(results: list[dict[str, Any]], summary: dict[str, Any], tol: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"coverage matrix: flora_graph (fused, merged x onnxruntime, torchscript) and torch.onnx, "
                        f"relative error vs eager PEFT (tol {tol:g}), export CPU seconds (one run)")
    for col, just in (("case", "left"), ("family", "left"), ("flora", "left"), ("worst rel err", "right"),
                      ("sites", "right"), ("flora s", "right"), ("torch.onnx", "left"), ("t.onnx rel err", "right"),
                      ("torch.onnx s", "right"), ("ratio", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        fl, to = r.get("flora_graph", {}), r.get("torch_onnx")
        if "build_error" in r:
            table.add_row(r["case"], r["family"], "[red]build fails", *["-"] * 7)
            continue
        if "error" in fl:
            fstat = "[red]FAIL capture/export"
        elif flora_ok(r):
            fstat = "[green]ok"
        else:
            bad = sum("error" in c or not max(c["rel_err"]) <= tol for c in fl.get("cells", {}).values())
            fstat = f"[red]FAIL {bad}/{len(fl.get('cells', {}))} cells"
        if to is None:
            tstat, terr = "not run", None
        elif "error" in to:
            tstat, terr = "[red]FAIL export", None
        elif "run_error" in to:
            tstat, terr = "[red]FAIL ORT run", None
        else:
            terr = max(to["rel_err"])
            tstat = "[green]ok" if terr <= tol else (
                "[yellow]pads differ" if torch_onnx_ok(r, unpadded=True) else "[red]FAIL parity")
        s = speedup(r)
        table.add_row(r["case"], r["family"], fstat, fmt_err(flora_worst(r) if "cells" in fl else None),
                      str(fl.get("lora_sites", "-")), fmt_s(fl.get("times", {}).get("export_cpu_s")), tstat,
                      fmt_err(terr), fmt_s((to or {}).get("times", {}).get("export_cpu_s")),
                      "-" if s is None else f"{s:.1f}x")
    console.print(table)
    failures = []
    for r in results:
        if "build_error" in r:
            failures.append(f"{r['case']}: build: {r['build_error']}")
        fl = r.get("flora_graph", {})
        if "error" in fl:
            failures.append(f"{r['case']}: flora_graph export: {fl['error']}")
        for k, c in fl.get("cells", {}).items():
            if "error" in c:
                failures.append(f"{r['case']}: flora_graph {k}: {c['error']}")
            elif not max(c["rel_err"]) <= tol:
                failures.append(f"{r['case']}: flora_graph {k}: rel err {[f'{e:.1e}' for e in c['rel_err']]}")
        to = r.get("torch_onnx", {})
        for key in ("error", "run_error"):
            if key in to:
                failures.append(f"{r['case']}: torch.onnx {'export' if key == 'error' else 'ORT run'}: {to[key]}")
        if to.get("rel_err") and not max(to["rel_err"]) <= tol:
            failures.append(f"{r['case']}: torch.onnx: rel err {[f'{e:.1e}' for e in to['rel_err']]}, at the "
                            f"unpadded positions {[f'{e:.1e}' for e in to['rel_err_unpadded']]}")
    if failures:
        console.print("\nfailures (type: first line):", markup=False)
        for line in failures:
            console.print(f"  {line}", markup=False, soft_wrap=True)
    c, t = summary["counts"], summary["targets"]
    print(f"\ncounts: {c['cases']} cases, {c['built']} built; flora_graph: {c['flora_captured']} captured+exported, "
          f"{c['flora_ok']} all cells within {tol:g} ({c['flora_cells_within_tol']}/{c['flora_cells']} cells); "
          + (f"torch.onnx: {c['torch_onnx_exported']}/{c['torch_onnx_run']} exported, {c['torch_onnx_ok']} within "
             f"{tol:g} ({c['torch_onnx_ok_unpadded']} at the unpadded positions); torch.onnx ok (unpadded) where "
             f"flora_graph is not: {c['torch_onnx_ok_flora_not']}, flora_graph ok where torch.onnx is not: "
             f"{c['flora_ok_torch_onnx_not']}" if c["torch_onnx_run"] else "torch.onnx: not run"))

    def verdict(met: bool | None) -> str:
        return "not measured" if met is None else ("MET" if met else "NOT MET")

    t1, t2, t3 = (t["no_case_torch_onnx_ok_flora_fails"], t["median_speedup_at_least_5x"], t["every_cell_within_tol"])
    print(f"target 1, no case where torch.onnx succeeds (within {tol:g} at the unpadded positions) and flora_graph "
          f"fails: {verdict(t1['met'])}"
          + (f" ({', '.join(t1['cases'])})" if t1["cases"] else ""))
    if t2["median_speedup"] is not None:
        print(f"target 2, median export speed-up >= {TARGET_SPEEDUP:g}x (torch.onnx CPU s / flora_graph CPU s): "
              f"{verdict(t2['met'])}: median {t2['median_speedup']:.2f}x over {t2['cases']} cases (median CPU s: "
              f"flora_graph {t2['median_flora_cpu_s']:.2f}, torch.onnx {t2['median_torch_onnx_cpu_s']:.2f})")
    else:
        print(f"target 2, median export speed-up >= {TARGET_SPEEDUP:g}x: not measured")
    print(f"target 3, every preset x backend within {tol:g} relative of eager PEFT: {verdict(t3['met'])}: "
          f"{t3['cells'] - len(t3['outside'])}/{t3['cells']} cells"
          + (f" (outside: {', '.join(t3['outside'])})" if t3["outside"] else ""))


def jsonable(v: Any) -> Any:
    """``v`` with non-finite floats as strings (``"inf"``, ``"nan"``), so the JSON is standard."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


def warm_up(workdir: Path, torch_onnx: bool) -> None:
    """One untimed export of a small PEFT MLP by each exporter (first-call costs: imports, registries)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    built = Built(lora(mlp, target_modules=["0", "2"]), {"input": torch.randn(2, 8)}, {"input": {0: "batch"}}, None,
                  ({"input": torch.randn(1, 8)}, {"input": torch.randn(3, 8)}))
    with quiet():
        flora_export(built, None, workdir / "warm.flora.onnx", {})
        if torch_onnx:
            with contextlib.suppress(Exception):
                torch_onnx_export(copy.deepcopy(built.model), built, workdir / "warm.torch.onnx", {})
    for p in workdir.iterdir():
        p.unlink()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), metavar="NAME",
                    help=f"cases to run (default %(default)s: all {len(CASES)}, in this order): {', '.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help=f"only the representative subset: {', '.join(QUICK)}")
    ap.add_argument("--no-torch-onnx", action="store_true", help="flora_graph side only (no torch.onnx export)")
    ap.add_argument("--tol", type=float, default=TOL, help="relative tolerance against eager PEFT")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (ORT always runs one intra-op thread)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/coverage.json with every result")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.cases or (QUICK if args.quick else list(CASES))
    torch_onnx = not args.no_torch_onnx
    results = []
    with tempfile.TemporaryDirectory(prefix="coverage_") as tmp:
        workdir = Path(tmp)
        warm_up(workdir, torch_onnx)
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            r = run_case(CASES[name], workdir, torch_onnx=torch_onnx, torch_onnx_first=i % 2 == 1, tol=args.tol)
            results.append(r)
            fl = r.get("flora_graph", {})
            state = "build fails" if "build_error" in r else ("flora ok" if flora_ok(r) else "flora FAIL")
            if torch_onnx and "build_error" not in r:
                state += ", torch.onnx " + ("ok" if torch_onnx_ok(r) else
                                            "ok at unpadded positions" if torch_onnx_ok(r, unpadded=True) else "FAIL")
            print(f"[{i + 1}/{len(names)}] {name}: {state} ({time.perf_counter() - t0:.1f} s, flora export "
                  f"{fmt_s(fl.get('times', {}).get('export_cpu_s'))} CPU s)", file=sys.stderr, flush=True)
    summary = summarize(results, args.tol)
    print_report(results, summary, args.tol)
    import onnxruntime as ort
    import peft
    import transformers

    meta = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "onnxruntime": ort.__version__, "threads": args.threads, "argv": sys.argv[1:] if argv is None else argv}
    record = {"meta": meta, **summary, "results": results}
    if args.out:
        from flora_graph.storage import atomic_write_bytes

        atomic_write_bytes(args.out / "coverage.json", json.dumps(jsonable(record), indent=1).encode(), what="report")
        print(f"wrote {args.out / 'coverage.json'}")
    return record


if __name__ == "__main__":
    main()
