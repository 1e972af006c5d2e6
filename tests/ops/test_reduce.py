"""The reduction family (:mod:`flora_graph.ops.reduce`): ``ReduceMean``, ``ReduceSum``, ``CumSum``.

Numpy reference against torch, then every backend against the reference; see
:mod:`tests.ops.harness`.
"""

from __future__ import annotations

from flora_graph.ir import Op

from .harness import Case, In, family_tests, op

X = In(("batch", "seq", 6))

CASES = [
    Case("reduce_mean_last_keep", {"x": X}, op(Op.REDUCE_MEAN, "x", axes=(-1,), keepdims=1),
         lambda x: x.mean(-1, keepdim=True)),
    Case("reduce_mean_two_axes", {"x": X}, op(Op.REDUCE_MEAN, "x", axes=(1, 2), keepdims=0), lambda x: x.mean((1, 2))),
    Case("reduce_sum_all", {"x": X}, op(Op.REDUCE_SUM, "x", axes=(), keepdims=0), lambda x: x.sum(), tol=1e-4),
    Case("reduce_sum_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.REDUCE_SUM, "x", axes=(0,), keepdims=1),
         lambda x: x.sum(0, keepdim=True)),
    Case("cumsum", {"x": X}, op(Op.CUMSUM, "x", axis=1), lambda x: x.cumsum(1), tol=1e-4),
    Case("cumsum_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.CUMSUM, "x", axis=-1), lambda x: x.cumsum(-1)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
