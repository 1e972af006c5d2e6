"""Data movement: ``Reshape``, ``Flatten``, ``Transpose``, ``Concat``, ``Split``, ``Slice``,
``Unsqueeze``, ``Squeeze``, ``Expand``, ``Flip``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. Every op here is in
``OpGroup.Movement`` (it never computes and never widens a dtype). Sizes that may name a
dynamic dim (``Reshape``/``Expand`` targets, ``Slice`` bounds) are attributes of kind
``"dims"``; a ``Slice`` end at or past :data:`SLICE_END` means "to the end".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import AttrSpec
from flora_graph.ir.shapes import (
    Dim,
    add_dims,
    broadcast_shapes,
    canonical_dim,
    difference_range,
    dim_product,
    dim_terms,
    dims_equal,
    divide_dims,
    floor_div_parts,
    floor_divide_dim,
    format_shape,
    normalize_axis,
    one_atom_linear,
    subtract_dims,
)
from flora_graph.ops._infer import same_float_dtype
from flora_graph.ops._onnx import axes_input, dims_tensor, int64, simple, split_key
from flora_graph.ops._torch import bound_expr, dim_expr, dim_source, ints, reshaped, size_product
from flora_graph.ops.registry import define

__all__ = ["SLICE_END", "slice_size"]

SLICE_END = 2**62
"""A ``Slice`` end at or past this value means "to the end" (torch writes ``2**63 - 1``)."""

_MOVEMENT = ("Movement",)


def _req(kind: str) -> AttrSpec:
    return AttrSpec(kind, required=True)


# --------------------------------------------------------------------------- Reshape
def _infer_reshape(shapes, dtypes, attrs):
    x = shapes[0]
    target = attrs["shape"]
    out: list[Dim | None] = []
    infer_at = None
    for i, t in enumerate(target):
        if isinstance(t, str):
            out.append(t)
        elif t == 0:
            if i >= len(x):
                raise ShapeError(f"Reshape: 0 at position {i} but input rank is {len(x)}")
            out.append(canonical_dim(x[i]))
        elif t == -1:
            if infer_at is not None:
                raise ShapeError(f"Reshape: more than one -1 in {target}")
            infer_at = i
            out.append(None)
        elif t > 0:
            out.append(t)
        else:
            raise ShapeError(f"Reshape: invalid target dim {t} in {target}")
    total = dim_product(x)
    known = dim_product([d for d in out if d is not None])
    if infer_at is not None:
        missing = divide_dims(total, known)
        if missing is None:  # cancel the dims both sides share: [batch, t-1, 32] -> (0, 0, -1, 8) leaves 32 / 8
            rest = [canonical_dim(d) for d in x]
            kept = []
            for d in (d for d in out if d is not None):
                if isinstance(d, str) and d in rest:  # a static 0 next to -1 stays ambiguous
                    rest.remove(d)
                else:
                    kept.append(d)
            missing = divide_dims(dim_product(rest), dim_product(kept))
            piece = dim_product(kept)
            if missing is None and isinstance(piece, int) and piece > 0 and \
                    sum(not isinstance(d, int) for d in rest) == 1:
                # one dynamic length cut into pieces of a static size, every other dim kept (Moonshine's frames of
                # 80 samples): the count is exact where the size divides it, the one case where the reshape runs
                total_rest = dim_product(rest)
                g = math.gcd(piece, *(c for c, _ in dim_terms(total_rest)))  # floor(k a / k b) = floor(a / b)
                missing = floor_divide_dim(divide_dims(total_rest, g), piece // g)
        if missing is None:
            raise ShapeError(f"Reshape: cannot infer -1 in {target} for input {format_shape(x)}")
        out[infer_at] = missing
    elif canonical_dim(total) != canonical_dim(known):
        raise ShapeError(f"Reshape: {format_shape(x)} has {total} elements, target {target} has {known}")
    return tuple(out), dtypes[0]  # type: ignore[arg-type]


def _numpy_reshape(x: np.ndarray, *, shape: tuple[int, ...]) -> np.ndarray:
    # -1 is what the dims not copied by a 0 leave over, so [0, -1] stays defined for an empty batch
    rest = math.prod(d for i, d in enumerate(x.shape) if i >= len(shape) or shape[i] != 0)
    infer = rest // math.prod(t for t in shape if t > 0)
    return x.reshape([x.shape[i] if t == 0 else infer if t == -1 else t for i, t in enumerate(shape)])


def _onnx_reshape(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Reshape`` (0 copies a dim, -1 infers one); a named target dim is read off a graph input."""
    ctx.emit("Reshape", [ctx.arg(node, 0), dims_tensor(ctx, node.attrs["shape"], node, "shape")], [out])


