"""ONNX Runtime's contrib ops for a lowered model, where ORT's own graph optimizer misses them.

:func:`~flora_graph.runtimes.onnx_lowering.lower` writes standard ONNX; given
``contrib=True`` it then calls :func:`fuse_skip_rms_norm` and :func:`fuse_group_query_attention`
on the nodes it emitted, while the IR shapes are still at hand. The result runs on ONNX Runtime
only (its ``com.microsoft`` domain), which is what the ONNX Runtime GenAI package is for.

- ``fuse_skip_rms_norm``: a residual ``Add(a, b)`` read by ``RMSNormalization`` becomes one
  ``com.microsoft.SkipSimplifiedLayerNormalization(a, b, scale)`` whose fourth output is the
  sum, so the residual stream's other readers keep their value. ONNX Runtime (1.32) makes this
  node itself from ``Add`` + its own ``SimplifiedLayerNormalization`` but not from the opset-23
  ``RMSNormalization``; in a decoder it is every norm but the first. The kernel adds in the
  input dtype and normalizes in float32, as ``Add`` + ``RMSNormalization(stash_type=1)`` do.
  Fused only where ``a`` and ``b`` have one shape of rank 2 or 3 (no broadcasting), the norm is
  over the last axis with a scale, in float32 or float16.
- ``fuse_group_query_attention``: a decoder's ``Attention`` nodes on the causal mask of
  ``attention_mask`` become ``com.microsoft.GroupQueryAttention`` (3-D: rotary inside, q/k/v
  packed; 4-D over caches concatenated outside: the concatenations become its presents, and a full
  rotary of per-head values transposed to 4-D goes inside as well; a sliding window as
  ``local_window_size``), as the ONNX Runtime GenAI model builder writes them; the model's caches are
  then right-padded (:data:`CACHE_PADDING_KEY`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flora_graph.ir.shapes import canonical_dim
from flora_graph.runtimes.onnx_writer import reads

if TYPE_CHECKING:
    from flora_graph.ir.node import ComputationNode
    from flora_graph.runtimes.onnx_lowering import LoweringContext

__all__ = ["CACHE_PADDING_KEY", "CONTRIB_DOMAIN", "STATE_INPUT", "drop_unread", "fuse_group_query_attention", "fuse_skip_rms_norm"]

CONTRIB_DOMAIN = "com.microsoft"
_FLOATS = frozenset({"float32", "float16"})
_STASH_FLOAT = 1


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fuse_skip_rms_norm(ctx: LoweringContext) -> int:
    """Rewrite ``ctx.nodes`` in place (see the module docstring); return the number of norms fused.

    The fused node takes the ``Add``'s place in the node list, so every reader of the sum or
    the norm still comes after its producer.
    """
    ir: dict[str, ComputationNode] = {name: node for node, name in ctx.names.items()}
    producer = {out: i for i, n in enumerate(ctx.nodes) for out in n.output}
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for j, norm in enumerate(ctx.nodes):
        if norm.op_type != "RMSNormalization" or norm.domain or len(norm.input) != 2:
            continue
        i = producer.get(norm.input[0])
        add = ctx.nodes[i] if i is not None else None
        if add is None or add.op_type != "Add" or add.domain or i in replace:
            continue
        a, b, s = (ir.get(x) for x in (add.input[0], add.input[1], add.output[0]))
        if a is None or b is None or s is None or s.dtype not in _FLOATS or a.dtype != s.dtype or b.dtype != s.dtype:
            continue
        shape = tuple(canonical_dim(d) for d in s.shape)
        if len(shape) not in (2, 3) or any(tuple(canonical_dim(d) for d in x.shape) != shape for x in (a, b)):
            continue
        if _attr(norm, "axis", -1) % len(shape) != len(shape) - 1 or _attr(norm, "stash_type", 1) != _STASH_FLOAT:
            continue
        replace[i] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=f"{norm.name}/skip", domain=CONTRIB_DOMAIN,
            epsilon=float(_attr(norm, "epsilon", 1e-5)))
        drop.add(j)
    if replace:
        ctx.nodes[:] = [replace.get(k, n) for k, n in enumerate(ctx.nodes) if k not in drop]
    return len(replace)


CACHE_PADDING_KEY = "flora_graph.cache_padding"
"""Model metadata written by :func:`fuse_group_query_attention`: ``"right"`` when the model's
attention reads each row's length from ``attention_mask`` (its row sums) and its caches are
right-padded, rather than masking positions anywhere."""

STATE_INPUT = re.compile(r"^past\.\d+\.(conv|recurrent)(\.\d+)?$")
"""The name of a recurrent layer's fixed-size state among a decoder's inputs (``past.{i}.conv``, ``past.{i}.recurrent``,
``past.{i}.conv.1``, ...). A state takes every token a row is given, padding included, in order: its rows must be
left-padded, which :func:`fuse_group_query_attention` (right-padded caches) would break."""

_ATTENTION_ATTRS = frozenset({"q_num_heads", "kv_num_heads", "scale", "softcap", "is_causal"})
GQA_HEAD_MULTIPLE = 16
"""ONNX Runtime's GroupQueryAttention (CPU) refuses at run time a head size that is not a multiple of this."""


