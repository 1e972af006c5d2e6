"""4-bit weights for a package's models: every base ``MatMul`` (or ``Gemm``, its bias then an ``Add``) on a constant
weight becomes ONNX Runtime's ``com.microsoft.MatMulNBits``, and every mixture of experts written as
``com.microsoft.MoE`` (:mod:`flora_graph.runtimes.ort_moe`) a ``QMoE`` whose experts are 4-bit, as the ONNX
Runtime GenAI model builder's ``-p int4`` models are.

A weight ``W`` (``[in, out]`` as ``MatMul`` reads it) is quantized per output column in blocks of
``block_size`` input rows, symmetric round-to-nearest: ``scale = max|w| / 7`` over the block, ``q =
clip(round(w / scale), -8, 7)``, stored as ``q + 8`` (two per byte, the first in the low nibble) with the
default zero point 8. An expert's weight (``[out, in]`` in ``MoE``) is quantized the same way, in ``QMoE``'s
raw layout (``weights_prepacked=0``), where the block size divides both expert widths. With
``accuracy_level`` 0 the kernel multiplies the float activations by the dequantized weights ``q * scale``, so the model computes what a float model of those weights does; 4 (the
model builder's default on CPU) quantizes the activations to int8 as well: faster on CPUs with int8 dot
products, no longer equal to the float model of the 4-bit weights.
LoRA slots keep their float weights (graph inputs), so adapters stay swappable and exact on top of the
quantized base, as QLoRA trains them. An embedding (``Gather`` of a constant ``[vocab, hidden]`` table on axis 0,
``hidden`` a multiple of the block size) becomes ``com.microsoft.GatherBlockQuantized`` over the same 4-bit blocks,
so the vocabulary's table, often the largest weight of a small model, is 4-bit too; an output layer tied to it
reads the very same initializers (one 4-bit copy), as the model builder's models do.

A weight read from a GPTQ, AWQ or compressed-tensors checkpoint (:mod:`flora_graph.quantized_checkpoints`;
``grids``: its layers' weights as the model holds them, each with its
:class:`~flora_graph.quantized_checkpoints.Int4Grid`) keeps the checkpoint's own 4-bit blocks instead: its codes,
scales and zero points (``MatMulNBits``' ``zero_points``, asymmetric), in blocks of the largest size above that
divides the checkpoint's group size (a group's scale repeated over its blocks), so the package's weights are the
checkpoint's, exactly; packed layers whose members share their groups keep them too. A layer quantized in activation
order (its groups no runs of rows) has its rows sorted by group and reads its input's columns in that order (a
``Gather`` before its ``MatMulNBits``).

A weight is constant when it is an initializer that is not also a graph input (a LoRA slot's empty default
is one), or ``Transpose`` / ``Concat`` / ``Identity`` of constants
(how a packed q/k/v or gate/up layer reads its members' weights), in the graph or an enclosing one (the base
branch's ``If``); one quantized initializer serves every ``MatMul`` of one weight. A last block that the weight's rows
do not fill is zero-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flora_graph.runtimes.onnx_writer import subgraphs

if TYPE_CHECKING:
    from flora_graph.quantized_checkpoints import Int4Grid

__all__ = ["ACCURACY_LEVELS", "INT4_BLOCK_SIZES", "quantize_block", "quantize_weights"]

INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes ``MatMulNBits`` takes (a power of two, at least 16)."""

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
"""``MatMulNBits``' ``accuracy_level``: the least precision of its activations (0: the input's, 1: fp32,
2: fp16, 3: bf16, 4: int8)."""

_CONTRIB = "com.microsoft"


