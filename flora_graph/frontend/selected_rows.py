"""Rows picked by a bool mask (``x[mask]``), whose count the data decides, as every row in a fixed order.

``x[mask]`` with one bool mask over ``x``'s leading axes has as many rows as the mask has true places: a size no
input carries (torch.export's unbacked ``u0``). Capture takes every row instead, the selected ones first in their
order and the others after them (:func:`select`), and reads ``u0`` as the mask's number of places. That is exact
for what transformers does with such rows, as long as each row is computed alone and only the selected ones are
written back: a per-token layer norm or MLP on the picked tokens, put back with ``masked_scatter`` or
``index_put`` by the same mask (Higgs Audio v2's audio and text token paths).

So every op that reads picked rows is checked before it converts (:func:`check`): one that keeps the rows apart
(elementwise ops, casts, ``linear`` / ``matmul`` on the rows, reductions and views that leave the row axis whole)
passes them on; ``masked_scatter`` / ``index_put`` by the same mask (its ``unsqueeze``, its negation, as those read
it) end them; anything else (a sum over the rows, their count read as a value, a graph output) is refused, naming
the node, as every bool-mask index was before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from flora_graph.frontend.aten.indexing import true_ranks
from flora_graph.frontend.aten.registry import SymDim, as_dtype, refuse
from flora_graph.ir import ComputationNode, Op
from flora_graph.ir.shapes import dim_product
from flora_graph.ops.movement import SLICE_END

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__ = ["check", "mask_key", "select"]

_ROWWISE = frozenset({
    "add", "sub", "mul", "div", "pow", "neg", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid", "silu", "gelu", "relu",
    "to", "_to_copy", "clone", "contiguous", "type_as", "where", "masked_fill", "clamp", "clamp_min", "clamp_max", "abs",
    "reciprocal", "_assert_tensor_metadata", "detach", "alias", "softplus", "erf", "cos", "sin", "square", "rsub",
    "maximum", "minimum", "sign", "hardtanh", "leaky_relu", "elu", "mish", "log_sigmoid", "copysign", "floor", "ceil",
    "round", "trunc", "eq", "ne", "lt", "le", "gt", "ge", "bitwise_not", "logical_not", "dropout", "layer_norm",
    "native_layer_norm", "rms_norm", "linear", "lora_linear",
})
"""Ops (ATen packets and flora_graph's LoRA op) that compute each row of their first input apart from the others."""

_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "var", "std", "softmax", "_softmax", "log_softmax",
                         "_log_softmax", "linalg_vector_norm", "norm", "cumsum", "any", "all", "max", "min", "prod"})
"""Reductions (and scans) along the axes they name: row-wise where the row axis is not among them."""

_VIEWS = frozenset({"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "permute", "expand",
                    "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "flatten", "unflatten",
                    "narrow", "matmul", "mm", "bmm"})
"""Ops whose result is row-wise where the row axis comes out as the first axis, the same size."""

_PRODUCTS = frozenset({"linear", "lora_linear", "matmul", "mm", "bmm"})
"""Ops that mix their second input's rows: row-wise on their first input's rows alone."""

_PEELED = frozenset({"to", "_to_copy", "clone", "alias", "contiguous", "detach", "_assert_tensor_metadata"})


def mask_key(v: Any) -> Any:
    """What a bool mask (an fx node) selects, the same for the same places: casts, copies and a trailing
    ``unsqueeze`` seen through, a negation as ``("not", key)`` (two cancel)."""
    while isinstance(v, torch.fx.Node) and v.op == "call_function" and isinstance(v.target, torch._ops.OpOverload):
        name = v.target.overloadpacket.__name__
        if name in _PEELED and v.args:
            v = v.args[0]
        elif name == "unsqueeze" and len(v.args) > 1 and int(v.args[1]) in (-1, _rank(v) - 1):
            v = v.args[0]
        elif name in ("bitwise_not", "logical_not"):
            inner = mask_key(v.args[0])
            return inner[1] if isinstance(inner, tuple) and inner[0] == "not" else ("not", inner)
        else:
            break
    return v


