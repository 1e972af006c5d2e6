"""The movement family (:mod:`flora_graph.ops.movement`): reshapes, transposes, concatenation,
splits, slices, broadcasts.

Numpy reference against torch (``reshape``, ``flatten``, ``permute``, ``torch.cat``,
``torch.split``, slicing, ``expand``, ``flip``; captured: ``stack``, ``unflatten``,
``repeat_interleave``, ``copy``, ``select_scatter``, ``slice_scatter``), then every backend against the reference; see
:mod:`tests.ops.harness`.
"""

from __future__ import annotations

import numpy as np
import torch

from flora_graph.ir import Op

from .harness import END, Case, In, const, family_tests, op

X = In(("batch", "seq", 6))
X4D = In(("batch", "seq", 3, 4))

_INTS = np.array([[7, -7, 0]], np.int64)
_TABLE = const(np.random.default_rng(6), 16, 6)


def _stack(g, x, rng):
    return g.add(Op.CONCAT, [g.add(Op.UNSQUEEZE, [x[k]], {"axes": (1,)}) for k in ("a", "b")], {"axis": 1})


def _repeat_interleave(g, x, rng):
    wide = g.add(Op.EXPAND, [g.add(Op.UNSQUEEZE, [x["x"]], {"axes": (2,)})], {"shape": ("batch", "seq", 2, 3)})
    return g.add(Op.RESHAPE, [wide], {"shape": ("batch", "2*seq", 3)})


def _copy(g, x, rng):
    return g.add(Op.EXPAND, [g.add(Op.CAST, [x["s"]], {"to": "float32"})], {"shape": ("batch", "seq", 4)})


def _select_scatter(g, x, rng):
    head = g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (0,), "ends": (2,)})
    tail = g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (3,), "ends": (4,)})
    return g.add(Op.CONCAT, [head, g.add(Op.UNSQUEEZE, [x["s"]], {"axes": (1,)}), tail], {"axis": 1})


def _slice_scatter(g, x, rng):
    head = g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (0,), "ends": (2,)})
    tail = g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (4,), "ends": (6,)})
    return g.add(Op.CONCAT, [head, x["s"], tail], {"axis": 1})

def _shift_right(g, x, rng):
    """BART's ``shift_tokens_right`` along a dynamic axis: ``out[:, 1:] = x[:, :-1]``, ``out[:, 0]`` kept."""
    first = g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (0,), "ends": (1,)})
    return g.add(Op.CONCAT, [first, g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (0,), "ends": (-1,)})], {"axis": 1})


def _select_scatter_ends(g, x, rng):
    """``s`` written at the first place of a dynamic axis, and at the last place (of ``x`` again)."""
    s = g.add(Op.UNSQUEEZE, [x["s"]], {"axes": (1,)})
    rest = g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (1,), "ends": (END,)})
    head = g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (0,), "ends": (-1,)})
    return {"first": g.add(Op.CONCAT, [s, rest], {"axis": 1}), "last": g.add(Op.CONCAT, [head, s], {"axis": 1})}


