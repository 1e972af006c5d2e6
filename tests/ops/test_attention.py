"""The attention family (:mod:`flora_graph.ops.attention`): ``ScaledDotProductAttention``, ``RotaryEmbedding``.

Numpy reference against ``F.scaled_dot_product_attention`` (in float64) and Hugging Face's
``apply_rotary_pos_emb`` (``rotate_half``), then every backend against the reference; see
:mod:`tests.ops.harness`. Grouped-query attention broadcasts ``[b, kv, 1, T, d]`` keys over
``[b, kv, g, s, d]`` queries (what the ``share-kv-heads`` pass writes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from flora_graph.ir import Op

from .harness import Case, In, family_tests, op

QKV = {"q": In(("batch", 2, "seq", 4)), "k": In(("batch", 2, "kv", 4)), "v": In(("batch", 2, "kv", 5))}
SELF = {"q": In(("batch", 2, "seq", 4)), "k": In(("batch", 2, "seq", 4)), "v": In(("batch", 2, "seq", 5))}


def _sdpa_ref(**kw: Any) -> Callable[..., torch.Tensor]:
    return lambda q, k, v, *m: F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=m[0].double() if m and m[0].is_floating_point() else (m[0] if m else None), **kw
    ).float()

def _rotary_ref(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Hugging Face Llama: ``x * cos + rotate_half(x) * sin`` with ``cos = cat(c, c)``."""
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = torch.cat([c, c], -1).double(), torch.cat([s, s], -1).double()
    return (x.double() * cos + rotate_half(x.double()) * sin).float()


ROTARY = {"x": In(("batch", 3, "seq", 8)), "c": In(("batch", 1, "seq", 4)), "s": In(("batch", 1, "seq", 4))}


def _grouped_ref(q, k, v, m):
    """Attention of 4 query heads on 2 key/value heads repeated (repeat_kv), then regrouped."""
    b, s = q.shape[0], q.shape[3]
    wide = [t.expand(-1, -1, 2, -1, -1).reshape(t.shape[0], 4, t.shape[3], t.shape[4]) for t in (k, v)]
    out = F.scaled_dot_product_attention(q.reshape(b, 4, s, 4).double(), wide[0].double(), wide[1].double(),
                                         attn_mask=m[:, 0])
    return out.float().reshape(b, 2, 2, s, 5)


CASES = [
    Case("sdpa_plain", QKV, op(Op.SDPA, "q", "k", "v"), _sdpa_ref()),
    Case("sdpa_scale", QKV, op(Op.SDPA, "q", "k", "v", scale=0.3), _sdpa_ref(scale=0.3)),
    Case("sdpa_causal", SELF, op(Op.SDPA, "q", "k", "v", is_causal=1), _sdpa_ref(is_causal=True)),
    Case("sdpa_causal_cross_lengths", QKV, op(Op.SDPA, "q", "k", "v", is_causal=1), _sdpa_ref(is_causal=True)),
    Case("sdpa_bool_mask", {**QKV, "m": In(("batch", 1, "seq", "kv"), "bool", "bool")}, op(Op.SDPA, "q", "k", "v", "m"),
         _sdpa_ref()),
    Case("sdpa_float_mask", {**QKV, "m": In(("seq", "kv"))}, op(Op.SDPA, "q", "k", "v", "m"), _sdpa_ref()),
    Case("sdpa_3d", {"q": In(("batch", "seq", 4)), "k": In(("batch", "kv", 4)), "v": In(("batch", "kv", 4))},
         op(Op.SDPA, "q", "k", "v"), _sdpa_ref()),
    Case("sdpa_grouped_heads_broadcast",
         {"q": In(("batch", 2, 2, "seq", 4)), "k": In(("batch", 2, 1, "kv", 4)), "v": In(("batch", 2, 1, "kv", 5)),
          "m": In(("batch", 1, 1, "seq", "kv"), "bool", "bool")},
         op(Op.SDPA, "q", "k", "v", "m"), _grouped_ref),
    # ------------------------------------------------------------------ RotaryEmbedding
    Case("rotary", ROTARY, op(Op.ROTARY_EMBEDDING, "x", "c", "s"), _rotary_ref),
    Case("rotary_shared_positions", {**ROTARY, "c": In(("seq", 4)), "s": In(("seq", 4))},
         op(Op.ROTARY_EMBEDDING, "x", "c", "s"), _rotary_ref),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