class _Nodes:
    """Producers and constants of ``ctx.nodes`` for the pattern matches below."""

    def __init__(self, ctx: LoweringContext) -> None:
        self.ctx = ctx
        self.producer = {out: n for n in ctx.nodes for out in n.output if out}
        self.readers: dict[str, int] = {}  # value name -> how many node inputs read it
        for n in ctx.nodes:
            for i in reads(n):  # a subgraph's (a Loop body's) reads of outer values count
                self.readers[i] = self.readers.get(i, 0) + 1
        self.inputs = {n.name for n in ctx.graph.inputs}
        self.attention_reads: dict[str, int] = {}  # value name -> how many 4-D Attention keys / values read it
        for n in ctx.nodes:
            if n.op_type == "Attention" and not n.domain and len(n.input) == 4:
                for i in n.input[1:3]:
                    self.attention_reads[i] = self.attention_reads.get(i, 0) + 1

    def node(self, value: str, op_type: str) -> onnx.NodeProto | None:
        n = self.producer.get(value)
        return n if n is not None and n.op_type == op_type and not n.domain else None

    def const(self, value: str) -> np.ndarray | None:
        if value in self.ctx.initializers:
            return numpy_helper.to_array(self.ctx.initializers[value])
        arr = self.ctx.weights.get(value)
        return None if arr is None else np.asarray(arr)

    def is_const(self, value: str, want: list | int | float) -> bool:
        arr = self.const(value)
        return arr is not None and arr.size == (len(want) if isinstance(want, list) else 1) and \
            [float(v) for v in arr.reshape(-1)] == [float(v) for v in (want if isinstance(want, list) else [want])]

    def unsqueezed(self, value: str, axes: list[int]) -> str | None:
        n = self.node(value, "Unsqueeze")
        return n.input[0] if n is not None and len(n.input) == 2 and self.is_const(n.input[1], axes) else None

    def dim(self, value: str) -> tuple[str, int] | None:
        """``(input, axis)`` when ``value`` is ``Squeeze(Shape(input, start=axis, end=axis + 1))`` of a graph input."""
        sq = self.node(value, "Squeeze")
        if sq is None or (len(sq.input) > 1 and not self.is_const(sq.input[1], [0])):
            return None
        shape = self.node(sq.input[0], "Shape")
        if shape is None or shape.input[0] not in self.inputs:
            return None
        start, end = _attr(shape, "start", 0), _attr(shape, "end", None)
        return (shape.input[0], start) if end == start + 1 else None


def _token_positions_of(m: _Nodes, value: str, attention_mask: str) -> bool:
    """Whether ``value`` is ``CumSum(attention_mask, axis 1) - 1`` (through a ``Cast``): each slot's token position."""
    sub = m.node(value, "Sub")
    cum = m.node(sub.input[0], "CumSum") if sub is not None and m.is_const(sub.input[1], 1) else None
    if cum is None or not m.is_const(cum.input[1], 1) or _attr(cum, "exclusive", 0) or _attr(cum, "reverse", 0):
        return False
    src = m.node(cum.input[0], "Cast")
    return (src.input[0] if src is not None else cum.input[0]) == attention_mask