CASES = [
    Case("slice_static_steps", {"x": In(("batch", 6, 5))},
         op(Op.SLICE, "x", axes=(1, 2), starts=(1, -3), ends=(5, END), steps=(2, 1)), lambda x: x[:, 1:5:2, -3:]),
    Case("slice_named_dim_ends", {"x": In(("batch", "seq", 6))},
         lambda g, x, rng: {
             "last2": g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (-2,), "ends": (END,)}),
             "first": g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (0,), "ends": (1,)}),
             "all": g.add(Op.SLICE, [x["x"]], {"axes": (-2,), "starts": (0,), "ends": ("seq",)}),
         },
         lambda x: (x[:, -2:], x[:, :1], x)),
    Case("slice_table_to_seq", {"x": X},
         lambda g, x, rng: g.add(Op.ADD, [x["x"], g.add(Op.SLICE, [g.const("t", _TABLE)], {"axes": (0,), "starts": (0,), "ends": ("seq",)})]),
         lambda x: x + torch.from_numpy(_TABLE)[: x.shape[1]],
         dim_max={"seq": 16}),  # the table has 16 rows: torch-export needs the bound
    Case("unsqueeze", {"x": In(("batch", "seq"))}, op(Op.UNSQUEEZE, "x", axes=(0, -1)), lambda x: x[None, :, :, None]),
    Case("squeeze", {"x": In(("batch", 1, "seq", 1))}, op(Op.SQUEEZE, "x", axes=(1, -1)), lambda x: x[:, 0, :, 0]),
    Case("expand_named", {"x": In(("batch", 1, 6)), "y": In(("batch", "seq"))},
         op(Op.EXPAND, "x", shape=("batch", "seq", 6)), lambda x, y: x.expand(-1, y.shape[1], -1)),
    Case("broadcast_to_named", {"x": In((1, 6)), "y": In(("batch", "seq"))},
         op(Op.EXPAND, "x", shape=("batch", "seq", 6)),
         lambda x, y: torch.broadcast_to(x, (y.shape[0], y.shape[1], 6)), capture=("broadcast_to.default",)),
    Case("expand_bidirectional", {"x": In(("batch", 1, 6))}, op(Op.EXPAND, "x", shape=(1, 3, 1)),
         lambda x: x.expand(-1, 3, -1)),
    Case("expand_const_to_named", {"y": In(("batch", "seq"), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.ADD, [x["y"], g.add(Op.EXPAND, [g.const("two", np.array(2, np.int64))], {"shape": ("batch", "seq")})]),
         lambda y: y + torch.full(y.shape, 2)),
    Case("reshape_named_target", {"x": In(("batch", "seq", 8))}, op(Op.RESHAPE, "x", shape=("batch", "seq", 2, -1)),
         lambda x: x.reshape(x.shape[0], x.shape[1], 2, 4)),
    Case("reshape_named_product", {"x": In(("batch", "seq", 8))}, op(Op.RESHAPE, "x", shape=("batch*seq", 4, 2)),
         lambda x: x.reshape(-1, 4, 2)),
    Case("reshape_copy_infer", {"x": X}, op(Op.RESHAPE, "x", shape=(0, -1)), lambda x: x.reshape(x.shape[0], -1)),
    Case("reshape_split_dim", {"x": X}, op(Op.RESHAPE, "x", shape=(0, 0, 2, 3)), lambda x: x.reshape(*x.shape[:2], 2, 3)),
    Case("reshape_infer_first", {"x": In(("batch", 2, 6))}, op(Op.RESHAPE, "x", shape=(-1, 3)), lambda x: x.reshape(-1, 3)),
    Case("reshape_infer_mid", {"x": In(("batch", "seq", 8))}, op(Op.RESHAPE, "x", shape=(0, -1, 4)),
         lambda x: x.reshape(x.shape[0], -1, 4)),
    Case("reshape_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.RESHAPE, "x", shape=(-1,)), lambda x: x.reshape(-1)),
    # ------------------------------------------------------------------ Flatten
    Case("flatten_0", {"x": X4D}, op(Op.FLATTEN, "x", axis=0), lambda x: x.flatten().unsqueeze(0)),
    Case("flatten_1", {"x": X4D}, op(Op.FLATTEN, "x"), lambda x: x.flatten(1)),
    Case("flatten_2", {"x": X4D}, op(Op.FLATTEN, "x", axis=2), lambda x: x.flatten(2).flatten(0, 1)),
    Case("flatten_neg", {"x": X4D}, op(Op.FLATTEN, "x", axis=-1), lambda x: x.flatten(0, 2)),
    Case("flatten_end", {"x": X4D}, op(Op.FLATTEN, "x", axis=4), lambda x: x.flatten().unsqueeze(1)),
    # ------------------------------------------------------------------ Transpose
    Case("transpose_swap", {"x": In(("batch", "seq", 3))}, op(Op.TRANSPOSE, "x", perm=(0, 2, 1)), lambda x: x.permute(0, 2, 1)),
    Case("transpose_batch_last", {"x": In(("batch", "seq", 3))}, op(Op.TRANSPOSE, "x", perm=(2, 1, 0)),
         lambda x: x.permute(2, 1, 0)),
    Case("transpose_heads", {"x": X4D}, op(Op.TRANSPOSE, "x", perm=(0, 2, 1, 3)), lambda x: x.transpose(1, 2)),
    # ------------------------------------------------------------------ Concat
    Case("concat_inputs", {"a": In(("batch", 2, "seq")), "b": In(("batch", 4, "seq"))}, op(Op.CONCAT, "a", "b", axis=1),
         lambda a, b: torch.cat([a, b], 1)),
    Case("concat_three_last", {"a": In(("batch", "seq", 3)), "b": In(("batch", "seq", 1)), "c": In(("batch", "seq", 2))},
         op(Op.CONCAT, "a", "b", "c", axis=-1), lambda a, b, c: torch.cat([a, b, c], -1)),
    Case("concat_one", {"x": In(("batch", 2, 3))}, op(Op.CONCAT, "x", axis=2), lambda x: torch.cat([x], 2)),
    Case("concat_int_with_const", {"a": In(("batch", 2), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.CONCAT, [g.add(Op.EXPAND, [g.const("c", _INTS)], {"shape": ("batch", 3)}), x["a"]], {"axis": 1}),
         lambda a: torch.cat([torch.from_numpy(_INTS).expand(a.shape[0], -1), a], 1)),
    # ------------------------------------------------------------------ Split
    Case("split_pieces", {"x": In(("batch", 10))},
         lambda g, x, rng: {f"piece{i}": g.add(Op.SPLIT, [x["x"]], {"axis": -1, "sizes": (3, 3, 4), "index": i}) for i in range(3)},
         lambda x: torch.split(x, [3, 3, 4], -1)),
    Case("split_one_piece", {"x": X}, op(Op.SPLIT, "x", axis=2, sizes=(2, 4), index=1), lambda x: torch.split(x, [2, 4], 2)[1]),
    # ------------------------------------------------------------------ Flip, and converters composing movement ops
    Case("flip", {"x": In(("batch", "seq", 6))}, op(Op.FLIP, "x", axes=(0, 2)), lambda x: torch.flip(x, [0, -1]),
         capture=("flip.default",)),
    Case("stack", {"a": In(("batch", "seq")), "b": In(("batch", "seq"))}, _stack, lambda a, b: torch.stack([a, b], 1),
         capture=("stack.default",)),
    Case("unflatten", {"x": X}, op(Op.RESHAPE, "x", shape=(0, 0, 2, 3)), lambda x: x.unflatten(-1, (2, 3)),
         capture=("unflatten.int",)),
    Case("repeat_interleave", {"x": In(("batch", "seq", 3))}, _repeat_interleave,
         lambda x: torch.repeat_interleave(x, 2, dim=1), capture=("repeat_interleave.self_int",)),
    Case("copy_broadcast_cast", {"x": In(("batch", "seq", 4)), "s": In((4,), "int64", "small_int")}, _copy,
         lambda x, s: torch.ops.aten.copy(x, s), capture=("copy.default",)),
    Case("select_scatter", {"x": In(("batch", 4, 6)), "s": In(("batch", 6))}, _select_scatter,
         lambda x, s: torch.select_scatter(x, s, 1, 2), capture=("select_scatter.default",)),
    Case("slice_scatter_step1", {"x": In(("batch", 6)), "s": In(("batch", 2))}, _slice_scatter,
         lambda x, s: torch.slice_scatter(x, s, 1, 2, 4), capture=("slice_scatter.default",)),
    Case("slice_scatter_dynamic_axis", {"x": In(("batch", "seq"))}, _shift_right,
         lambda x: torch.slice_scatter(x, x[:, :-1], 1, 1), capture=("slice_scatter.default",),
         dim_min={"seq": 3}),  # torch.export specializes a size of 1 (seq-1), so the torch-export backend needs seq >= 3
    Case("select_scatter_dynamic_axis_ends", {"x": In(("batch", "seq", 3)), "s": In(("batch", 3))}, _select_scatter_ends,
         lambda x, s: (torch.select_scatter(x, s, 1, 0), torch.select_scatter(x, s, 1, -1)), dim_min={"seq": 3},
         capture=("select_scatter.default",)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
