"""Hugging Face models with PEFT LoRA, captured and compiled with every preset, against eager PEFT.

Randomly initialised Llama, GPT-2 (``Conv1D`` weights ``[in, out]``, PEFT ``fan_in_fan_out``)
and BERT (a learned position table: ``"seq"`` needs ``dim_max``) from tiny configs, no
download. Every adapter has a nonzero ``B`` (``init_lora_weights=False``) and ranks differ
per module (``rank_pattern``). Each preset on onnxruntime and torchscript must match eager
PEFT within 1e-4 (fp32) at two (batch, seq) shapes other than the example's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import peft
import pytest
import torch
import transformers
from torch import nn

from flora_graph.frontend import capture
from flora_graph.ir import Graph
from flora_graph.passes import find_lora, optimize
from flora_graph.runtimes import compile

TOL = 1e-4
VOCAB = 120
MAX_POS = 64
EXAMPLE = (2, 8)
SHAPES = ((1, 5), (3, 11))  # (batch, seq), both different from the example's
DYN = {0: "batch", 1: "seq"}


def llama_model() -> nn.Module:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads), ``use_cache=False``."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def gpt2_model() -> nn.Module:
    """A 2-layer GPT-2 (hidden 32): ``Conv1D`` projections, learned positions."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POS,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def bert_model() -> nn.Module:
    """A 2-layer BERT encoder (hidden 32) with its pooler (a second output)."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=MAX_POS)
    return transformers.BertModel(cfg)


@dataclass(frozen=True)
class Family:
    """How to build one model family with a PEFT LoRA and feed it."""

    build: Callable[[], nn.Module]
    lora: dict[str, Any]  # peft.LoraConfig arguments
    mask: bool  # feed an attention_mask (left padding in the first row)
    dim_max: dict[str, int] | None


FAMILIES: dict[str, Family] = {
    "llama": Family(llama_model, {
        "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"k_proj": 2, "down_proj": 3, "model.layers.1.self_attn.q_proj": 6},
    }, mask=True, dim_max=None),
    "gpt2": Family(gpt2_model, {
        "r": 4, "lora_alpha": 16, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_proj", "c_fc"],
        "rank_pattern": {"c_fc": 2, "attn.c_proj": 5},
    }, mask=False, dim_max={"seq": MAX_POS}),
    "bert": Family(bert_model, {
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"],
        "rank_pattern": {"key": 2, "intermediate.dense": 6}, "alpha_pattern": {"value": 2},
    }, mask=True, dim_max={"seq": MAX_POS}),
}


def peft_model(family: str, seed: int = 0) -> nn.Module:
    """The family's random model wrapped by PEFT with a nonzero-``B`` LoRA, in eval mode."""
    fam = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.1, **fam.lora)
    return peft.get_peft_model(fam.build(), cfg).eval()


def token_feeds(batch: int, seq: int, seed: int, mask: bool) -> dict[str, torch.Tensor]:
    """``input_ids`` (+ ``attention_mask`` with the first row left-padded by two)."""
    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.int64)
        m[0, :2] = 0
        out["attention_mask"] = m
    return out


class Tensor0(nn.Module):
    """A transformers model's first output (logits / last hidden state) as one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


@dataclass
class Captured:
    """A captured family, the eager model and the eager outputs at :data:`SHAPES`."""

    model: nn.Module
    graph: Graph
    feeds: list[dict[str, torch.Tensor]]
    want: list[np.ndarray]


@functools.cache  # once per test process, however xdist orders the tests
def capture_family(family: str) -> Captured:
    """Capture the family's PEFT model (BERT as the PeftModel itself, the others wrapped)."""
    fam = FAMILIES[family]
    pm = peft_model(family)
    model = pm if family == "bert" else Tensor0(pm)
    example = token_feeds(*EXAMPLE, 0, fam.mask)
    g = capture(model, example, dict.fromkeys(example, DYN), dim_max=fam.dim_max)
    feeds = [token_feeds(b, s, k + 1, fam.mask) for k, (b, s) in enumerate(SHAPES)]
    with torch.no_grad():
        want = [model(**x)[0].numpy() if family == "bert" else model(**x).numpy() for x in feeds]
    return Captured(model, g, feeds, want)


@pytest.fixture(params=sorted(FAMILIES))
def captured(request: pytest.FixtureRequest) -> tuple[str, Captured]:
    return request.param, capture_family(request.param)


def test_capture_tags_every_peft_layer_with_its_own_rank(captured: tuple[str, Captured]) -> None:
    family, c = captured
    pm = c.model if family == "bert" else c.model.model
    def plain(path: str) -> str:  # the module path inside the transformers model
        return path.split("base_model.model.")[-1]

    layers = {plain(n): m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ranks = {plain(p.module): p.rank for p in find_lora(c.graph)}
    assert ranks == {n: m.r["default"] for n, m in layers.items()}
    assert len(set(ranks.values())) >= 3  # rank_pattern gave modules different ranks
    assert c.graph.inputs[0].shape == ("batch", "seq")
    assert c.graph.dim_max == (FAMILIES[family].dim_max or {})


def test_adapters_change_the_output_well_beyond_the_tolerance(captured: tuple[str, Captured]) -> None:
    family, c = captured
    pm = c.model if family == "bert" else c.model.model
    with torch.no_grad(), pm.disable_adapter():
        base = c.model(**c.feeds[1])
    base = base[0] if family == "bert" else base
    assert np.max(np.abs(base.numpy() - c.want[1])) > 100 * TOL


@pytest.mark.parametrize("preset", ["unfused", "fused", "merged"])
@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_every_preset_matches_eager_peft(captured: tuple[str, Captured], backend: str, preset: str) -> None:
    family, c = captured
    opt = optimize(c.graph, preset, backend=backend)
    if preset == "merged":
        assert not list(find_lora(opt)), "merged still holds LoRA branches"
    exe = compile(opt, backend)
    for x, want, (b, s) in zip(c.feeds, c.want, SHAPES, strict=True):
        got = next(iter(exe(**x).values()))
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL, err_msg=f"{family} {preset}/{backend} at {(b, s)}")


def test_peft_folder_on_a_plain_hf_model_captures_to_the_same_numbers(tmp_path) -> None:
    """GPT-2's fan_in_fan_out adapter, saved by PEFT and loaded by flora_graph onto a plain model."""
    pm = peft_model("gpt2")
    pm.save_pretrained(tmp_path / "adapter")
    plain = gpt2_model()
    plain.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                           for k, v in pm.state_dict().items() if "lora_" not in k})
    from flora_graph.adapters.peft import load_peft_adapter

    load_peft_adapter(plain, tmp_path / "adapter")
    model = Tensor0(plain).eval()
    example = token_feeds(*EXAMPLE, 0, False)
    g = capture(model, example, {"input_ids": DYN}, dim_max={"seq": MAX_POS})
    x = token_feeds(3, 11, 5, False)
    with torch.no_grad():
        want = Tensor0(pm)(**x).numpy()
    got = compile(optimize(g, "fused", backend="onnxruntime"), "onnxruntime")(**x)["output"]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