def _position_band(m: _Nodes, gt: onnx.NodeProto, sub: onnx.NodeProto, attention_mask: str) -> bool:
    """Whether ``Greater(gt)`` compares token positions (:mod:`flora_graph.frontend.sliding_window`): key
    positions ``Unsqueeze(pos, [1, 2])`` against ``Sub(Unsqueeze(Slice(pos, ...), [1, 3]), window)``, the new
    tokens' positions (a slice on axis 1), ``pos`` the token positions of ``attention_mask``."""
    keys = m.unsqueezed(gt.input[0], [1, 2])
    queries = m.unsqueezed(sub.input[0], [1, 3])
    cut = m.node(queries, "Slice") if queries is not None else None
    return (keys is not None and cut is not None and cut.input[0] == keys and len(cut.input) >= 4
            and m.is_const(cut.input[3], [1]) and _token_positions_of(m, keys, attention_mask))


def _causal_mask_of(m: _Nodes, mask: str) -> tuple[str, str, int] | None:
    """``(attention_mask, a past input, window)`` when ``mask`` is exactly ``key position <= query
    position`` and ``attention_mask[batch, key position]`` (``[batch, 1, seq, total]``, the causal mask
    of a cache whose positions run from 0 to the mask's width), with, for a sliding window of ``window``
    keys, ``key position > query position - window`` as well, over cache positions or token positions
    (``window`` 0: none); else ``None``."""
    both = m.node(mask, "And")
    if both is None:
        return None
    for causal_name, pad_name in ((both.input[0], both.input[1]), (both.input[1], both.input[0])):
        pad = m.unsqueezed(pad_name, [1, 2])
        cast = m.node(pad, "Cast") if pad is not None else None
        if cast is None or _attr(cast, "to", None) != onnx.TensorProto.BOOL or cast.input[0] not in m.inputs:
            continue
        le, window = m.node(causal_name, "LessOrEqual"), 0
        band = m.node(causal_name, "And") if le is None else None
        if band is not None:  # a sliding window: (key > query - window) and (key <= query)
            for gt_name, le_name in ((band.input[0], band.input[1]), (band.input[1], band.input[0])):
                gt, le = m.node(gt_name, "Greater"), m.node(le_name, "LessOrEqual")
                sub = m.node(gt.input[1], "Sub") if gt is not None else None
                width = m.const(sub.input[1]) if sub is not None else None
                w = float(width.reshape(-1)[0]) if width is not None and width.size == 1 else 0.0
                if (le is not None and w == int(w) > 0
                        and ((gt.input[0] == le.input[0] and sub.input[0] == le.input[1])
                             or _position_band(m, gt, sub, cast.input[0]))):
                    window = int(w)
                    break
            else:
                continue
        if le is None:
            continue
        keys, queries = m.unsqueezed(le.input[0], [0, 1, 2]), m.unsqueezed(le.input[1], [0, 1, 3])
        kr = m.node(keys, "Range") if keys else None
        qr = m.node(queries, "Range") if queries else None
        if kr is None or qr is None or not (m.is_const(kr.input[0], 0) and m.is_const(kr.input[2], 1)
                                            and m.is_const(qr.input[2], 1)):
            continue
        total, start = m.dim(kr.input[1]), m.dim(qr.input[0])
        if total != (cast.input[0], 1) or m.dim(qr.input[1]) != total or start is None or start[1] != 2:
            continue
        return cast.input[0], start[0], window
    return None


def _angles_of(m: _Nodes, value: str) -> tuple[str, str] | None:
    """``(positions input, inv_freq)`` when ``value`` is ``Cast(Unsqueeze(position_ids, [2]), float) * inv_freq``
    (a constant): the rotary's angles, whose cos/sin its tables are; else ``None``."""
    mul = m.node(value, "Mul")
    cast = m.node(mul.input[0], "Cast") if mul is not None else None
    pos = m.unsqueezed(cast.input[0], [2]) if cast is not None else None
    if pos not in m.inputs or _attr(cast, "to", None) != onnx.TensorProto.FLOAT or m.const(mul.input[1]) is None:
        return None
    return pos, mul.input[1]