def _nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit values ``q`` (uint8, an even last axis) two to a byte along the last axis, the first in the low four bits:
    ``MatMulNBits``' layout of its blocks and of its zero points."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def quantize_block(w: np.ndarray, block_size: int, rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(packed, scales)`` of ``w`` ``[out, in]``: ``packed`` uint8 ``[out, blocks, block_size / 2]``, ``scales``
    ``[out * blocks]`` in ``w``'s dtype, ``blocks = ceil(in / block_size)`` (the last block zero-padded, as
    ``MatMulNBits`` reads it). Done ``rows`` output rows at a time, so the float temporaries stay small next to
    a large weight."""
    out, k = w.shape
    n_blocks = -(-k // block_size)
    packed = np.empty((out, n_blocks, block_size // 2), np.uint8)
    scales = np.empty((out, n_blocks), w.dtype)
    for r0 in range(0, out, rows):
        part = np.zeros((min(rows, out - r0), n_blocks * block_size), np.float32)
        part[:, :k] = w[r0:r0 + rows]
        blocks = part.reshape(len(part), n_blocks, block_size)
        scale = np.abs(blocks).max(-1) / 7.0
        scale[scale == 0] = 1.0  # an all-zero block: any scale gives zeros
        q = (np.clip(np.rint(blocks / scale[..., None]), -8, 7).astype(np.int16) + 8).astype(np.uint8)
        packed[r0:r0 + rows] = _nibbles(q)
        scales[r0:r0 + rows] = scale
    return packed, scales.reshape(-1)


def _memory_key(a: np.ndarray) -> tuple:
    """What tells apart the arrays that view one memory alike (a weight and its base branch's copy read it)."""
    return a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str


def grid_blocks(grid: Int4Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray | None] | None:
    """``(packed, scales, zero_points, block_size, order)`` of a checkpoint's layer in ``MatMulNBits``' layout:
    ``packed`` uint8 ``[out, blocks, block_size / 2]`` (its codes), ``scales`` float32 ``[out * blocks]``,
    ``zero_points`` uint8 ``[out, ceil(blocks / 2)]`` (two per byte, the first in the low four bits); the block size
    is the largest of :data:`INT4_BLOCK_SIZES` dividing the group size, each group's scale and zero point repeated
    over its blocks. ``order``: ``None`` where the groups are runs of consecutive rows, else (GPTQ's activation
    order) the input rows sorted by group, the order in which the layer reads its input's columns (the rows of
    ``packed`` are in that order). ``None`` where no block size divides the group size or the sorted groups are
    no runs of ``group_size`` rows."""
    out, k = grid.codes.shape
    order = None if grid.in_order else np.argsort(grid.groups, kind="stable")
    if order is not None and not np.array_equal(grid.groups[order], np.arange(k) // grid.group_size):
        return None
    group = min(grid.group_size, k)
    fits = [b for b in INT4_BLOCK_SIZES if group % b == 0 or (group == k and b <= k)]
    exact = [b for b in fits if group % b == 0]
    if not fits:
        return None
    block = max(exact) if exact else min(fits)  # one group over rows no block size divides: the last block padded
    n_blocks = -(-k // block)
    codes = np.zeros((out, n_blocks * block), np.uint8)
    codes[:, :k] = grid.codes if order is None else grid.codes[:, order]
    codes = codes.reshape(out, n_blocks, block)
    owner = np.minimum(np.arange(n_blocks) * block // grid.group_size, grid.scales.shape[1] - 1)
    scales = np.ascontiguousarray(grid.scales[:, owner], np.float32)
    zeros = np.zeros((out, n_blocks + n_blocks % 2), np.uint8)
    zeros[:, :n_blocks] = grid.zeros[:, owner]
    return _nibbles(codes), scales.reshape(-1), _nibbles(zeros), block, order


def _concat_grids(grids: list[Int4Grid]) -> Int4Grid | None:
    """The grid of layers stacked along their outputs (a packed q/k/v layer), where they share their groups."""
    from flora_graph.quantized_checkpoints import Int4Grid

    first = grids[0]
    if any(g.group_size != first.group_size or not np.array_equal(g.groups, first.groups) for g in grids):
        return None
    cat = lambda f: np.concatenate([f(g) for g in grids])  # noqa: E731
    return Int4Grid(cat(lambda g: g.codes), cat(lambda g: g.scales), cat(lambda g: g.zeros), first.groups,
                    first.group_size)


class _Quantizer:
    def __init__(self, model: onnx.ModelProto, block_size: int, accuracy_level: int,
                 weights: dict[str, np.ndarray] | None, embeddings: bool = True,
                 grids: Sequence[tuple[np.ndarray, Int4Grid]] = ()) -> None:
        self.block_size, self.accuracy_level, self.weights = block_size, accuracy_level, weights
        # a checkpoint layer's [out, in] weight's memory -> its grid (a leaf value of that memory, or its transpose,
        # is that layer's weight)
        self.grids = {_memory_key(w): g for w, g in grids}
        self.grid_of: dict[str, tuple[Int4Grid, int]] = {}  # value name -> (grid, the value's output axis)
        self.kept: list[str] = []  # the MatMulNBits nodes written from checkpoint grids
        self.embeddings = embeddings
        self.top = model.graph
        self.fed = {i.name for i in self.top.input}  # an initializer that is also an input is a default (a slot's)
        self.inits = {t.name: t for t in self.top.initializer if t.name not in self.fed}
        # weight signature -> (inputs, K, N, block size, the order the input's columns are read in or None, whether
        # the blocks are a checkpoint's)
        self.made: dict[str, tuple[list[str], int, int, int, str | None, bool]] = {}
        self.by_memory: dict[tuple, tuple[str, str]] = {}  # an [out, in] matrix's memory -> (packed, scales)
        self.shapes: set[str] = set()  # the Reshape targets made
        self.count = 0

    def _value(self, name: str, producers: list[dict[str, onnx.NodeProto]], memo: dict) -> tuple[str, np.ndarray] | None:
        """``(signature, value)`` of ``name`` when it is constant (see the module docstring), else ``None``."""
        if name in memo:
            return memo[name]
        node = next((p[name] for p in producers if name in p), None)
        got = None
        if node is None:
            if name in self.inits:
                got = (name, numpy_helper.to_array(self.inits[name]))
            elif self.weights is not None and name in self.weights and name not in self.fed:
                got = (name, self.weights[name])
            if got is not None and got[1].ndim == 2 and self.grids:
                for axis, view in ((0, got[1]), (1, got[1].T)):
                    if _memory_key(view) in self.grids:
                        self.grid_of[name] = (self.grids[_memory_key(view)], axis)
        elif not node.domain and node.op_type in ("Transpose", "Concat", "Identity"):
            parts = [self._value(i, producers, memo) for i in node.input]
            if all(p is not None for p in parts):
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                arrays = [p[1] for p in parts]
                if node.op_type == "Transpose":
                    value = np.transpose(arrays[0], attrs.get("perm"))
                elif node.op_type == "Concat":
                    value = np.concatenate(arrays, axis=attrs["axis"])
                else:
                    value = arrays[0]
                sig = f"{node.op_type}{sorted(attrs.items())}({','.join(p[0] for p in parts)})"
                got = (sig, value)
                self._track_grid(node, attrs, value)
        memo[name] = got
        return got

    def _track_grid(self, node: onnx.NodeProto, attrs: dict, value: np.ndarray) -> None:
        """The grid of ``node``'s 2-D output where its inputs' grids make it one: a transpose or a copy of a
        checkpoint layer's weight, or layers' weights concatenated along their outputs."""
        got = [self.grid_of.get(i) for i in node.input]
        if value.ndim != 2 or any(g is None for g in got):
            return
        if node.op_type == "Identity":
            self.grid_of[node.output[0]] = got[0]
        elif node.op_type == "Transpose" and list(attrs.get("perm", [1, 0])) == [1, 0]:
            self.grid_of[node.output[0]] = (got[0][0], 1 - got[0][1])
        elif node.op_type == "Concat" and all(axis == attrs["axis"] % 2 for _, axis in got):
            joined = _concat_grids([g for g, _ in got])
            if joined is not None:
                self.grid_of[node.output[0]] = (joined, got[0][1])

    def _weight(self, n: onnx.NodeProto, producers: list[dict[str, onnx.NodeProto]], memo: dict
                ) -> tuple[str, np.ndarray, Int4Grid | None] | None:
        """``(signature, W [in, out], grid)`` of the constant weight a ``MatMul`` or a plain ``Gemm`` (``alpha = beta =
        1``, ``A`` not transposed, a bias of ``[out]`` at most) multiplies by, else ``None``; ``grid``: its checkpoint
        grid, where it has one."""
        if n.domain or n.op_type not in ("MatMul", "Gemm"):
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMul" and len(n.input) != 2:
            return None
        if n.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                     or attrs.get("beta", 1.0) != 1.0 or len(n.input) not in (2, 3)):
            return None
        got = self._value(n.input[1], producers, memo)
        if got is None or got[1].ndim != 2 or got[1].dtype not in (np.float32, np.float16):
            return None
        sig, w = got
        grid = self.grid_of.get(n.input[1])
        if attrs.get("transB", 0):  # Gemm's B as [out, in]
            sig, w = f"T({sig})", w.T
            grid = grid and (grid[0], 1 - grid[1])
        return sig, w, grid[0] if grid is not None and grid[1] == 1 else None

    def _store(self, base: str, packed: np.ndarray, scales: np.ndarray, *more: np.ndarray) -> tuple[str, ...]:
        """Names of new initializers holding ``packed``, ``scales`` and ``more`` (zero points; kept with ``weights``
        when given)."""
        names = (f"{base}.weight", f"{base}.scales", f"{base}.zero_points")[:2 + len(more)]
        arrays = (packed, scales, *more)
        if self.weights is not None:  # written with the other weights, from the arrays
            self.weights.update(zip(names, arrays, strict=True))
        else:
            self.top.initializer.extend(numpy_helper.from_array(a, n) for n, a in zip(names, arrays, strict=True))
        return names

    def _blocks(self, w: np.ndarray, base: str) -> tuple[str, str]:
        """``(packed, scales)`` initializers of ``w`` (``[out, in]``) in 4-bit blocks, made once per matrix: two
        views of one memory (a tied embedding and the transposed output layer on it) share them."""
        key = _memory_key(w)
        if key not in self.by_memory:
            self.by_memory[key] = self._store(base, *quantize_block(w, self.block_size))
        return self.by_memory[key]

    def _shape(self, dims: list[int]) -> str:
        """An int64 initializer holding ``dims`` (a ``Reshape`` target), one per shape."""
        name = "int4.shape." + "x".join(map(str, dims))
        if name not in self.shapes:
            self.top.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), name))
            self.shapes.add(name)
        return name

    def _embedding(self, n: onnx.NodeProto, producers: list[dict[str, onnx.NodeProto]], memo: dict) -> list[onnx.NodeProto] | None:
        """``GatherBlockQuantized`` in place of a ``Gather`` (axis 0) of a constant ``[vocab, hidden]`` float table
        whose rows the block size divides, else ``None``."""
        if n.domain or n.op_type != "Gather" or len(n.input) != 2:
            return None
        if any(a.name == "axis" and helper.get_attribute_value(a) != 0 for a in n.attribute):
            return None
        got = self._value(n.input[0], producers, memo)
        if got is None or got[1].ndim != 2 or got[1].dtype not in (np.float32, np.float16) \
                or got[1].shape[1] % self.block_size:
            return None
        table = got[1]
        rows, width = table.shape
        packed, scales = self._blocks(table, f"{n.name or n.output[0]}.int4")
        base = f"{n.output[0]}/int4"  # value names are unique model-wide, a base branch's copies included
        data2d, scales2d = f"{base}.data", f"{base}.scales"
        return [helper.make_node("Reshape", [packed, self._shape([rows, width // 2])], [data2d], name=f"{base}/data"),
                helper.make_node("Reshape", [scales, self._shape([rows, width // self.block_size])], [scales2d],
                                 name=f"{base}/scales"),
                helper.make_node("GatherBlockQuantized", [data2d, n.input[1], scales2d], list(n.output), name=n.name,
                                 domain=_CONTRIB, bits=4, block_size=self.block_size, gather_axis=0, quantize_axis=1)]

    def _experts(self, n: onnx.NodeProto, producers: list[dict[str, onnx.NodeProto]], memo: dict) -> onnx.NodeProto | None:
        """The ``QMoE`` taking the place of a float ``MoE`` node whose expert weights are constant and whose
        widths the block size divides, else ``None``."""
        if n.domain != _CONTRIB or n.op_type != "MoE" or len(n.input) < 5:
            return None
        got = [self._value(n.input[i], producers, memo) for i in (2, 4)]
        if any(w is None or w[1].ndim != 3 or w[1].dtype != np.float32 or w[1].shape[2] % self.block_size
               for w in got):
            return None
        quantized = []
        for i, (_, w) in zip((2, 4), got, strict=True):  # [experts, out, in]: each expert as MatMulNBits stores it
            key = _memory_key(w)  # a base branch's copy: once
            if key not in self.by_memory:
                parts = [quantize_block(w[e], self.block_size) for e in range(w.shape[0])]
                packed = np.stack([p.reshape(w.shape[1], -1) for p, _ in parts])
                scales = np.stack([sc.reshape(w.shape[1], -1) for _, sc in parts])
                self.by_memory[key] = self._store(f"{n.output[0]}.fc{1 if i == 2 else 2}.int4", packed, scales)
            quantized.append(self.by_memory[key])
        bias = [n.input[i] if len(n.input) > i else "" for i in (3, 5)]
        inputs = [n.input[0], n.input[1], *quantized[0], bias[0], *quantized[1], bias[1]]
        while not inputs[-1]:
            inputs.pop()
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        return helper.make_node("QMoE", inputs, list(n.output), name=n.name, domain=_CONTRIB, **attrs,
                                expert_weight_bits=4, block_size=self.block_size, accuracy_level=self.accuracy_level,
                                weights_prepacked=0)

    def graph(self, g: onnx.GraphProto, outer: list[dict[str, onnx.NodeProto]]) -> None:
        producers = [{o: n for n in g.node for o in n.output}, *outer]
        memo: dict = {}
        rewritten: list[tuple[int, list[onnx.NodeProto]]] = []
        for i, n in enumerate(g.node):
            for sub in subgraphs(n):
                self.graph(sub, producers)
            experts = self._experts(n, producers, memo)
            if experts is not None:
                rewritten.append((i, [experts]))
                self.count += 1
                continue
            embedding = self._embedding(n, producers, memo) if self.embeddings else None
            if embedding is not None:
                rewritten.append((i, embedding))
                self.count += 1
                continue
            got = self._weight(n, producers, memo)
            if got is None:
                continue
            sig, w, grid = got
            k, out = w.shape
            bias = n.input[2] if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] else None
            if sig not in self.made:
                exact = grid_blocks(grid) if grid is not None else None
                base = f"{n.name or n.output[0]}.int4"
                if exact is not None:  # the checkpoint's own blocks
                    packed, scales, zeros, block, order = exact
                    blocks = list(self._store(base, packed, scales.astype(w.dtype), zeros))
                    if order is not None:
                        self.top.initializer.append(numpy_helper.from_array(order.astype(np.int64), f"{base}.order"))
                    self.made[sig] = (blocks, k, out, block, None if order is None else f"{base}.order", True)
                else:  # [out, in]: a view, read in row chunks
                    self.made[sig] = (list(self._blocks(w.T, base)), k, out, self.block_size, None, False)
            blocks, k, out, block, order, from_grid = self.made[sig]
            if from_grid:
                self.kept.append(n.name or n.output[0])
            product = f"{n.output[0]}/int4" if bias else n.output[0]
            nodes = []
            x = n.input[0]
            if order is not None:  # activation order: the input's columns in the order of the weight's rows
                x = f"{n.output[0]}/int4.ordered"
                nodes.append(helper.make_node("Gather", [n.input[0], order], [x], name=f"{n.name}/order", axis=-1))
            nodes.append(helper.make_node("MatMulNBits", [x, *blocks], [product], name=n.name, domain=_CONTRIB,
                                          K=k, N=out, bits=4, block_size=block, accuracy_level=self.accuracy_level))
            if bias:  # Gemm's C, broadcast over the rows as Gemm adds it
                nodes.append(helper.make_node("Add", [product, bias], [n.output[0]], name=f"{n.name}/bias"))
            rewritten.append((i, nodes))
            self.count += 1
        for i, nodes in reversed(rewritten):  # in place: every reader still comes after its producer
            g.node[i].CopyFrom(nodes[0])
            for extra in reversed(nodes[1:]):
                g.node.insert(i + 1, extra)


def _drop_unread(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None) -> None:
    """Remove nodes whose outputs nothing reads (in any graph, subgraphs included) and initializers (and
    ``weights``) nothing reads."""

    def reads(g: onnx.GraphProto) -> set[str]:
        out = {o.name for o in g.output}
        for n in g.node:
            out.update(n.input)
            for sub in subgraphs(n):
                out |= reads(sub)
        return out

    def prune(g: onnx.GraphProto, outer_reads: set[str]) -> None:
        while True:
            read = reads(g) | outer_reads
            keep = [n for n in g.node if any(o in read for o in n.output) or not n.output]
            if len(keep) == len(g.node):
                break
            del g.node[:]
            g.node.extend(keep)
        for n in g.node:
            for sub in subgraphs(n):
                prune(sub, set())

    prune(model.graph, set())
    read = reads(model.graph)
    keep = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for name in [n for n in (weights or {}) if n not in read]:
        del weights[name]


def quantize_weights(model: onnx.ModelProto, block_size: int = 32, accuracy_level: int = 0,
                     weights: dict[str, np.ndarray] | None = None, *, embeddings: bool = True,
                     grids: Sequence[tuple[np.ndarray, Int4Grid]] = (), kept: list[str] | None = None) -> int:
    """Quantize ``model``'s constant ``MatMul`` and ``MoE`` expert weights to 4 bits in place, and with
    ``embeddings`` its embedding tables (see the module docstring); return how many nodes now read 4-bit
    weights. ``weights``: the big initializers kept apart (:func:`~flora_graph.runtimes.onnx_lowering.lower`'s),
    read and updated in place (the 4-bit ones added, the float ones no node reads any more removed). ``grids``:
    ``(weight [out, in], grid)`` of a 4-bit checkpoint's layers, each weight the array whose memory the
    model's initializers view; a ``MatMul`` reading one keeps its grid's blocks (the names of those nodes are
    appended to ``kept`` where given). Raises
    ``ValueError`` for a block size not in :data:`INT4_BLOCK_SIZES` or an accuracy level not in
    :data:`ACCURACY_LEVELS`."""
    if block_size not in INT4_BLOCK_SIZES:
        raise ValueError(f"int4 block size {block_size!r}: expected one of {list(INT4_BLOCK_SIZES)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"int4 accuracy level {accuracy_level!r}: expected one of {list(ACCURACY_LEVELS)}")
    q = _Quantizer(model, block_size, accuracy_level, weights, embeddings, grids)
    q.graph(model.graph, [])
    if kept is not None:
        kept.extend(q.kept)
    if q.count:
        if not any(o.domain == _CONTRIB for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(_CONTRIB, 1))
        _drop_unread(model, weights)
    return q.count
