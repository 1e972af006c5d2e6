"""GPTQ, AWQ and compressed-tensors checkpoints of a small Llama, written here from codes, scales and zero points
drawn at random, as AutoGPTQ / GPTQModel and AutoAWQ lay them out (each int32 eight 4-bit values, the lowest bits
first; GPTQ packs its codes along the input rows and its zero points along the columns, stored minus one in the
``gptq`` format; AWQ packs both along the columns in the order 0, 2, 4, 6, 1, 3, 5, 7) and as compressed-tensors' own
packer (``pack_to_int32``) does, with the float model of the same weights (``s * (q - z)`` per group) beside it: the
reference the tests compare against; and FP8 checkpoints (``float8_e4m3fn`` weights, a float32 scale per block, as
Qwen3's and DeepSeek-V3's ``-FP8`` checkpoints store them) with the float model of theirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from flora_graph.llm_demo import save_word_tokenizer

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pack(values: np.ndarray, axis: int, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """``values`` (4-bit, uint) eight to an int32 along ``axis``: the ``j``-th four bits hold the value at ``8c +
    order[j]``."""
    v = np.moveaxis(values.astype(np.uint32), axis, 0)
    v = v.reshape(v.shape[0] // 8, 8, *v.shape[1:])
    packed = np.zeros((v.shape[0], *v.shape[2:]), np.uint32)
    for j in range(8):
        packed |= v[:, order[j]] << np.uint32(4 * j)
    return np.ascontiguousarray(np.moveaxis(packed.view(np.int32), 0, axis))


def small_llama_config(intermediate: int = 80) -> transformers.LlamaConfig:
    """The Llama the checkpoints hold: widths that take groups of 32 input rows (``intermediate`` 80 leaves
    ``down_proj`` a last group of 16 rows)."""
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def write_checkpoint(folder: Path, method: str, *, group: int = 32, act_order: bool = False,
                     v2: bool = False, symmetric: bool = False, seed: int = 0, intermediate: int = 80,
                     model: transformers.LlamaForCausalLM | None = None) -> transformers.LlamaForCausalLM:
    """A ``method`` (``gptq``, ``awq`` or ``compressed-tensors``) checkpoint of a small Llama at ``folder`` (with a
    word tokenizer), or of ``model``'s config and float tensors (its layers' weights drawn anew); ``act_order``: the
    groups over a permutation of the input rows (``g_idx``), one per input as GPTQ orders the rows by its input's
    statistics (q/k/v share one, gate/up another); ``v2``: the ``gptq_v2`` format (zero points stored as they are);
    ``symmetric``: compressed-tensors' symmetric scheme (zero point 8, none stored); ``group`` ``-1``: one group
    per output row (compressed-tensors' ``channel`` strategy). Returns the float model of its weights, in eval
    mode."""
    torch.manual_seed(seed)
    if model is None:
        model = transformers.LlamaForCausalLM(small_llama_config(intermediate))
    cfg = model.config
    model = model.eval()
    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    orders: dict[str, np.ndarray] = {}
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] not in LAYERS:
            continue
        out, k = mod.weight.shape
        size = k if group == -1 else group
        n_groups = -(-k // size)
        groups = np.arange(k) // size
        if act_order:  # one order per input: the first layer that reads it draws it
            reads = name.rpartition(".")[0] + {"k_proj": ".q_proj", "v_proj": ".q_proj", "up_proj": ".gate_proj"}.get(
                name.rpartition(".")[2], "." + name.rpartition(".")[2])
            if reads not in orders:
                orders[reads] = rng.permutation(k)
            groups = groups[orders[reads]]
        codes = rng.integers(0, 16, (k, out))
        zeros = np.full((n_groups, out), 8) if symmetric else rng.integers(0, 16, (n_groups, out))
        scales = torch.from_numpy(rng.uniform(0.02, 0.06, (n_groups, out)))
        scales = scales.to(torch.bfloat16 if method == "compressed-tensors" else torch.float16)
        weight = scales.float().numpy()[groups] * (codes - zeros[groups]).astype(np.float32)  # [in, out]
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(weight.T.copy()))
        zpad = np.zeros((n_groups, -(-out // 8) * 8), np.int64)
        zpad[:, :out] = zeros
        if method == "compressed-tensors":  # signed codes q - 8, [out, in]; zero points likewise, [out, groups]
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            signed = lambda a: torch.from_numpy((a - 8).astype(np.int8))  # noqa: E731
            tensors[f"{name}.weight_packed"] = pack_to_int32(signed(codes.T), 4)
            if not symmetric:
                tensors[f"{name}.weight_zero_point"] = pack_to_int32(signed(zeros.T), 4, packed_dim=0)
            tensors[f"{name}.weight_scale"] = scales.T.contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor([out, k])
            if act_order:
                tensors[f"{name}.weight_g_idx"] = torch.from_numpy(groups.astype(np.int32))
            continue
        if method == "gptq":
            stored = zpad if v2 else (zpad - 1) & 0xF
            tensors[f"{name}.qweight"] = torch.from_numpy(_pack(codes, 0))
            tensors[f"{name}.qzeros"] = torch.from_numpy(_pack(stored, 1))
            tensors[f"{name}.g_idx"] = torch.from_numpy(groups.astype(np.int32))
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            tensors[f"{name}.qweight"] = torch.from_numpy(_pack(codes, 1, order))
            tensors[f"{name}.qzeros"] = torch.from_numpy(_pack(zpad, 1, order))
        tensors[f"{name}.scales"] = scales
    quantized = {n.rpartition(".")[0] for n in tensors}
    for name, p in model.state_dict().items():
        if name.rpartition(".")[0] not in quantized:
            tensors[name] = p.detach().to(torch.float16).clone()
    with torch.no_grad():  # the float model holds what the checkpoint's fp16 tensors hold
        for name, p in model.named_parameters():
            if name.rpartition(".")[0] not in quantized:
                p.copy_(p.to(torch.float16).float())
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float16"
    if method == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group,
                                         "desc_act": act_order, "sym": False, "true_sequential": True,
                                         "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    elif method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                         "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    else:
        weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "dynamic": False, "observer": "minmax",
                   "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group,
                   "actorder": "group" if act_order else None}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_word_tokenizer(folder, cfg.vocab_size)
    return model


def write_fp8_checkpoint(folder: Path, *, block: int = 32, seed: int = 0) -> transformers.LlamaForCausalLM:
    """An FP8 checkpoint (``quant_method`` ``fp8``) of a small Llama at ``folder`` (with a word tokenizer): each layer's
    weight ``float8_e4m3fn`` values drawn at random, its ``weight_scale_inv`` one float32 per ``block x block`` block
    (widths of whole blocks, as transformers dequantizes them). Returns the float model of its weights (``w *
    scale``), in eval mode."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(small_llama_config(96)).eval()
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] not in LAYERS:
            continue
        out, k = mod.weight.shape
        w8 = (torch.randn(out, k) * 64).to(torch.float8_e4m3fn)
        scale = torch.rand(-(-out // block), -(-k // block)) * 1e-3 + 2e-4
        with torch.no_grad():
            mod.weight.copy_(w8.float() * scale.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :k])
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = w8, scale
    for name, p in model.named_parameters():
        if name not in tensors:
            with torch.no_grad():  # the float model holds what the checkpoint's bfloat16 tensors hold
                p.copy_(p.to(torch.bfloat16).float())
            tensors[name] = p.detach().to(torch.bfloat16).clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**model.config.to_dict(), "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [block, block]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_word_tokenizer(folder, model.config.vocab_size)
    return model