def _scaled_trig(m: _Nodes, value: str, op_type: str) -> tuple[str, float] | None:
    """``(angles, scale)`` when ``value`` is ``op_type(angles)``, or that times a one-element constant ``scale``
    (YaRN's attention scaling, gpt-oss); else ``None``."""
    trig = m.node(value, op_type)
    if trig is not None:
        return trig.input[0], 1.0
    mul = m.node(value, "Mul")
    for a, b in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])) if mul is not None else ():
        trig, c = m.node(a, op_type), m.const(b)
        if trig is not None and c is not None and c.size == 1:
            return trig.input[0], float(c.reshape(-1)[0])
    return None


def _rotary_of(m: _Nodes, value: str) -> tuple[str, str, str, float] | None:
    """``(input, positions input, inv_freq, scale)`` when ``value`` is a full, non-interleaved
    ``RotaryEmbedding(input, cos, sin)`` whose tables are ``cos``/``sin`` of
    ``position_ids * inv_freq`` (a constant), both times ``scale`` (1 where not scaled), else ``None``."""
    rot = m.node(value, "RotaryEmbedding")
    if rot is None or len(rot.input) != 3 or _attr(rot, "interleaved", 0) or _attr(rot, "rotary_embedding_dim", 0) \
            or _attr(rot, "num_heads", 0) <= 0:
        return None
    cos, sin = _scaled_trig(m, rot.input[1], "Cos"), _scaled_trig(m, rot.input[2], "Sin")
    if cos is None or sin is None or cos != sin:
        return None
    angles = _angles_of(m, cos[0])
    return None if angles is None else (rot.input[0], *angles, cos[1])


def _rotary_4d_of(m: _Nodes, value: str) -> tuple[str, str, str, onnx.NodeProto | None] | None:
    """``(x, positions input, inv_freq, norm)`` when ``value`` is a full, non-interleaved ``RotaryEmbedding`` of
    ``Transpose(x, [0, 2, 1, 3])`` (``x`` ``[batch, seq, heads, head_dim]``, the transpose read by it alone), or
    of ``norm``, an ``RMSNormalization`` over the last axis of that transpose (Gemma 3's per-head norm, which
    the transpose does not change), whose tables are ``cos``/``sin`` of ``position_ids * inv_freq``, given
    ``[batch, seq, head_dim / 2]`` (a ``Squeeze`` of their ``Unsqueeze`` on axis 1, how the 4-D rotary reads
    them), else ``None``."""
    rot = m.node(value, "RotaryEmbedding")
    if rot is None or len(rot.input) != 3 or _attr(rot, "interleaved", 0) or _attr(rot, "rotary_embedding_dim", 0) \
            or _attr(rot, "num_heads", 0):
        return None
    norm = m.node(rot.input[0], "RMSNormalization")
    if norm is not None and (len(norm.input) != 2 or _attr(norm, "axis", -1) not in (-1, 3)
                             or m.readers.get(norm.output[0], 0) != 1):
        return None
    t = m.node(norm.input[0] if norm is not None else rot.input[0], "Transpose")
    if t is None or list(_attr(t, "perm", [])) != [0, 2, 1, 3] or m.readers.get(t.output[0], 0) != 1:
        return None
    tables = []
    for name, op in ((rot.input[1], "Cos"), (rot.input[2], "Sin")):
        sq = m.node(name, "Squeeze")
        un = m.node(sq.input[0], "Unsqueeze") if sq is not None and len(sq.input) == 2 and m.is_const(sq.input[1], [1]) else None
        trig = m.node(un.input[0], op) if un is not None and len(un.input) == 2 and m.is_const(un.input[1], [1]) else None
        if trig is None:
            return None
        tables.append(trig.input[0])
    angles = _angles_of(m, tables[0]) if tables[0] == tables[1] else None
    return None if angles is None else (t.input[0], *angles, norm)


