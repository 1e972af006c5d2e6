"""A small byte-level Llama-style decoder, built in the package (no download).

Token embedding, pre-norm blocks of RMSNorm, grouped-query causal self-attention with
rotary position embeddings, and a SwiGLU MLP, then a final RMSNorm and an ``lm_head``
(tied to the embedding or not). The code follows Hugging Face's Llama: RMSNorm computed
from primitives (``pow``, ``mean``, ``rsqrt``), ``repeat_kv`` by ``expand`` + ``reshape``,
cos/sin computed from ``positions = arange(seq)`` on every call, attention through
``F.scaled_dot_product_attention(is_causal=True)``. The projections are named ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` so that
:func:`~flora_graph.adapters.apply_lora` targets them as it would a real Llama.

``capture(model, {"input_ids": ids}, {"input_ids": {0: "batch", 1: "seq"}})`` keeps batch
and sequence length dynamic. Tokens are bytes shifted by three (:func:`byte_tokenize`):
0 is padding, 1 begin-of-text, 2 end-of-text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.adapters import apply_lora
from flora_graph.models.seeding import seed_lora_b

__all__ = [
    "BOS",
    "DECODER_PROJECTIONS",
    "EOS",
    "PAD",
    "Decoder",
    "DecoderConfig",
    "build_decoder",
    "byte_tokenize",
]

PAD, BOS, EOS = 0, 1, 2
_BYTE_OFFSET = 3
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a :class:`Decoder`; ``hidden`` must divide by ``heads`` and ``heads`` by ``kv_heads``."""

    vocab_size: int = 259  # 256 bytes + PAD, BOS, EOS
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 172
    max_seq: int = 256  # longest sequence the eager model accepts (capture leaves seq unbounded)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads} do not divide evenly")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dim, written as Llama writes it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class Rotary(nn.Module):
    """cos/sin of ``positions * inv_freq`` for ``positions = arange(seq)``, each ``[seq, head_dim]``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, kv_heads, s, d]`` -> ``[b, kv_heads * n_rep, s, d]``, each head repeated (Llama's ``repeat_kv``)."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        n_rep = cfg.heads // cfg.kv_heads
        o = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, cfg.heads * cfg.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """``input_ids [batch, seq]`` (int64) -> ``logits [batch, seq, vocab_size]``."""

    def __init__(self, cfg: DecoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or DecoderConfig()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and input_ids.shape[-1] > self.config.max_seq:
            raise ValueError(f"sequence of {input_ids.shape[-1]} tokens is longer than max_seq={self.config.max_seq}")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def _init_weights(model: Decoder, std: float) -> None:
    """Seeded normal weights; RMSNorm weights near one (not exactly one, so a dropped scale shows)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.copy_(1.0 + std * torch.randn_like(m.weight))


def build_decoder(config: DecoderConfig | None = None, lora_rank: int | None = None, seed: int = 0) -> Decoder:
    """A seeded :class:`Decoder` in eval mode; with ``lora_rank``, LoRA on all seven projections with a nonzero ``B``."""
    torch.manual_seed(seed)
    model = Decoder(config)
    _init_weights(model, model.config.init_std)
    if lora_rank is not None:
        apply_lora(model, list(DECODER_PROJECTIONS), rank=lora_rank, alpha=2 * lora_rank)
        seed_lora_b(model, seed + 1, 0.05)
    return model.eval()


def byte_tokenize(text: str, *, bos: bool = True) -> torch.Tensor:
    """``text`` as UTF-8 byte tokens, a ``[1, n]`` int64 tensor (BOS first unless ``bos=False``)."""
    ids = ([BOS] if bos else []) + [b + _BYTE_OFFSET for b in text.encode("utf-8")]
    return torch.tensor([ids], dtype=torch.int64)
