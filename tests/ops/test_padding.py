"""The padding family (:mod:`flora_graph.ops.padding`): ``Pad`` and ``Tile``.

Numpy reference against torch (``constant_pad_nd``, ``F.pad``, the reflection/replication
pads, ``repeat``), then every backend against the reference; see :mod:`tests.ops.harness`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flora_graph.ir import Op

from .harness import END, Case, In, family_tests, op

aten = torch.ops.aten


def _crop_then_pad(g, x, rng):
    crop = g.add(Op.SLICE, [x["x"]], {"axes": (1, 2), "starts": (1, 0), "ends": (END, -2), "steps": (1, 1)})
    return g.add(Op.PAD, [crop], {"pads": (0, 0, 1, 0, 2, 0)})


def _tile_new_axis(g, x, rng):
    return g.add(Op.TILE, [g.add(Op.UNSQUEEZE, [x["x"]], {"axes": (0,)})], {"repeats": (2, 1, 2)})


def _tile_dynamic_count(g, x, rng):  # w.repeat(batch, 2): what aten.repeat with a SymInt count becomes
    tiled = g.add(Op.TILE, [x["w"]], {"repeats": (1, 2)})
    wide = g.add(Op.EXPAND, [g.add(Op.UNSQUEEZE, [tiled], {"axes": (0,)})], {"shape": ("batch", 2, 6)})
    return g.add(Op.RESHAPE, [wide], {"shape": ("2*batch", 6)})


CASES = [
    Case("pad_constant", {"x": In(("batch", "seq", 6))}, op(Op.PAD, "x", pads=(0, 0, 1, 0, 0, 2), value=0.5),
         lambda x: torch.constant_pad_nd(x, [1, 2], 0.5), capture=("constant_pad_nd.default",)),
    # a non-finite value (scores padded with -inf before a top-k): every backend writes it, TorchScript's source too
    Case("pad_minus_inf", {"x": In(("batch", "seq", 6))}, op(Op.PAD, "x", pads=(0, 0, 0, 0, 0, 3), value=float("-inf")),
         lambda x: torch.constant_pad_nd(x, [0, 3], float("-inf")), capture=("constant_pad_nd.default",)),
    Case("pad_constant_crop", {"x": In(("batch", 5, 6))}, _crop_then_pad,
         lambda x: torch.constant_pad_nd(x, [1, -2, -1, 2]), capture=("constant_pad_nd.default",)),
    Case("pad_int", {"x": In(("batch", 3), "int64", "small_int")}, op(Op.PAD, "x", pads=(0, 2, 0, 1), value=7.0),
         lambda x: F.pad(x, (2, 1), value=7)),
    Case("pad_reflect_1d", {"x": In(("batch", 4, 6))}, op(Op.PAD, "x", pads=(0, 0, 2, 0, 0, 3), mode="reflect"),
         lambda x: aten.reflection_pad1d(x, [2, 3]), capture=("reflection_pad1d.default",)),
    Case("pad_reflect_2d", {"x": In(("batch", 2, 4, 5))}, op(Op.PAD, "x", pads=(0, 0, 2, 1, 0, 0, 1, 2), mode="reflect"),
         lambda x: aten.reflection_pad2d(x, [1, 2, 2, 1]), capture=("reflection_pad2d.default",)),
    Case("pad_edge_2d", {"x": In(("batch", 3, 4, 5))}, op(Op.PAD, "x", pads=(0, 0, 0, 1, 0, 0, 3, 2), mode="edge"),
         lambda x: aten.replication_pad2d(x, [1, 2, 0, 3]), capture=("replication_pad2d.default",)),
    Case("pad_edge_1d", {"x": In(("batch", 3, 5))}, op(Op.PAD, "x", pads=(0, 0, 0, 0, 0, 2), mode="edge"),
         lambda x: aten.replication_pad1d(x, [0, 2]), capture=("replication_pad1d.default",)),
    Case("pad_reflect_3d", {"x": In(("batch", 3, 4, 5))}, op(Op.PAD, "x", pads=(0, 1, 2, 1, 0, 2, 0, 3), mode="reflect"),
         lambda x: aten.reflection_pad3d(x, [1, 3, 2, 0, 1, 2]), capture=("reflection_pad3d.default",)),
    Case("pad_edge_3d", {"x": In(("batch", 2, 3, 4, 2))}, op(Op.PAD, "x", pads=(0, 0, 1, 0, 2, 0, 0, 2, 1, 1), mode="edge"),
         lambda x: aten.replication_pad3d(x, [2, 1, 0, 1, 1, 2]), capture=("replication_pad3d.default",)),
    Case("pad_edge_functional", {"x": In(("batch", 4, 6))}, op(Op.PAD, "x", pads=(0, 0, 1, 0, 0, 1), mode="edge"),
         lambda x: F.pad(x, (1, 1), mode="replicate"), capture=("pad.default",)),
    Case("pad_reflect_every_axis", {"x": In((4, 5))}, op(Op.PAD, "x", pads=(1, 2, 1, 0), mode="reflect"),
         lambda x: F.pad(x[None], (2, 0, 1, 1), mode="reflect")[0]),
    Case("pad_edge_high_rank", {"x": In(("batch", 2, 3, 5))}, op(Op.PAD, "x", pads=(0, 0, 0, 1, 0, 0, 0, 2), mode="edge"),
         lambda x: torch.cat([x[..., :1], x, x[..., -1:], x[..., -1:]], -1)),
    # ------------------------------------------------------------------ Tile
    Case("tile", {"x": In(("batch", "seq", 3))}, op(Op.TILE, "x", repeats=(2, 1, 3)), lambda x: x.repeat(2, 1, 3),
         capture=("repeat.default",)),
    Case("tile_dynamic_count", {"w": In((2, 3)), "x": In(("batch", 4))}, _tile_dynamic_count,
         lambda w, x: w.repeat(x.shape[0], 2), capture=("repeat.default",)),
    Case("tile_new_axis", {"x": In(("batch", 3))}, _tile_new_axis, lambda x: x.repeat(2, 1, 2), capture=("repeat.default",)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
