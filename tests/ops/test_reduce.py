"""The reduction family (:mod:`flora_graph.ops.reduce`): ``ReduceMean``, ``ReduceSum``, ``ReduceProd``,
``ReduceMax``, ``ReduceMin``, ``ReduceVar``, ``ArgMax``, ``ArgMin``, ``CumSum``, ``LinearScan``, ``ArgTopK``.

Numpy reference against torch, then every backend against the reference; see
:mod:`tests.ops.harness`. Rows on ``small_int`` floats have ties, so they check that the arg
ops return the first index, as torch does. ``torch.topk`` and an unstable ``torch.sort`` leave the
order of ties unspecified (it differs from ONNX ``TopK``'s lower index first), so their rows feed
normal floats (no ties); the rows with ties compare ``ArgTopK`` against a stable ``torch.sort``.
"""

from __future__ import annotations

import numpy as np
import torch

from flora_graph.ir import Op

from .harness import Case, In, family_tests, op

X = In(("batch", "seq", 6))
TIES = In(("batch", "seq", 6), kind="small_int")
FLAGS = In(("batch", "seq", 6), "bool", "bool")


def _flat_arg(o: Op, keep_rank: int = 0):
    """``o`` over the flattened input (``argmax()``), reshaped to ``keep_rank`` ones when asked."""

    def build(g, x, rng):
        index = g.add(o, [g.add(Op.RESHAPE, [x["x"]], {"shape": (-1,)})], {"axis": 0, "keepdims": 0})
        return g.add(Op.RESHAPE, [index], {"shape": (1,) * keep_rank}) if keep_rank else index

    return build


def _max_dim(values: Op, indices: Op, axis: int, keep: int):
    return lambda g, x, rng: {
        "values": g.add(values, [x["x"]], {"axes": (axis,), "keepdims": keep}),
        "indices": g.add(indices, [x["x"]], {"axis": axis, "keepdims": keep}),
    }


def _top_k(k, axis: int, largest: int):
    """``topk``/``sort``: the indices (``ArgTopK``) and the values gathered at them."""

    def build(g, x, rng):
        indices = g.add(Op.ARG_TOP_K, [x["x"]], {"k": k, "axis": axis, "largest": largest})
        return {"values": g.add(Op.GATHER_ELEMENTS, [x["x"], indices], {"axis": axis}), "indices": indices}

    return build


def _any_all(g, x, rng):
    """any()/any(1)/any((0, 2)) and all()/all(-1, keepdim)/all((0, 1)): a sum/product of 0/1 int64, as bool."""
    ones = g.add(Op.CAST, [x["x"]], {"to": "int64"})

    def red(o: Op, axes: tuple[int, ...], keep: int = 0):
        return g.add(Op.CAST, [g.add(o, [ones], {"axes": axes, "keepdims": keep})], {"to": "bool"})

    return {"any": red(Op.REDUCE_SUM, ()), "any_dim": red(Op.REDUCE_SUM, (1,)), "any_dims": red(Op.REDUCE_SUM, (0, 2)),
            "all": red(Op.REDUCE_PROD, ()), "all_dim": red(Op.REDUCE_PROD, (2,), 1),
            "all_dims": red(Op.REDUCE_PROD, (0, 1))}


def _torch_linear_scan(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, axis: int) -> torch.Tensor:
    """The recurrence as Mamba's reference loop writes it, one position at a time."""
    states = []
    for t in range(a.shape[axis]):
        h = a.select(axis, t) * h + b.select(axis, t)
        states.append(h)
    return torch.stack(states, axis)