def _rank(n: torch.fx.Node) -> int:
    val = n.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


def select(ctx: CaptureContext, x: ComputationNode, mask: ComputationNode) -> ComputationNode:
    """``x[mask]`` (``mask`` over ``x``'s leading axes) as all of ``x``'s rows, the selected first in order: each
    row scattered to its place, ``cumsum(mask) - 1`` for a selected one and ``count + cumsum(~mask) - 1`` for the
    others; ``u0`` reads as the mask's number of places."""
    m = len(mask.shape)
    if tuple(mask.shape) != tuple(x.shape[:m]):
        raise refuse(ctx, f"indexing with a bool mask of shape {list(mask.shape)} over {list(x.shape)} (leading "
                          "axes only)")
    count = dim_product(list(mask.shape))
    tail = tuple(x.shape[m:])
    rows = ctx.emit(Op.RESHAPE, [x], {"shape": (count, *tail)})
    flat = ctx.emit(Op.RESHAPE, [mask], {"shape": (count,)})
    before = true_ranks(ctx, flat)  # a picked row's place
    after = true_ranks(ctx, ctx.emit(Op.NOT, [flat]))  # the others', after every picked one
    total = ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.CAST, [flat], {"to": "int64"})], {"axes": (0,), "keepdims": 1})
    place = ctx.emit(Op.WHERE, [flat, before, ctx.emit(Op.ADD, [total, after])])
    empty = ctx.emit(Op.EXPAND, [ctx.scalar(0, x.dtype)], {"shape": (count, *tail)})
    out = ctx.emit(Op.INDEX_PUT, [empty, rows, place], {"axis": 0, "accumulate": 0})
    rows_dim = ctx.fx_node.meta["val"].shape[0]
    if isinstance(rows_dim, torch.SymInt):
        ctx.symbols[str(rows_dim.node.expr)] = count
    ctx.selected[ctx.fx_node] = mask_key(ctx.fx_node.args[1][0])
    return out


@dataclass(frozen=True)
class _Grouped:
    """Rows a 2-D mask ``[B, S]`` picked, viewed back as ``[B, -1, ...]`` (:func:`_regroup`): each leading row's picks
    first along axis 1, in order, its other positions after them; ``counts`` (``[B, 1]`` int64) how many it picked."""

    key: Any
    counts: ComputationNode


Convert = Callable[[Callable[[torch.fx.Node], Any]], ComputationNode]
"""A conversion :func:`check` gives for a node in place of its converter: called with the fx-node -> IR lookup."""


def check(ctx: CaptureContext, n: torch.fx.Node) -> Convert | None:
    """Before ``n`` converts: refuse it where it reads picked rows (:func:`select`) other than one at a time, or
    writes them back by another mask; else mark its result as picked rows where it passes them on. Returns the
    conversion to use instead of ``n``'s converter where picked rows are regrouped per leading row (BART's
    classification head: ``x[eos_mask].view(B, -1, H)[:, -1]``, each row's last end-of-sequence state)."""
    reads = [a for a in _fx_args(n) if a in ctx.selected]
    if not reads:
        return None
    name = n.target.overloadpacket.__name__ if isinstance(n.target, torch._ops.OpOverload) else getattr(
        n.target, "__name__", str(n.target))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # an in-place op: its functional twin's rows
    if any(isinstance(ctx.selected[a], _Grouped) for a in reads):
        return _grouped_read(ctx, n, name, reads)
    if name in ("view", "reshape", "_unsafe_view") and _regroups(n):
        return lambda env: _regroup(ctx, n, env)
    keys = {ctx.selected[a] for a in reads}
    if len(keys) > 1:
        raise refuse(ctx, "an op on rows picked by two different bool masks")
    key = next(iter(keys))
    if name in ("masked_scatter", "index_put"):
        mask = n.args[1] if name == "masked_scatter" else n.args[1][0] if len(n.args[1]) == 1 else None
        if n.args[0] in ctx.selected or mask is None or mask_key(mask) != key:
            raise refuse(ctx, f"{name} of rows picked by a bool mask, by another mask")
        return None  # the rows are back in place
    if name == "sym_size":
        return None  # the rows' count: the mask's number of places, as select reads u0
    if name == "getitem":
        ctx.selected[n] = key
        return None
    elementwise = name in _ROWWISE and name not in _PRODUCTS
    if not elementwise and n.args and n.args[0] not in ctx.selected:
        raise refuse(ctx, f"{name} reading rows picked by a bool mask as other than its first input")
    if name in _PRODUCTS and len(reads) > 1:
        raise refuse(ctx, f"{name} of rows picked by a bool mask with each other (it mixes the rows)")
    ok = name in _ROWWISE or (name in _REDUCTIONS and _keeps_rows(n)) or (name in _VIEWS and _first_axis_kept(n))
    if ok and elementwise:
        ok = all(_broadcasts_rows(n, a) for a in _fx_args(n) if a not in ctx.selected)
    if not ok:
        raise refuse(ctx, f"indexing with a bool mask, its rows then read by {name} (only ops that keep each row "
                          "apart and a masked_scatter / index_put back by the same mask)")
    ctx.selected[n] = key
    return None