def _four_d_form(m: _Nodes, ir: dict[str, ComputationNode], n: onnx.NodeProto) -> tuple[int, int, int, str, str] | None:
    """``(heads, kv_heads, head_dim, new key, new value)`` when ``n`` is a 4-D ``Attention(q, key, value,
    mask)`` (``[batch, heads, seq, head_dim]``) whose key and value are ``Concat(past, new)`` on the
    sequence axis of a past graph input, read by nothing else but 4-D attentions (a layer reading another's
    cache, as Gemma 3n's and Gemma 4's last layers do, reads the same concatenation) and the graph's outputs;
    else ``None``."""
    if len(n.input) != 4 or len(n.output) != 1 or not all(n.input):
        return None
    concats = [m.node(n.input[i], "Concat") for i in (1, 2)]
    if any(c is None or len(c.input) != 2 or _attr(c, "axis", 0) not in (2, -2) or c.input[0] not in m.inputs
           or m.readers.get(c.output[0], 0) != m.attention_reads.get(c.output[0], 0) for c in concats):
        return None
    q, k = ir.get(n.input[0]), ir.get(concats[0].input[1])
    dims = [canonical_dim(d) for d in (*q.shape, *k.shape)] if q is not None and k is not None else []
    if len(dims) != 8 or not all(isinstance(d, int) for d in (dims[1], dims[3], dims[5], dims[7])) or dims[3] != dims[7]:
        return None
    return dims[1], dims[5], dims[3], concats[0].input[1], concats[1].input[1]


def _four_d_group_query_attention(ctx: LoweringContext, m: _Nodes, n: onnx.NodeProto, form: tuple[int, int, int, str, str],
                                  seqlens: str, total: str, attrs: dict,
                                  tables: Callable[[str], tuple[str, str]] | None = None,
                                  writes: bool = True) -> list[onnx.NodeProto]:
    """The nodes replacing the 4-D attention ``n`` (see :func:`_four_d_form`): q and the new key and value
    to ``[batch, seq, heads * head_dim]``, GroupQueryAttention writing the concatenations' outputs as its
    presents (``writes``; else, a layer reading another's cache, to presents of its own no one reads: the
    same past and new keys and values, so the same cache), and its output back to ``[batch, heads, seq,
    head_dim]`` under ``n``'s output name.

    Where q and k are full rotary embeddings of ``[batch, seq, heads, head_dim]`` values transposed
    (:func:`_rotary_4d_of`, as Qwen3 and Gemma 3 write them after their per-head norms) on one
    ``position_ids * inv_freq`` and ``tables`` gives the cos/sin caches of ``inv_freq``, the kernel applies
    the rotary (``do_rotary``) to those values reshaped, and a value transposed from ``[batch, seq, kv_heads,
    head_dim]`` goes in reshaped: no transpose and no rotary outside the kernel."""
    h, kv, d, key, value = form
    past_k, past_v = m.producer[n.input[1]].input[0], m.producer[n.input[2]].input[0]
    nodes = []

    def shape(dims: list[int]) -> str:
        return ctx.once(("gqa.shape", *dims), lambda: ctx.constant(np.array(dims, np.int64), "gqa.shape"))

    def flat(value: str, heads: int) -> str:
        r = ctx.fresh(f"{value}/3d")
        nodes.append(helper.make_node("Reshape", [value, shape([0, 0, heads * d])], [r], name=f"{n.name}/gqa/{r}"))
        return r

    def to_3d(value: str, heads: int) -> str:
        t = ctx.fresh(f"{value}/bshd")
        nodes.append(helper.make_node("Transpose", [value], [t], name=f"{n.name}/gqa/{t}", perm=[0, 2, 1, 3]))
        return flat(t, heads)

    def untransposed(form: tuple[str, str, str, onnx.NodeProto | None], heads: int) -> str:
        x, _, _, norm = form
        if norm is not None:  # over the last axis: the same on the untransposed values
            y = ctx.fresh(f"{norm.output[0]}/bshd")
            nodes.append(helper.make_node("RMSNormalization", [x, norm.input[1]], [y], name=f"{norm.name}/bshd",
                                          **{a.name: helper.get_attribute_value(a) for a in norm.attribute if a.name != "axis"}))
            x = y
        return flat(x, heads)

    rq, rk = (_rotary_4d_of(m, n.input[0]), _rotary_4d_of(m, key)) if tables is not None else (None, None)
    inv = m.const(rq[2]) if rq is not None else None
    extra = []
    if rq is not None and rk is not None and rq[1:3] == rk[1:3] and inv is not None and inv.ndim == 1 and 2 * inv.size == d:
        q3, k3 = untransposed(rq, h), untransposed(rk, kv)
        extra, attrs = list(tables(rq[2])), {**attrs, "do_rotary": 1}
        t = m.node(value, "Transpose")
        v3 = flat(t.input[0], kv) if t is not None and list(_attr(t, "perm", [])) == [0, 2, 1, 3] else to_3d(value, kv)
    else:
        q3, k3, v3 = to_3d(n.input[0], h), to_3d(key, kv), to_3d(value, kv)
    out3, out4 = ctx.fresh(f"{n.output[0]}/3d"), ctx.fresh(f"{n.output[0]}/bshd")
    presents = [n.input[1], n.input[2]] if writes else [ctx.fresh(f"{n.name}/gqa/present_key"),
                                                       ctx.fresh(f"{n.name}/gqa/present_value")]
    nodes.append(helper.make_node("GroupQueryAttention", [q3, k3, v3, past_k, past_v, seqlens, total, *extra],
                                  [out3, *presents], name=f"{n.name}/gqa", domain=CONTRIB_DOMAIN, **attrs))
    nodes.append(helper.make_node("Reshape", [out3, shape([0, 0, h, d])], [out4], name=f"{n.name}/gqa/{out4}"))
    nodes.append(helper.make_node("Transpose", [out4], [n.output[0]], name=f"{n.name}/gqa/out", perm=[0, 2, 1, 3]))
    return nodes