def _scan_op(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The custom op Mamba-1's layers call while capturing (``flora_graph.frontend.selective_scan``)."""
    from flora_graph.frontend.selective_scan import linear_scan

    return linear_scan(a, b, h, 1)


def _std(g, x, rng):
    var = g.add(Op.REDUCE_VAR, [x["x"]], {"axes": (2,), "keepdims": 0, "correction": 1.0})
    var_all = g.add(Op.REDUCE_VAR, [x["x"]], {"axes": (), "keepdims": 0, "correction": 1.0})
    return {"std": g.add(Op.SQRT, [var]), "std_all": g.add(Op.SQRT, [var_all])}


CASES = [
    Case("reduce_mean_last_keep", {"x": X}, op(Op.REDUCE_MEAN, "x", axes=(-1,), keepdims=1),
         lambda x: x.mean(-1, keepdim=True)),
    Case("reduce_mean_two_axes", {"x": X}, op(Op.REDUCE_MEAN, "x", axes=(1, 2), keepdims=0), lambda x: x.mean((1, 2))),
    Case("reduce_sum_all", {"x": X}, op(Op.REDUCE_SUM, "x", axes=(), keepdims=0), lambda x: x.sum(), tol=1e-4),
    Case("reduce_sum_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.REDUCE_SUM, "x", axes=(0,), keepdims=1),
         lambda x: x.sum(0, keepdim=True)),
    Case("reduce_prod_keep", {"x": X}, op(Op.REDUCE_PROD, "x", axes=(1,), keepdims=1),
         lambda x: x.prod(1, keepdim=True), capture=("prod.dim_int",)),
    Case("reduce_prod_all", {"x": In(("batch", 4), kind="positive")}, op(Op.REDUCE_PROD, "x", axes=(), keepdims=0),
         lambda x: x.prod(), tol=1e-4, capture=("prod.default",)),
    Case("reduce_prod_int_two_axes", {"x": In(("batch", "seq", 3), "int64", "small_int")},
         op(Op.REDUCE_PROD, "x", axes=(0, 2), keepdims=0), lambda x: x.prod(2).prod(0)),
    Case("reduce_max_two_axes_keep", {"x": X}, op(Op.REDUCE_MAX, "x", axes=(1, 2), keepdims=1),
         lambda x: torch.amax(x, (1, 2), keepdim=True), capture=("amax.default",)),
    Case("reduce_min_last", {"x": X}, op(Op.REDUCE_MIN, "x", axes=(-1,), keepdims=0), lambda x: x.amin(-1),
         capture=("amin.default",)),
    Case("reduce_max_min_all", {"x": X},
         lambda g, x, rng: {"max": op(Op.REDUCE_MAX, "x", axes=(), keepdims=0)(g, x, rng),
                            "min": op(Op.REDUCE_MIN, "x", axes=(), keepdims=0)(g, x, rng)},
         lambda x: (x.max(), x.min()), capture=("max.default", "min.default")),
    Case("max_dim_ties", {"x": TIES}, _max_dim(Op.REDUCE_MAX, Op.ARG_MAX, 1, 0), lambda x: tuple(torch.max(x, 1)),
         capture=("max.dim",)),
    Case("min_dim_keep_ties", {"x": TIES}, _max_dim(Op.REDUCE_MIN, Op.ARG_MIN, 2, 1),
         lambda x: tuple(x.min(-1, keepdim=True)), capture=("min.dim",)),
    Case("argmax_last_ties", {"x": TIES}, op(Op.ARG_MAX, "x", axis=-1, keepdims=0), lambda x: x.argmax(-1),
         capture=("argmax.default",)),
    Case("argmin_keep_ties", {"x": TIES}, op(Op.ARG_MIN, "x", axis=1, keepdims=1), lambda x: x.argmin(1, keepdim=True),
         capture=("argmin.default",)),
    Case("argmax_flat", {"x": TIES}, _flat_arg(Op.ARG_MAX), lambda x: x.argmax(), capture=("argmax.default",)),
    Case("argmin_flat_keep", {"x": TIES}, _flat_arg(Op.ARG_MIN, 3), lambda x: x.argmin(keepdim=True),
         capture=("argmin.default",)),
    Case("any_all", {"x": FLAGS}, _any_all,
         lambda x: (x.any(), x.any(1), x.any((0, 2)), x.all(), x.all(-1, keepdim=True), x.all((0, 1))),
         capture=("any.default", "any.dim", "any.dims", "all.default", "all.dim", "all.dims")),
    Case("reduce_var_last", {"x": X}, op(Op.REDUCE_VAR, "x", axes=(-1,), keepdims=0, correction=1.0),
         lambda x: x.var(-1), tol=1e-4, capture=("var.dim",)),
    Case("reduce_var_correction", {"x": X}, op(Op.REDUCE_VAR, "x", axes=(1, 2), keepdims=1, correction=0.0),
         lambda x: torch.var(x, (1, 2), correction=0, keepdim=True), tol=1e-4, capture=("var.correction",)),
    Case("std", {"x": X}, _std, lambda x: (x.std(-1), x.std()), tol=1e-4, capture=("std.dim", "std.correction")),
    Case("cumsum", {"x": X}, op(Op.CUMSUM, "x", axis=1), lambda x: x.cumsum(1), tol=1e-4),
    Case("topk_last", {"x": X}, _top_k(3, 2, 1), lambda x: tuple(torch.topk(x, 3)), capture=("topk.default",)),
    Case("topk_smallest_static_axis", {"x": In(("batch", 5, "seq"))}, _top_k(2, 1, 0),
         lambda x: tuple(torch.topk(x, 2, 1, largest=False)), capture=("topk.default",)),
    Case("topk_int_full", {"x": In(("batch", 4), "int64", "index:1000")}, _top_k(4, 1, 1),
         lambda x: tuple(torch.topk(x, 4, sorted=True)), capture=("topk.default",)),
    Case("topk_of_the_axis_dim", {"x": X}, _top_k("seq", 1, 1), lambda x: tuple(torch.topk(x, x.shape[1], 1)),
         capture=("topk.default",)),  # a dynamic k, the axis's own dim: every value in order
    Case("sort_named_axis_descending", {"x": X}, _top_k("seq", 1, 1), lambda x: tuple(torch.sort(x, 1, descending=True)),
         capture=("sort.default",)),
    Case("sort_stable_ties", {"x": TIES}, _top_k(6, 2, 0), lambda x: tuple(torch.sort(x, stable=True)),
         capture=("sort.stable",)),
    Case("sort_stable_descending_ties", {"x": TIES}, _top_k("seq", 1, 1),
         lambda x: tuple(torch.sort(x, stable=True, dim=1, descending=True)), capture=("sort.stable",)),
    Case("arg_top_k_ties", {"x": TIES}, op(Op.ARG_TOP_K, "x", k=4, axis=-1, largest=1),
         lambda x: torch.sort(x, stable=True, descending=True)[1][..., :4]),
    Case("linear_scan_decaying", {"a": In(("batch", 2, "seq", 3), kind="positive"), "b": In(("batch", 2, "seq", 3)),
                                  "h0": In(("batch", 2, 3))},
         lambda g, x, rng: g.add(Op.LINEAR_SCAN, [g.add(Op.MUL, [x["a"], g.const("k", np.array(0.3, np.float32))]),
                                                  x["b"], x["h0"]], {"axis": 2}),
         lambda a, b, h: _torch_linear_scan(a * 0.3, b, h, 2), tol=1e-5),
    Case("linear_scan_first_axis", {"a": In(("seq", "batch")), "b": In(("seq", "batch")), "h0": In(("batch",))},
         op(Op.LINEAR_SCAN, "a", "b", "h0", axis=0), lambda a, b, h: _torch_linear_scan(a, b, h, 0), tol=1e-5),
    Case("linear_scan_captured", {"a": In(("batch", "seq", 3)), "b": In(("batch", "seq", 3)), "h0": In(("batch", 3))},
         op(Op.LINEAR_SCAN, "a", "b", "h0", axis=1), _scan_op, tol=1e-5, capture=("flora_graph::linear_scan.default",)),
    Case("cumsum_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.CUMSUM, "x", axis=-1), lambda x: x.cumsum(-1)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