def _regroups(n: torch.fx.Node) -> bool:
    """Whether the view ``n`` takes the rows ``x[mask]`` picked (``mask`` ``[B, S]`` over ``x`` ``[B, S, ...]``) as
    ``[B, -1, ...]``: each leading row's picks, as many for every row (what the view means; BART checks it)."""
    src = n.args[0]
    if src.target is not torch.ops.aten.index.Tensor or len(src.args[1]) != 1:
        return False
    x, mask, out = src.args[0].meta.get("val"), src.args[1][0].meta.get("val"), n.meta.get("val")
    if not all(isinstance(t, torch.Tensor) for t in (x, mask, out)) or mask.dim() != 2 or out.dim() != x.dim():
        return False
    same = lambda a, b: str(a) == str(b)  # noqa: E731 - sizes alike, ints or the same symbol
    return same(out.shape[0], x.shape[0]) and all(same(a, b) for a, b in zip(out.shape[2:], x.shape[2:], strict=True))


def _regroup(ctx: CaptureContext, n: torch.fx.Node, env: Callable[[torch.fx.Node], Any]) -> ComputationNode:
    """``x[mask].view(B, -1, ...)`` as ``x`` with each leading row's picked positions first along axis 1, in order
    (a stable sort of the positions, the picked before the others), marked :class:`_Grouped`."""
    src = n.args[0]
    x, mask = env(src.args[0]), env(src.args[1][0])
    positions = ctx.emit(Op.ARANGE, [], {"start": 0, "end": x.shape[1], "step": 1, "dtype": "int64"})
    later = ctx.emit(Op.ADD, [positions, as_dtype(ctx, SymDim(x.shape[1]) if isinstance(x.shape[1], str)
                                                   else x.shape[1], "int64")])
    key = ctx.emit(Op.WHERE, [mask, positions, later])
    order = ctx.emit(Op.ARG_TOP_K, [key], {"k": x.shape[1], "axis": 1, "largest": 0})
    out = _take_positions(ctx, x, order, x.shape[1])
    counts = ctx.emit(Op.REDUCE_SUM, [ctx.emit(Op.CAST, [mask], {"to": "int64"})], {"axes": (1,), "keepdims": 1})
    ctx.selected[n] = _Grouped(ctx.selected[src], counts)
    return out