def fuse_group_query_attention(ctx: LoweringContext, max_positions: int | None = None) -> tuple[int, set[str]]:
    """Every ``Attention`` of a decoder becomes ``com.microsoft.GroupQueryAttention``, or none does.

    Fused only when each head is a multiple of :data:`GQA_HEAD_MULTIPLE` wide, each ``Attention`` takes ``(q, k, v, mask, past_key, past_value)`` in 3-D
    (heads packed in the last dim) with its caches as outputs, or ``(q, Concat(past_key, k),
    Concat(past_value, v), mask)`` in 4-D (see :func:`_four_d_form`), and ``mask`` is the causal mask of
    ``attention_mask`` over cache positions ``0 .. width - 1``, with or without a sliding window
    (see :func:`_causal_mask_of`).

    GroupQueryAttention reads only each row's length (``attention_mask``'s row sums) and keeps
    the caches right-padded, so the fused model's contract is different (and none is fused where
    anything but the attentions' masks reads ``attention_mask``, such as a state-space layer zeroing
    padded tokens): a row's tokens start at cache position 0 (left padding is not masked), and the mask's width is either the past's
    length plus the new tokens' (present = past + new, as before) or at most the past's length
    (the past is a fixed buffer that present shares, written in place at each row's length). The
    caller records that in the metadata (:data:`CACHE_PADDING_KEY`).

    Where ``q`` and ``k`` are full rotary embeddings of ``position_ids * inv_freq`` and
    ``max_positions`` is given, the kernel applies the rotary from ``[max_positions, head_dim / 2]``
    cos/sin tables (positions follow from the row lengths), and ``q``/``k``/``v`` cut by one
    ``Split`` from one projection go in packed.

    Returns ``(attentions fused, graph inputs no node reads any more)``: ``position_ids`` is one
    of those once the rotary moved into the kernel.
    """
    m = _Nodes(ctx)
    if any(STATE_INPUT.match(name) for name in m.inputs):  # a recurrent layer's state needs left padding
        return 0, set()
    ir: dict[str, ComputationNode] = {name: node for node, name in ctx.names.items()}
    found = []
    # attentions with sinks, which the lowering spelled out, stand in as the 3-D Attention they would be
    sinks: dict[int, str] = {}
    candidates = [n for n in ctx.nodes if n.op_type == "Attention" and not n.domain]
    for d in ctx.sink_attentions:
        q, k, v, past_k, past_v, mask, sink = d.inputs
        stand_in = helper.make_node("Attention", [q, k, v, mask, past_k, past_v], list(d.outputs),
                                    q_num_heads=d.q_heads, kv_num_heads=d.kv_heads,
                                    **{key: val for key, val in (("scale", d.scale), ("softcap", d.softcap)) if val})
        sinks[id(stand_in)] = sink
        candidates.append(stand_in)
    for n in candidates:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        q = ir.get(n.input[0]) if n.input else None
        common = (set(attrs) <= _ATTENTION_ATTRS and not attrs.get("is_causal", 0)
                  and q is not None and q.dtype in _FLOATS)
        three_d = (common and len(n.input) == 6 and len(n.output) == 3 and all(n.input) and all(n.output)
                   and "q_num_heads" in attrs and "kv_num_heads" in attrs
                   and n.input[4] in m.inputs and n.input[5] in m.inputs and len(q.shape) == 3)
        four_d = _four_d_form(m, ir, n) if common and not three_d and "q_num_heads" not in attrs else None
        mask = _causal_mask_of(m, n.input[3]) if three_d or four_d else None
        head = 0  # each head's width, where it is known
        if four_d is not None:
            head = four_d[2]
        elif three_d and isinstance(canonical_dim(q.shape[-1]), int):
            head = int(canonical_dim(q.shape[-1])) // int(attrs["q_num_heads"])
        if (mask is None or (found and mask[0] != found[0][2]) or ir[mask[0]].dtype not in ("int64", "int32")
                or head % GQA_HEAD_MULTIPLE):
            return 0, set()  # one attention the kernel cannot take: the model keeps one contract, the standard one
        found.append((n, attrs, mask[0], q, mask[2], four_d))
    if not found:
        return 0, set()
    saved = ctx.snapshot()
    ctx.begin(None)
    start = len(ctx.nodes)
    attention_mask = found[0][2]
    mask_dtype = np.dtype(ir[attention_mask].dtype)
    sums = ctx.emit("ReduceSum", [attention_mask, ctx.constant(np.array([1], np.int64), "gqa.axes")], keepdims=0)
    last = ctx.emit("Sub", [sums, ctx.constant(np.array(1, mask_dtype), "gqa.one")])
    seqlens = ctx.emit("Cast", [last], [ctx.fresh("gqa.seqlens_k")], to=onnx.TensorProto.INT32)
    width = ctx.emit("Gather", [ctx.emit("Shape", [attention_mask]), ctx.constant(np.array(1, np.int64), "gqa.axis1")])
    total = ctx.emit("Cast", [width], [ctx.fresh("gqa.total_sequence_length")], to=onnx.TensorProto.INT32)
    prelude = ctx.nodes[start:]  # reads graph inputs only: goes first
    del ctx.nodes[start:]
    tables: dict[str, tuple[str, str]] = {}

    def tables_of(inv_freq: str, scale: float = 1.0) -> tuple[str, str]:
        """The ``[max_positions, head_dim / 2]`` cos/sin caches of ``inv_freq`` (times ``scale``), made once."""
        key = inv_freq if scale == 1.0 else f"{inv_freq}*{scale!r}"
        if key not in tables:
            angles = np.arange(max_positions, dtype=np.float32)[:, None] * m.const(inv_freq).astype(np.float32)[None]
            dt = np.dtype(found[0][3].dtype)
            factor = np.float32(scale)
            tables[key] = (ctx.constant((np.cos(angles) * factor).astype(dt), "gqa.cos_cache"),
                           ctx.constant((np.sin(angles) * factor).astype(dt), "gqa.sin_cache"))
        return tables[key]

    replace: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    written: set[str] = set()  # the presents a GroupQueryAttention writes
    for n, attrs, _, q, window, four_d in found:
        if four_d is not None:
            h, kv, _, _, _ = four_d
        else:
            h, kv = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
        gqa_attrs = {"num_heads": h, "kv_num_heads": kv, "scale": float(attrs.get("scale", 0.0)),
                     "softcap": float(attrs.get("softcap", 0.0))}
        if window:  # ONNX Runtime's kernel keeps local_window_size keys, the query's own among them (checked in tests)
            gqa_attrs["local_window_size"] = window
        if four_d is not None:
            writes = n.input[1] not in written  # the first reader of a cache writes it; later ones read the same
            written.add(n.input[1])
            replace[id(n)] = _four_d_group_query_attention(ctx, m, n, four_d, seqlens, total, gqa_attrs,
                                                           tables_of if max_positions else None, writes)
            dropped |= {id(m.producer[n.input[1]]), id(m.producer[n.input[2]])}  # GQA writes the presents
            continue
        inputs = [n.input[0], n.input[1], n.input[2], n.input[4], n.input[5], seqlens, total]
        rq, rk = _rotary_of(m, n.input[0]), _rotary_of(m, n.input[1])
        head = int(canonical_dim(q.shape[-1])) // h if isinstance(canonical_dim(q.shape[-1]), int) else 0
        inv = m.const(rq[2]) if rq is not None else None
        if (max_positions and rq is not None and rk is not None
                and rq[1:] == rk[1:] and inv is not None and inv.ndim == 1 and 2 * inv.size == head):
            tables_of(rq[2], rq[3])
            q_in, k_in, v_in = rq[0], rk[0], n.input[2]
            split = m.producer.get(q_in)
            if (split is not None and split.op_type == "Split" and not split.domain and list(split.output) == [q_in, k_in, v_in]
                    and _attr(split, "axis", 0) in (-1, 2)):
                q_in, k_in, v_in = split.input[0], "", ""
            inputs = [q_in, k_in, v_in, n.input[4], n.input[5], seqlens, total, *tables_of(rq[2], rq[3])]
            gqa_attrs["do_rotary"] = 1
        if id(n) in sinks:  # the spelled-out attention's last node becomes the kernel, which writes the caches too
            inputs += [""] * (11 - len(inputs)) + [sinks[id(n)]]  # head_sink, after position_ids and attention_bias
            y, present_k, present_v = (m.producer[o] for o in n.output)
            replace[id(y)] = [helper.make_node("GroupQueryAttention", inputs, list(n.output), name=f"{y.name}/gqa",
                                               domain=CONTRIB_DOMAIN, **gqa_attrs)]
            dropped |= {id(present_k), id(present_v)}
            continue
        replace[id(n)] = [helper.make_node("GroupQueryAttention", inputs, list(n.output), name=f"{n.name}/gqa",
                                           domain=CONTRIB_DOMAIN, **gqa_attrs)]
    ctx.nodes[:] = prelude + [r for n in ctx.nodes if id(n) not in dropped for r in replace.get(id(n), [n])]
    read = drop_unread(ctx)  # what only the old attention read (mask, rotary tables, the split)
    own = {id(n) for n in prelude}  # the row lengths GQA reads off the mask
    if any(attention_mask in n.input for n in ctx.nodes if id(n) not in own):
        # the mask read past the attentions (a state-space layer zeroing padded tokens): right-padded rows would
        # change what those readers see, so the model keeps the standard contract
        ctx.restore(saved)
        return 0, set()
    return len(found), {name for name in m.inputs if name in m.readers and name not in read}


def drop_unread(ctx: LoweringContext) -> set[str]:
    """Drop the nodes of ``ctx.nodes`` whose outputs nothing reads (through subgraphs) and no graph output
    is, then the initializers and weights nothing reads any more (graph inputs' defaults kept); return
    the value names still read, the graph's outputs among them."""
    keep = {ctx.value(n) for n in ctx.graph.outputs.values()} | set(ctx.graph.outputs)
    inputs = {n.name for n in ctx.graph.inputs}
    nodes = ctx.nodes
    while True:
        read = {i for n in nodes for i in reads(n)} | keep
        alive = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    ctx.nodes[:] = nodes
    for table in (ctx.initializers, ctx.weights):
        for name in [k for k in table if k not in read and k not in inputs]:
            del table[name]
    return read
