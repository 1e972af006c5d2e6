"""Hugging Face transformers models built from tiny configs (no download), captured with dynamic batch and seq.

Llama (with an attention mask holding padding, LoRA on q/v with a nonzero ``B``) runs on every
backend; GPT-2 (no mask: transformers derives packed-sequence positions with ``diff``/``cumsum``)
on the reference. Skipped where transformers is not installed.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from torch import nn

from flora_graph.adapters import adapters_of, apply_lora
from flora_graph.frontend import capture
from flora_graph.ir import Graph
from flora_graph.passes import find_lora
from flora_graph.runtimes.executable import compile

TOL = 1e-4
DYN = {0: "batch", 1: "seq"}


class Logits(nn.Module):
    """The model's logits as one tensor (capture wants tensors out)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            return self.model(input_ids=input_ids).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def feeds(b: int, s: int, seed: int, mask: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, 100, (b, s), generator=gen)}
    if mask:
        m = torch.ones(b, s, dtype=torch.int64)
        m[0, :2] = 0  # left padding in the first row
        out["attention_mask"] = m
    return out


def check(model: nn.Module, mask: bool, backends: tuple[str, ...]) -> Graph:
    g = capture(model, feeds(2, 8, 0, mask), {k: DYN for k in feeds(2, 8, 0, mask)})
    assert g.inputs[0].shape == ("batch", "seq")
    for backend in backends:
        exe = compile(g, backend)
        for k, (b, s) in enumerate(((1, 5), (3, 11))):
            x = feeds(b, s, k + 1, mask)
            with torch.no_grad():
                want = model(**x).numpy()
            np.testing.assert_allclose(exe(**x)["output"], want, atol=TOL, rtol=TOL, err_msg=f"{backend} at {(b, s)}")
    return g


def test_llama_with_attention_mask_and_lora_on_every_backend() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # use_cache: a DynamicCache
    model = Logits(transformers.LlamaForCausalLM(cfg)).eval()
    apply_lora(model, ["q_proj", "v_proj"], rank=2)
    with torch.no_grad():
        for a in adapters_of(model).values():
            a.lora_B.normal_(0, 0.1)
    g = check(model, True, ("numpy", "onnxruntime", "torchscript", "torch-export"))
    assert len(list(find_lora(g))) == 2


def test_gpt2_without_mask() -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    check(Logits(transformers.GPT2LMHeadModel(cfg)).eval(), False, ("numpy",))