def _torch_reshape(node: ComputationNode, args: list[str]) -> str:
    x, shape, target = args[0], node.inputs[0].shape, node.attrs["shape"]
    if any(isinstance(t, str) for t in target):  # a named target dim: every size from the inferred output shape
        return reshaped(x, shape, [dim_expr(d, node, [(x, shape)]) for d in node.shape])
    known = math.prod(t for t in target if t > 0)
    # ONNX: 0 copies the input dim; -1 is what the dims not copied by a 0 leave over (as the reference)
    rest = [j for j in range(len(shape)) if j >= len(target) or target[j] != 0]
    dims = [dim_source(x, shape, i) if t == 0 else size_product(x, shape, rest, known) if t == -1 else str(t)
            for i, t in enumerate(target)]
    return reshaped(x, shape, dims)


define(
    "RESHAPE", "Reshape", (1, 1), {"shape": _req("dims")},
    infer=_infer_reshape, doc="ONNX Reshape: 0 copies a dim, -1 infers one, a name is that dynamic dim.",
    numpy=_numpy_reshape, onnx=_onnx_reshape, torch=_torch_reshape, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Flatten
def _infer_flatten(shapes, dtypes, attrs):
    x = shapes[0]
    axis = attrs["axis"]
    if not -len(x) <= axis <= len(x):
        raise ShapeError(f"Flatten: axis {axis} out of range for rank {len(x)}")
    if axis < 0:
        axis += len(x)
    return (dim_product(x[:axis]), dim_product(x[axis:])), dtypes[0]


def _numpy_flatten(x: np.ndarray, *, axis: int) -> np.ndarray:
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _torch_flatten(node: ComputationNode, args: list[str]) -> str:
    x, shape = args[0], node.inputs[0].shape
    axis = node.attrs["axis"] + len(shape) if node.attrs["axis"] < 0 else node.attrs["axis"]
    lead = size_product(x, shape, range(axis))
    tail = size_product(x, shape, range(axis, len(shape)))
    return reshaped(x, shape, [lead, tail])


define(
    "FLATTEN", "Flatten", (1, 1), {"axis": AttrSpec("int", 1)},
    infer=_infer_flatten, doc="ONNX Flatten to 2-D at axis.",
    numpy=_numpy_flatten, onnx=simple("Flatten", axis="axis"), torch=_torch_flatten, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Transpose
def _infer_transpose(shapes, dtypes, attrs):
    x = shapes[0]
    perm = attrs["perm"]
    if sorted(perm) != list(range(len(x))):
        raise ShapeError(f"Transpose: perm {perm} is not a permutation of {len(x)} axes")
    return tuple(x[p] for p in perm), dtypes[0]


define(
    "TRANSPOSE", "Transpose", (1, 1), {"perm": _req("ints")},
    infer=_infer_transpose, doc="Permute axes.",
    numpy=lambda x, *, perm: np.transpose(x, perm), onnx=simple("Transpose", perm="perm"),
    torch=lambda node, args: f"{args[0]}.permute({ints(node.attrs['perm'])})", groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Concat
def _sum_dims(dims: Sequence[Dim]) -> Dim:
    return add_dims(*dims)  # "past_seq" + "seq" -> "past_seq+seq" (a key/value cache)


def _infer_concat(shapes, dtypes, attrs):
    rank = len(shapes[0])
    axis = normalize_axis(attrs["axis"], rank)
    for s in shapes[1:]:
        if len(s) != rank:
            raise ShapeError(f"Concat: ranks differ ({[format_shape(s) for s in shapes]})")
        for i in range(rank):
            if i != axis and canonical_dim(s[i]) != canonical_dim(shapes[0][i]):
                raise ShapeError(f"Concat: dim {i} differs ({[format_shape(s) for s in shapes]})")
    out = list(shapes[0])
    out[axis] = _sum_dims([s[axis] for s in shapes])
    return tuple(out), same_float_dtype(dtypes)


define(
    "CONCAT", "Concat", (1, None), {"axis": _req("int")},
    infer=_infer_concat, doc="Concatenate along axis.",
    numpy=lambda *xs, axis: np.concatenate(xs, axis=axis), onnx=simple("Concat", axis="axis"),
    torch=lambda node, args: f"torch.cat([{', '.join(args)}], {int(node.attrs['axis'])})", groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Split
def _infer_split(shapes, dtypes, attrs):
    x = shapes[0]
    axis = normalize_axis(attrs["axis"], len(x))
    sizes, index = attrs["sizes"], attrs["index"]
    if not sizes or any(s <= 0 for s in sizes):
        raise ShapeError(f"Split: sizes {sizes} must be positive")
    if not 0 <= index < len(sizes):
        raise ShapeError(f"Split: index {index} out of range for {len(sizes)} pieces")
    if x[axis] != sum(sizes):
        raise ShapeError(f"Split: sizes {sizes} do not add up to dim {axis} = {x[axis]}")
    out = list(x)
    out[axis] = sizes[index]
    return tuple(out), dtypes[0]


def _numpy_split(x: np.ndarray, *, axis: int, sizes: tuple[int, ...], index: int) -> np.ndarray:
    start = sum(sizes[:index])
    where = [slice(None)] * x.ndim
    where[axis % x.ndim] = slice(start, start + sizes[index])
    return x[tuple(where)]


def _onnx_split(ctx: Any, node: ComputationNode, out: str) -> None:
    """One ONNX ``Split`` for every IR ``Split`` sharing input, axis and sizes; duplicates are Identity."""
    key = split_key(node)
    reps, sizes = ctx.split_reps[key], node.attrs["sizes"]

    def emit_split() -> str:  # at the first piece in graph order, writing every live piece's value
        outs = [ctx.names[reps[i]] if i in reps else ctx.fresh(f"{out}/unused_{i}") for i in range(len(sizes))]
        split = int64(ctx, sizes, f"{node.name}/sizes")
        return ctx.emit("Split", [ctx.arg(node, 0), split], outs, axis=key[1])

    ctx.once(("split", *key), emit_split)
    rep = reps[node.attrs["index"]]
    if rep is not node:
        ctx.emit("Identity", [ctx.names[rep]], [out])


def _torch_split(node: ComputationNode, args: list[str]) -> str:
    sizes, index = node.attrs["sizes"], node.attrs["index"]
    return f"{args[0]}.narrow({int(node.attrs['axis'])}, {sum(sizes[:index])}, {sizes[index]})"


define(
    "SPLIT", "Split", (1, 1),
    {"axis": _req("int"), "sizes": _req("ints"), "index": _req("int")},
    infer=_infer_split, doc="The index-th piece of splitting x along axis into sizes.",
    numpy=_numpy_split, onnx=_onnx_split, torch=_torch_split, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Slice
def _bound(v: Dim, size: int) -> int:
    """A static slice bound clamped into ``[0, size]`` as Python slicing does."""
    assert isinstance(v, int)
    if v < 0:
        v += size
    return min(max(v, 0), size)


def _nonnegative(dim: Dim | None) -> bool:
    """Whether ``dim`` is a dim with no negative term (``"seq-1"`` is negative at ``seq = 0``)."""
    if dim is None or (isinstance(dim, int) and dim < 0):
        return False
    return all(c >= 0 for c, _ in dim_terms(dim))


def _nonnegative_within(part: Dim | None, size: Dim) -> bool:
    """Whether ``part`` is at least 0 wherever the axis' ``size`` is (a size is never negative): both linear in one
    atom ``a`` (:func:`~flora_graph.ir.shapes.one_atom_linear`), ``part = g*a + d`` and ``size = s*a + c`` with
    ``g, s > 0``, and ``part >= 0`` at the least ``a`` where ``size >= 0``. Wav2Vec2-Conformer's
    ``x[:, :, :, : w // 2 + 1]`` of ``w = 2n - 1`` relative positions: ``n - 2`` over the atom of ``n = a - 1``,
    ``0`` at the least ``a = 2``."""
    if _nonnegative(part):
        return True
    if part is None or isinstance(part, int) or isinstance(size, int):
        return False
    lp, ls = one_atom_linear(part), one_atom_linear(size)
    if lp is None or ls is None or lp[1] != ls[1]:
        return False
    (g, _, d), (k, _, c) = lp, ls
    if g <= 0 or k <= 0:
        return False
    least = max(0, -(c // k))  # the least a with k*a + c >= 0
    return g * least + d >= 0


def _floor_multiple_of(a: Dim, b: Dim, *, ceil: bool = False) -> bool:
    """Whether ``a`` is ``m * (b // m)`` (at most ``b``), or with ``ceil`` ``m * ((b + m - 1) // m)`` (at least ``b``)."""
    terms = dim_terms(a) if isinstance(a, str) else []
    if len(terms) != 1 or len(terms[0][1]) != 1:
        return False
    parts = floor_div_parts(terms[0][1][0])
    if parts is None or parts[1] != terms[0][0]:
        return False
    m = parts[1]
    return dims_equal(parts[0], add_dims(b, m - 1) if ceil else b)


def slice_size(dim: Dim, start: Dim, end: Dim, step: int) -> Dim:
    """Size of ``x[start:end:step]`` along an axis of size ``dim``; ``ShapeError`` when it is not a dim.

    With a named ``dim``, static bounds of one sign are taken to lie inside it (torch's
    export assumes the same); a named ``end`` over a static ``dim`` is taken to be at most ``dim``.
    """
    if step < 1:
        raise ShapeError(f"Slice: step {step} must be >= 1")
    to_end = isinstance(end, int) and end >= SLICE_END
    if isinstance(dim, int) and isinstance(start, int) and isinstance(end, int):
        s, e = _bound(start, dim), _bound(end, dim)
        return max(0, -(-(e - s) // step))
    if isinstance(start, int) and (to_end or (isinstance(end, str) and dims_equal(end, dim))):
        if start == 0 and step == 1:
            return canonical_dim(dim)
        if start < 0:
            return -(start // step)  # ceil(-start / step)
    elif isinstance(start, int) and isinstance(end, int) and (start >= 0) == (end >= 0):
        return max(0, -(-(end - start) // step))
    elif isinstance(dim, int) and start == 0 and step == 1 and isinstance(end, str):
        return canonical_dim(end)
    if start == 0 and step == 1 and (_floor_multiple_of(end, dim) or _floor_multiple_of(dim, end, ceil=True)):
        return canonical_dim(end)  # x[:m * (d // m)] of d, x[:d] of m * ((d + m - 1) // m): chunks and back
    if start == 0 and step == 1 and isinstance(end, str) and (r := difference_range(dim, end)) is not None \
            and r[0] >= 0:
        return canonical_dim(end)  # SEW's frames n of its upsampled 2*(n//2), padded by at most 1
    negative_end = not to_end and isinstance(end, int) and end < 0
    if negative_end and step == 1 and isinstance(start, int) and start >= 0 \
            and (size := subtract_dims(dim, start - end)) is not None:
        return size  # x[:-1] of a named dim: dim-1, as torch.export sizes it (it assumes dim >= 1)
    if negative_end and step > 1 and isinstance(start, int) and start >= 0 \
            and (rest := subtract_dims(dim, start - end + 1)) is not None:
        # x[a:-b:s] of a named dim: ceil((dim - b - a) / s) = (dim - b - a - 1) // s + 1, as torch.export sizes it
        # (it assumes dim - b > a); Funnel's factorized attention pools x[:-1:2] of its seq + 1 positions
        return add_dims(floor_divide_dim(rest, step), 1)
    if to_end and step == 1 and isinstance(start, int) and start > 0 and (size := subtract_dims(dim, start)) is not None:
        return size  # x[1:] of a named dim: dim-1 likewise (MobileBERT's trigram embedding)
    if to_end and step > 1 and isinstance(start, int) and start >= 0 and not isinstance(dim, int) \
            and (rest := subtract_dims(dim, start + 1)) is not None:
        # x[a::s] of a named dim: ceil((dim - a) / s) = (dim - a - 1) // s + 1 (a strided 3-D convolution's frames)
        return add_dims(floor_divide_dim(rest, step), 1)
    if (step == 1 and not negative_end and _nonnegative_within(start, dim)
            and (to_end or isinstance(dim, int) or _nonnegative_within(subtract_dims(dim, end), dim))):
        size = subtract_dims(dim if to_end else end, start)  # x[past_seq:] of past_seq+seq -> seq
        if _nonnegative_within(size, dim):
            return size
    raise ShapeError(f"Slice: the size of [{start}:{end}:{step}] of a dim {dim} cannot be written as a dim")


def _infer_slice(shapes, dtypes, attrs):
    """ONNX ``Slice`` with positive steps; bounds may name dims (``ends=("seq",))``)."""
    x = list(shapes[0])
    axes, starts, ends, steps = attrs["axes"], attrs["starts"], attrs["ends"], attrs["steps"] or (1,) * len(attrs["axes"])
    if not (len(axes) == len(starts) == len(ends) == len(steps)):
        raise ShapeError(f"Slice: axes {axes}, starts {starts}, ends {ends}, steps {steps} differ in length")
    seen: set[int] = set()
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        i = normalize_axis(a, len(x), what="Slice axis")
        if i in seen:
            raise ShapeError(f"Slice: axis {a} appears twice")
        seen.add(i)
        x[i] = slice_size(x[i], s, e, st)
    return tuple(x), dtypes[0]


def _numpy_slice(x: np.ndarray, *, axes: tuple[int, ...], starts: tuple[int, ...], ends: tuple[int, ...],
                 steps: tuple[int, ...]) -> np.ndarray:
    where = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps or (1,) * len(axes), strict=True):
        where[a % x.ndim] = slice(s, None if e >= SLICE_END else e, st)
    return x[tuple(where)]


def _onnx_slice(ctx: Any, node: ComputationNode, out: str) -> None:
    a = node.attrs
    steps = a["steps"] or (1,) * len(a["axes"])
    ctx.emit("Slice", [ctx.arg(node, 0), dims_tensor(ctx, a["starts"], node, "starts"),
                       dims_tensor(ctx, a["ends"], node, "ends"), int64(ctx, a["axes"], f"{node.name}/axes"),
                       int64(ctx, steps, f"{node.name}/steps")], [out])


def _torch_slice(node: ComputationNode, args: list[str]) -> str:
    """Python slicing; along a named dim with a nonzero start or an end counted from its end, or a static dim
    up to a named end, ``torch.slice_copy`` (a view there makes torch.export guard on the view's contiguity,
    such as ``6*seq != 12``, ``seq != 8`` or ``seq-1 != 1``)."""
    x, shape, a = args[0], node.inputs[0].shape, node.attrs
    local = [(x, shape)]
    where = [":"] * len(shape)
    copies = []
    for axis, s, e, st in zip(a["axes"], a["starts"], a["ends"], a["steps"] or (1,) * len(a["axes"]), strict=True):
        axis %= len(shape)
        start = "" if s == 0 else bound_expr(s, node, local)
        end = "" if isinstance(e, int) and e >= SLICE_END else bound_expr(e, node, local)
        named_cut = isinstance(shape[axis], str) and (s != 0 or (isinstance(e, int) and e < 0))
        if named_cut or (isinstance(shape[axis], int) and isinstance(e, str)):
            copies.append(f"{axis}, {start or 0}, {end or 'None'}, {st}")
        else:
            where[axis] = f"{start}:{end}" + (f":{st}" if st != 1 else "")
    while where and where[-1] == ":":
        where.pop()
    out = f"{x}[{', '.join(where)}]" if where else x
    for c in copies:
        out = f"torch.slice_copy({out}, {c})"
    return out


define(
    "SLICE", "Slice", (1, 1),
    {"axes": _req("ints"), "starts": _req("dims"), "ends": _req("dims"), "steps": AttrSpec("ints", ())},
    infer=_infer_slice,
    doc="ONNX Slice with steps >= 1 (empty: all 1); bounds may name dims; ends >= 2**62 mean the end.",
    numpy=_numpy_slice, onnx=_onnx_slice, torch=_torch_slice, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Unsqueeze, Squeeze
def _infer_unsqueeze(shapes, dtypes, attrs):
    """Insert size-1 dims at ``axes`` (counted in the output's rank, as ONNX)."""
    x, axes = shapes[0], attrs["axes"]
    rank = len(x) + len(axes)
    norm = sorted(normalize_axis(a, rank, what="Unsqueeze axis") for a in axes)
    if not axes or len(set(norm)) != len(norm):
        raise ShapeError(f"Unsqueeze: axes {axes} must be non-empty and distinct")
    rest = iter(x)
    return tuple(1 if i in norm else next(rest) for i in range(rank)), dtypes[0]


def _numpy_unsqueeze(x: np.ndarray, *, axes: tuple[int, ...]) -> np.ndarray:
    return np.expand_dims(x, tuple(a % (x.ndim + len(axes)) for a in axes))


def _torch_unsqueeze(node: ComputationNode, args: list[str]) -> str:
    rank = len(node.shape)
    return args[0] + "".join(f".unsqueeze({a})" for a in sorted(a % rank for a in node.attrs["axes"]))


define(
    "UNSQUEEZE", "Unsqueeze", (1, 1), {"axes": _req("ints")},
    infer=_infer_unsqueeze, doc="Insert size-1 dims at axes of the output.",
    numpy=_numpy_unsqueeze, onnx=axes_input("Unsqueeze"), torch=_torch_unsqueeze, groups=_MOVEMENT,
)


def _infer_squeeze(shapes, dtypes, attrs):
    """Drop the size-1 dims at ``axes``."""
    x, axes = shapes[0], attrs["axes"]
    norm = {normalize_axis(a, len(x), what="Squeeze axis") for a in axes}
    if not axes or len(norm) != len(axes):
        raise ShapeError(f"Squeeze: axes {axes} must be non-empty and distinct")
    for i in norm:
        if x[i] != 1:
            raise ShapeError(f"Squeeze: dim {i} of {format_shape(x)} is not 1")
    return tuple(d for i, d in enumerate(x) if i not in norm), dtypes[0]


def _torch_squeeze(node: ComputationNode, args: list[str]) -> str:
    rank = len(node.inputs[0].shape)
    return args[0] + "".join(f".squeeze({a})" for a in sorted((a % rank for a in node.attrs["axes"]), reverse=True))


define(
    "SQUEEZE", "Squeeze", (1, 1), {"axes": _req("ints")},
    infer=_infer_squeeze, doc="Drop the size-1 dims at axes.",
    numpy=lambda x, *, axes: np.squeeze(x, axis=tuple(a % x.ndim for a in axes)),
    onnx=axes_input("Squeeze"), torch=_torch_squeeze, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Expand
def _infer_expand(shapes, dtypes, attrs):
    """ONNX ``Expand``: the input broadcast against ``shape`` (which may name dims)."""
    target = attrs["shape"]
    for t in target:
        if isinstance(t, int) and t < 0:
            raise ShapeError(f"Expand: negative size {t} in {target}")
    return broadcast_shapes(shapes[0], target), dtypes[0]


def _numpy_expand(x: np.ndarray, *, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape)))


def _onnx_expand(ctx: Any, node: ComputationNode, out: str) -> None:
    ctx.emit("Expand", [ctx.arg(node, 0), dims_tensor(ctx, node.attrs["shape"], node, "shape")], [out])


def _torch_expand(node: ComputationNode, args: list[str]) -> str:
    x, shape = args[0], node.inputs[0].shape
    lead = len(node.shape) - len(shape)
    dims = ["-1" if i >= lead and canonical_dim(shape[i - lead]) == d else dim_expr(d, node, [(x, shape)])
            for i, d in enumerate(node.shape)]
    return f"{x}.expand([{', '.join(dims)}])"


define(
    "EXPAND", "Expand", (1, 1), {"shape": _req("dims")},
    infer=_infer_expand, doc="ONNX Expand: broadcast x against shape (ints or dim names).",
    numpy=_numpy_expand, onnx=_onnx_expand, torch=_torch_expand, groups=_MOVEMENT,
)


# --------------------------------------------------------------------------- Flip
def _infer_flip(shapes, dtypes, attrs):
    norm = [normalize_axis(a, len(shapes[0]), what="Flip axis") for a in attrs["axes"]]
    if len(set(norm)) != len(norm):
        raise ShapeError(f"Flip: axes {attrs['axes']} must be distinct")
    return tuple(shapes[0]), dtypes[0]


def _onnx_flip(ctx: Any, node: ComputationNode, out: str) -> None:
    """ONNX ``Slice`` from -1 to the int64 minimum with step -1 along each axis."""
    axes = node.attrs["axes"]
    if not axes:
        ctx.emit("Identity", [ctx.arg(node, 0)], [out])
        return
    n = len(axes)
    ctx.emit("Slice", [ctx.arg(node, 0), int64(ctx, [-1] * n, f"{node.name}/starts"),
                       int64(ctx, [-(2**63)] * n, f"{node.name}/ends"), int64(ctx, axes, f"{node.name}/axes"),
                       int64(ctx, [-1] * n, f"{node.name}/steps")], [out])


define(
    "FLIP", "Flip", (1, 1), {"axes": _req("ints")},
    infer=_infer_flip, doc="Reverse the order of x along axes (torch.flip).",
    numpy=lambda x, *, axes: np.flip(x, tuple(axes)), onnx=_onnx_flip,
    torch=lambda node, args: f"torch.flip({args[0]}, {ints(node.attrs['axes'])})", groups=_MOVEMENT,
)
