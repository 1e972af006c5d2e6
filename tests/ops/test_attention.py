"""The attention family (:mod:`flora_graph.ops.attention`): ``ScaledDotProductAttention``.

Numpy reference against ``F.scaled_dot_product_attention`` (in float64), then every backend
against the reference; see :mod:`tests.ops.harness`.
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
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
