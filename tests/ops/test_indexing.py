"""The indexing family (:mod:`flora_graph.ops.indexing`): ``Gather``, ``GatherElements``, ``Index``.

Numpy reference against torch indexing (``t[i]``, ``torch.gather``), then every backend
against the reference; see :mod:`tests.ops.harness`.
"""

from __future__ import annotations

import numpy as np
import torch

from flora_graph.ir import Op

from .harness import Case, In, const, family_tests, op

_EMB = const(np.random.default_rng(5), 11, 6)

CASES = [
    Case("gather_embedding", {"ids": In(("batch", "seq"), "int64", "index:11")},
         lambda g, x, rng: g.add(Op.GATHER, [g.const("emb", _EMB), x["ids"]]), lambda ids: torch.from_numpy(_EMB)[ids]),
    Case("gather_axis1_2d_index", {"x": In(("batch", 5, 3))},
         lambda g, x, rng: g.add(Op.GATHER, [x["x"], g.const("i", np.array([[0, -1], [4, 2]], np.int64))], {"axis": 1}),
         lambda x: x[:, torch.tensor([[0, -1], [4, 2]])]),
    Case("gather_scalar_index", {"x": In(("batch", 5, 3))},
         lambda g, x, rng: g.add(Op.GATHER, [x["x"], g.const("i", np.array(-2, np.int64))], {"axis": 1}), lambda x: x[:, -2]),
    Case("gather_1d_index_last_axis", {"x": In(("batch", "seq", 4))},
         lambda g, x, rng: g.add(Op.GATHER, [x["x"], g.const("i", np.array([3, 0, 1], np.int32))], {"axis": -1}),
         lambda x: x[..., [3, 0, 1]]),
    Case("gather_elements", {"x": In(("batch", 5)), "i": In(("batch", 3), "int64", "index:5")}, op(Op.GATHER_ELEMENTS, "x", "i", axis=1),
         lambda x, i: torch.gather(x, 1, torch.where(i < 0, i + 5, i))),
    Case("gather_elements_dynamic_axis", {"x": In(("batch", "seq", 3)), "i": In((2, "seq", 2), "int32", "index:batch")},
         op(Op.GATHER_ELEMENTS, "x", "i", axis=0), lambda x, i: torch.gather(x, 0, torch.where(i < 0, i + x.shape[0], i).long())),
    Case("index_leading_axes", {"x": In((5, 4, "seq")), "i": In(("batch", 1), "int64", "index:5"), "j": In((1, "seq"), "int64", "index:4")},
         op(Op.INDEX, "x", "i", "j"), lambda x, i, j: x[i, j]),
    Case("index_inner_axes", {"x": In(("batch", 5, 4, 3))},
         lambda g, x, rng: g.add(Op.INDEX, [x["x"], g.const("i", np.array([[0], [-1]], np.int64)), g.const("j", np.array([3, 0, 1], np.int32))], {"axis": 1}),
         lambda x: x[:, torch.tensor([[0], [-1]]), torch.tensor([3, 0, 1])]),
    Case("index_hf_mask", {"p": In(("batch", "seq"), "int64", "small_int"), "b": In(("batch", 1, 1), "int64", "index:batch"),
                           "q": In((1, "seq", 1), "int64", "index:seq")},
         op(Op.INDEX, "p", "b", "q"), lambda p, b, q: p[b, q]),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