def _grouped_read(ctx: CaptureContext, n: torch.fx.Node, name: str, reads: list[torch.fx.Node]) -> Convert | None:
    """An op on regrouped rows (:class:`_Grouped`): a slice of the leading rows keeps them so; one position of each
    row's picks (``select`` on axis 1: counted from the end, per row) ends them; anything else is refused."""
    grouped = ctx.selected[reads[0]]
    if len(reads) > 1 or n.args[0] is not reads[0]:
        raise refuse(ctx, f"{name} reading rows a bool mask picked and regrouped as other than its first input")
    rank = _rank(reads[0])
    axis = int(n.args[1]) % rank if len(n.args) > 1 and isinstance(n.args[1], int) else None
    if name == "sym_size":
        return None  # a size read, for a check or a dim
    given = tuple(n.args[2:5])
    start, end, step = (*given, *(0, None, 1)[len(given):])
    whole = start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= SLICE_END))
    if name == "slice" and axis == 0 and whole:
        ctx.selected[n] = grouped  # every leading row, as each row's count is kept
        return None
    if name == "select" and axis == 1 and isinstance(n.args[2], int):
        if n.args[2] >= 0:
            return None  # the first picks are in place
        return lambda env: _select_from_end(ctx, env(reads[0]), grouped.counts, int(n.args[2]))
    raise refuse(ctx, f"indexing with a bool mask, its rows regrouped per leading row and then read by {name} (only "
                      "a slice of every leading row and one position of each row's picks)")


def _select_from_end(ctx: CaptureContext, x: ComputationNode, counts: ComputationNode, i: int) -> ComputationNode:
    """Position ``counts + i`` (``i < 0``) of each leading row of ``x`` along axis 1, that axis dropped."""
    at = ctx.emit(Op.ADD, [counts, as_dtype(ctx, i, "int64")])  # [B, 1]
    return ctx.emit(Op.RESHAPE, [_take_positions(ctx, x, at, 1)], {"shape": (x.shape[0], *x.shape[2:])})


def _take_positions(ctx: CaptureContext, x: ComputationNode, at: ComputationNode, k: Any) -> ComputationNode:
    """``x`` ``[B, S, ...]`` at ``k`` positions of each leading row along axis 1 (``at``, int64 ``[B, k]``):
    ``[B, k, ...]``."""
    lead = (x.shape[0], k) + (1,) * (len(x.shape) - 2)
    index = ctx.emit(Op.EXPAND, [ctx.emit(Op.RESHAPE, [at], {"shape": lead})], {"shape": (x.shape[0], k, *x.shape[2:])})
    return ctx.emit(Op.GATHER_ELEMENTS, [x, index], {"axis": 1})


def _fx_args(n: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_aggregate((n.args, n.kwargs), lambda a: out.append(a) if isinstance(a, torch.fx.Node) else None)
    return out


def _keeps_rows(n: torch.fx.Node) -> bool:
    """A reduction over named axes, none of them the first (``dim`` positional or keyword)."""
    dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    if dims is None or isinstance(dims, bool):
        return False
    rank = _rank(n.args[0])
    dims = [dims] if isinstance(dims, int) else list(dims)
    return bool(dims) and all(isinstance(d, int) and d % rank != 0 for d in dims)


def _first_axis_kept(n: torch.fx.Node) -> bool:
    """The result's first axis is the input's first, the same size (views, and a product on the rows' features)."""
    src, out = n.args[0].meta.get("val"), n.meta.get("val")
    outs = out if isinstance(out, tuple | list) else [out]
    if not isinstance(src, torch.Tensor) or not outs or not all(isinstance(o, torch.Tensor) and o.dim() for o in outs):
        return False
    name = n.target.overloadpacket.__name__
    if name in ("matmul", "mm", "bmm") and src.dim() < 2:
        return False
    if name == "transpose" and 0 in (int(a) % src.dim() for a in n.args[1:]):
        return False
    if name == "permute" and int(n.args[1][0]) % src.dim() != 0:
        return False
    if name in ("slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "squeeze", "flatten",
                "unflatten") and len(n.args) > 1 and isinstance(n.args[1], int) and n.args[1] % src.dim() == 0:
        return False
    return all(o.shape[0] is src.shape[0] or o.shape[0] == src.shape[0] for o in outs)


def _broadcasts_rows(n: torch.fx.Node, other: torch.fx.Node) -> bool:
    """Whether a tensor beside picked rows broadcasts along them (no row axis of its own)."""
    out, val = n.meta.get("val"), other.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(out, torch.Tensor):
        return True
    return val.dim() < out.dim() or val.shape[0] == 1
