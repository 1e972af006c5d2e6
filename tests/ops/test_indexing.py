"""The indexing family (:mod:`flora_graph.ops.indexing`): ``Gather``, ``GatherElements``, ``Index``,
``IndexPut``, ``ScatterElements``.

Numpy reference against torch indexing (``t[i]``, ``torch.gather``, ``index_put``, ``scatter``,
``scatter_add``, ``scatter_reduce``; captured: ``diagonal``, ``slice_scatter``), then every backend
against the reference; see :mod:`tests.ops.harness`.
"""

from __future__ import annotations

import numpy as np
import torch

from flora_graph.ir import Op

from .harness import Case, In, const, family_tests, op

_EMB = const(np.random.default_rng(5), 11, 6)
_PUT_AT = np.array([4, -1, 0], np.int64)  # distinct places: a write to one place twice has no defined result
_SCATTER_AT = np.array([[4, 0, 2, 1]], np.int64)
_VALUE_AT = np.array([[1, 3]], np.int64)


def _diagonal(g, x, rng):
    moved = g.add(Op.TRANSPOSE, [x["x"]], {"perm": (1, 2, 0)})
    return g.add(Op.INDEX, [moved, g.const("rows", np.arange(1, 5)), g.const("cols", np.arange(4))], {"axis": 1})


def _slice_scatter_step2(g, x, rng):
    picked = g.add(Op.GATHER, [x["s"], g.const("from", np.array([0, 0, 1, 0, 2, 0]))], {"axis": 1})
    mask = g.const("mask", np.array([True, False] * 3).reshape(6, 1))
    return g.add(Op.WHERE, [mask, picked, x["x"]])


def _scatter_src(g, x, rng):
    cut = g.add(Op.SLICE, [x["u"]], {"axes": (0, 1), "starts": (0, 0), "ends": (1, 4)})
    return g.add(Op.SCATTER_ELEMENTS, [x["x"], g.const("i", _SCATTER_AT), cut], {"axis": 1})


def _scatter_value(g, x, rng):
    value = g.add(Op.EXPAND, [g.const("v", np.array(2.5, np.float32))], {"shape": (1, 2)})
    return g.add(Op.SCATTER_ELEMENTS, [x["x"], g.const("i", _VALUE_AT), value], {"axis": 1})

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
    # ------------------------------------------------------------------ IndexPut, ScatterElements and their converters
    Case("index_put", {"x": In((6, "seq")), "v": In((3, "seq"))},
         lambda g, x, rng: g.add(Op.INDEX_PUT, [x["x"], x["v"], g.const("i", _PUT_AT)]),
         lambda x, v: x.index_put((torch.from_numpy(_PUT_AT),), v), capture=("index_put.default",)),
    Case("index_put_accumulate_inner", {"x": In(("batch", 5, 4)), "v": In((1, 3)), "i": In((3,), "int64", "index:5"),
                                        "j": In((1,), "int32", "index:4")},
         op(Op.INDEX_PUT, "x", "v", "i", "j", axis=1, accumulate=1),
         lambda x, v, i, j: torch.ops.aten.index_put(x, [None, i, j.long()], v, True)),
    Case("scatter_src", {"x": In(("batch", 5)), "u": In(("batch", 5))}, _scatter_src,
         lambda x, u: x.scatter(1, torch.from_numpy(_SCATTER_AT), u), capture=("scatter.src",)),
    Case("scatter_value", {"x": In(("batch", 5))}, _scatter_value,
         lambda x: x.scatter(1, torch.from_numpy(_VALUE_AT), 2.5), capture=("scatter.value",)),
    Case("scatter_add", {"x": In(("batch", 5)), "i": In(("batch", 3), "int64", "index:5"), "u": In(("batch", 3))},
         op(Op.SCATTER_ELEMENTS, "x", "i", "u", axis=-1, reduction="add"),
         lambda x, i, u: torch.scatter_add(x, 1, torch.where(i < 0, i + 5, i), u), capture=("scatter_add.default",)),
    Case("scatter_reduce_prod", {"x": In(("batch", 5)), "i": In(("batch", 6), "int64", "index:5"), "u": In(("batch", 6))},
         op(Op.SCATTER_ELEMENTS, "x", "i", "u", axis=1, reduction="mul"),
         lambda x, i, u: x.scatter_reduce(1, torch.where(i < 0, i + 5, i), u, "prod"), capture=("scatter_reduce.two",)),
    Case("scatter_reduce_amax", {"x": In(("batch", 5)), "i": In((3, 5), "int64", "index:batch"), "u": In((3, 5))},
         op(Op.SCATTER_ELEMENTS, "x", "i", "u", axis=0, reduction="max"),
         lambda x, i, u: x.scatter_reduce(0, torch.where(i < 0, i + x.shape[0], i), u, "amax"),
         capture=("scatter_reduce.two",)),
    Case("scatter_reduce_amin_int", {"x": In(("batch", 5), "int64", "small_int"), "i": In(("batch", 7), "int32", "index:5"),
                                     "u": In(("batch", 7), "int64", "small_int")},
         op(Op.SCATTER_ELEMENTS, "x", "i", "u", axis=-1, reduction="min"),
         lambda x, i, u: x.scatter_reduce(1, torch.where(i < 0, i + 5, i).long(), u, "amin"), capture=("scatter_reduce.two",)),
    Case("diagonal", {"x": In((4, "batch", 5))}, _diagonal, lambda x: torch.diagonal(x, -1, 2, 0),
         capture=("diagonal.default",)),
    Case("slice_scatter_step2", {"x": In(("batch", 6, 3)), "s": In(("batch", 3, 3))}, _slice_scatter_step2,
         lambda x, s: torch.slice_scatter(x, s, 1, 0, 6, 2), capture=("slice_scatter.default",)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)


def test_a_scatter_writing_one_place_twice_is_refused() -> None:
    """Writing two values to one place has no defined result (torch and ONNX leave the order open)."""
    import pytest

    from flora_graph.errors import GraphError
    from flora_graph.ir import Graph
    from flora_graph.runtimes import run

    g = Graph("dup")
    x, v = g.input("x", (4,)), g.input("v", (2,))
    g.set_output("put", g.add(Op.INDEX_PUT, [x, v, g.const("i", np.array([1, -3]))]))
    feeds = {"x": np.zeros(4, np.float32), "v": np.ones(2, np.float32)}
    with pytest.raises(GraphError, match="duplicate"):
        run(g, feeds)
    g = Graph("dup2")
    x, v = g.input("x", (4,)), g.input("v", (2,))
    g.set_output("sc", g.add(Op.SCATTER_ELEMENTS, [x, g.const("i", np.array([0, -4])), v]))
    with pytest.raises(GraphError, match="duplicate"):
        run(g, feeds)
