"""Padding and tiling: ``Pad`` (constant, reflect, edge) and ``Tile``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. Both are in ``OpGroup.Movement``
(they copy values and never widen a dtype). ``Pad`` takes ONNX's layout of ``pads``: the
begins of every axis, then the ends, all ``>= 0`` (a crop is a ``Slice``); a named dim can
only be padded by 0, since ``seq + 2`` is no dim.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import add_dims, dim_product, format_shape
from flora_graph.ops._onnx import int64
from flora_graph.ops._torch import dim_expr, dim_source, float_literal, ints, reshaped, size_product
from flora_graph.ops.registry import define

__all__: list[str] = []

_MOVEMENT = ("Movement",)
_TORCH_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


# --------------------------------------------------------------------------- Pad
def _infer_pad(shapes, dtypes, attrs):
    """``x`` with ``pads[i]`` values before and ``pads[rank + i]`` after axis ``i``."""
    x, pads, mode = shapes[0], attrs["pads"], attrs["mode"]
    if len(pads) != 2 * len(x) or any(p < 0 for p in pads):
        raise ShapeError(f"Pad: pads {pads} must be 2 * rank = {2 * len(x)} sizes >= 0 (a crop is a Slice)")
    out = []
    for i, d in enumerate(x):
        b, e = pads[i], pads[len(x) + i]
        if not b and not e:
            out.append(d)
            continue
        if not isinstance(d, int):
            if mode == "reflect":  # reflecting needs pads below the dim, which a named dim cannot promise
                raise ShapeError(f"Pad: cannot reflect-pad the named dim {d!r} of {format_shape(x)}")
            out.append(add_dims(d, b + e))  # seq + 7: the chunked scans' static pad before their Slice
            continue
        if mode == "reflect" and max(b, e) >= d:
            raise ShapeError(f"Pad: reflect pads ({b}, {e}) must be < dim {i} = {d}")
        if mode == "edge" and d == 0:
            raise ShapeError(f"Pad: edge padding of the empty dim {i}")
        out.append(d + b + e)
    if mode != "constant" and _padded_axes(pads, len(x)) > 3:
        raise ShapeError(f"Pad: {mode} padding of more than the last 3 axes ({pads})")
    return tuple(out), dtypes[0]


def _padded_axes(pads: tuple[int, ...], rank: int) -> int:
    """How many trailing axes the first padded axis leaves (0: nothing padded)."""
    padded = [i for i in range(rank) if pads[i] or pads[rank + i]]
    return rank - padded[0] if padded else 0


def _numpy_pad(x: np.ndarray, *, pads: tuple[int, ...], mode: str, value: float) -> np.ndarray:
    widths = [(pads[i], pads[x.ndim + i]) for i in range(x.ndim)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.array(value).astype(x.dtype))
    return np.pad(x, widths, mode=mode)


def _onnx_pad(ctx: Any, node: ComputationNode, out: str) -> None:
    """ONNX ``Pad`` (``constant``, ``reflect``, ``edge``); the constant in the compute dtype."""
    inputs = [ctx.arg(node, 0), int64(ctx, node.attrs["pads"], f"{node.name}/pads")]
    if node.attrs["mode"] == "constant":
        inputs.append(ctx.constant(np.array(node.attrs["value"]).astype(ctx.dtype), f"{node.name}/value"))
    ctx.emit("Pad", inputs, [out], mode=node.attrs["mode"])


def _torch_pad(node: ComputationNode, args: list[str]) -> str:
    """``F.pad``; reflect/replicate through a view of rank ``k + 1`` or ``k + 2`` (what torch pads)."""
    x, shape, a = args[0], node.inputs[0].shape, node.attrs
    rank, pads = len(shape), a["pads"]
    k = _padded_axes(pads, rank)
    if not k:
        return x
    flat = ints(v for i in range(rank - 1, rank - k - 1, -1) for v in (pads[i], pads[rank + i]))
    if a["mode"] == "constant":
        return f"F.pad({x}, {flat}, value={float_literal(a['value'])})"
    lead = rank - k
    if lead in (1, 2):
        return f"F.pad({x}, {flat}, mode={_TORCH_MODES[a['mode']]!r})"
    view = [size_product(x, shape, range(lead - 1))] if lead else ["1"]
    view += [dim_source(x, shape, i) for i in range(max(lead - 1, 0), rank)]
    padded = f"F.pad({reshaped(x, shape, view)}, {flat}, mode={_TORCH_MODES[a['mode']]!r})"
    return f"{padded}.reshape([{', '.join(dim_expr(d, node, [(x, shape)]) for d in node.shape)}])"


define(
    "PAD", "Pad", (1, 1),
    {"pads": AttrSpec("ints", required=True),
     "mode": AttrSpec("str", "constant", choices=("constant", "reflect", "edge")), "value": AttrSpec("float", 0.0)},
    infer=_infer_pad,
    doc="ONNX Pad: pads = begins then ends (>= 0); constant (value), reflect (no edge repeat) or edge.",
    numpy=_numpy_pad, onnx=_onnx_pad, torch=_torch_pad, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Tile
def _infer_tile(shapes, dtypes, attrs):
    x, reps = shapes[0], attrs["repeats"]
    if len(reps) != len(x) or any(r < 0 for r in reps):
        raise ShapeError(f"Tile: repeats {reps} must be {len(x)} counts >= 0 for {format_shape(x)}")
    return tuple(d if r == 1 else dim_product([d, r]) for d, r in zip(x, reps, strict=True)), dtypes[0]


def _onnx_tile(ctx: Any, node: ComputationNode, out: str) -> None:
    ctx.emit("Tile", [ctx.arg(node, 0), int64(ctx, node.attrs["repeats"], f"{node.name}/repeats")], [out])


define(
    "TILE", "Tile", (1, 1), {"repeats": AttrSpec("ints", required=True)},
    infer=_infer_tile, doc="ONNX Tile / torch repeat: x repeated repeats[i] times along axis i.",
    numpy=lambda x, *, repeats: np.tile(x, repeats), onnx=_onnx_tile,
    torch=lambda node, args: f"{args[0]}.repeat({ints(node.attrs['repeats'])})", groups=_MOVEMENT,
)
