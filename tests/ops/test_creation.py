"""The creation family (:mod:`flora_graph.ops.creation`): ``Arange``.

Numpy reference against ``torch.arange``, then every backend against the reference; see
:mod:`tests.ops.harness`.
"""

from __future__ import annotations

import torch

from flora_graph.ir import Op

from .harness import Case, In, family_tests

CASES = [
    Case("arange_seq", {"x": In(("batch", "seq"))}, lambda g, x, rng: g.add(Op.ARANGE, [], {"end": "seq"}),
         lambda x: torch.arange(x.shape[1])),
    Case("arange_batch_seq_float", {"x": In(("batch", "seq"))},
         lambda g, x, rng: g.add(Op.ARANGE, [], {"end": "batch*seq", "dtype": "float32"}),
         lambda x: torch.arange(x.numel(), dtype=torch.float32)),
    Case("arange_static_step", {"x": In(("batch", "seq"))},
         lambda g, x, rng: g.add(Op.ADD, [g.add(Op.ARANGE, [], {"start": 2, "end": 11, "step": 3}), g.add(Op.ARANGE, [], {"start": 6, "end": -3, "step": -3})]),
         lambda x: torch.arange(2, 11, 3) + torch.arange(6, -3, -3)),
    Case("arange_step_divides_dim", {"x": In(("batch", "seq"))},  # embedding_bag's offsets of a 2-D input
         lambda g, x, rng: g.add(Op.ARANGE, [], {"start": "seq", "end": "4*seq+3*batch*seq", "step": 3}),
         lambda x: torch.arange(x.shape[1], 4 * x.shape[1] + x.numel() * 3, 3)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
