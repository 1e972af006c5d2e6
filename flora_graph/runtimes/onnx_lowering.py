"""The ONNX driver: lower a :class:`~flora_graph.ir.Graph` to an ONNX ``ModelProto``.

Each op's ONNX rule lives with the op in its :mod:`flora_graph.ops` family module
(``OPS[op].onnx(ctx, node, out)``); this module holds the driver: the
:class:`LoweringContext` every rule appends through, :func:`lower` / :func:`to_onnx`, and the
checker. Graph inputs and outputs keep their names, named dims become ``dim_param``
(``"batch"``, ``"batch*seq"``), weights become initializers named after their params, and
``onnx.checker`` (``full_check``) runs on every export, with the big weights declared as
typed inputs so that it never serializes them (:func:`check_lowered`). An input with a
default (``Graph.input_defaults``, such as an adapter slot's rank-0 weights) is an input
with a same-named initializer, which ONNX Runtime lets a feed override. Float16/bfloat16
arithmetic is computed in float32 between two ``Cast`` nodes, as the numpy reference does.
Writing files is :mod:`flora_graph.runtimes.onnx_writer`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flora_graph.errors import FloraGraphError, UnsupportedOpError
from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op, OpGroup
from flora_graph.ir.verify import verify
from flora_graph.ops import OPS
from flora_graph.ops._onnx import ONNX_DTYPES, split_key

__all__ = [
    "DEFAULT_OPSET", "DIM_MAX_KEY", "MIN_OPSET", "ONNX_DTYPES", "LoweringContext", "OnnxExportError", "add_initializer",
    "check_lowered", "check_model", "lower", "tensor_header", "to_onnx",
]

DEFAULT_OPSET = 20  # native Gelu; onnxruntime >= 1.17 runs it
MIN_OPSET = 18  # Split takes its sizes as an input; LayerNormalization exists
DIM_MAX_KEY = "flora_graph.dim_max"
"""Model metadata: the graph's ``dim_max`` as JSON (``{"seq": 64}``: a scan's one chunk per call)."""
Lowering = Callable[["LoweringContext", ComputationNode, str], None]
_WIDENED = frozenset({"float16", "bfloat16"})  # computed in float32, like the reference
_ANY_DTYPE = OpGroup.Movement | {Op.IDENTITY}  # ops that never widen


class OnnxExportError(FloraGraphError):
    """An ONNX model could not be built, checked or written (names the graph or file)."""


class LoweringContext:
    """The state of one export: ONNX nodes and initializers, and the value name of each IR node.

    ``dtype`` is the compute dtype of the node being lowered (float32 for widened nodes).
    """

    def __init__(self, graph: Graph, opset: int, live: list[ComputationNode], contrib: bool = False) -> None:
        self.graph, self.opset = graph, opset
        self.contrib = contrib  # an op's rule may use ONNX Runtime's contrib ops (com.microsoft)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.weights: dict[str, np.ndarray] = {}  # big float initializers, kept as arrays until written
        self.names: dict[ComputationNode, str] = {}
        self.dtype = "float32"
        self.split_reps: dict[tuple[Any, ...], dict[int, ComputationNode]] = {}
        self.sink_attentions: list[Any] = []  # KVCacheAttentions with sinks, spelled out (ops.kv_attention.SinkAttention)
        self._used: set[str] = {n.name for n in graph.inputs} | set(graph.outputs)
        self._memo: dict[tuple[Any, ...], str] = {}
        self._node_names: set[str] = set()
        self._current: ComputationNode | None = None
        self._widen = False
        for n in graph.inputs:
            self.names[n] = n.name
            if n.name in graph.input_defaults:  # an overridable initializer: the input may be left out
                arr = np.require(graph.input_defaults[n.name], requirements="C")
                self.initializers[n.name] = numpy_helper.from_array(arr, n.name)
        for out, n in graph.outputs.items():  # an op writes straight into the first output naming it
            if n.op not in OpGroup.Leaf and n not in self.names:
                self.names[n] = out
        for n in live:
            if n.op not in OpGroup.Leaf and n not in self.names:
                self.names[n] = self.fresh(n.name)
            if n.op is Op.SPLIT:
                self.split_reps.setdefault(split_key(n), {}).setdefault(n.attrs["index"], n)

    def fresh(self, hint: str) -> str:
        """A value name not used yet, derived from ``hint``."""
        return _unique(hint, self._used)

    def snapshot(self) -> tuple[Any, ...]:
        """What has been emitted so far, for :meth:`restore` (a fusion that finds it cannot apply after all)."""
        return (list(self.nodes), dict(self.initializers), dict(self.weights), dict(self._memo), set(self._used),
                set(self._node_names))

    def restore(self, snap: tuple[Any, ...]) -> None:
        """Go back to :meth:`snapshot` ``snap``."""
        nodes, initializers, weights, memo, used, node_names = snap
        self.nodes[:] = nodes
        for table, saved in ((self.initializers, initializers), (self.weights, weights), (self._memo, memo)):
            table.clear()
            table.update(saved)
        self._used, self._node_names = set(used), set(node_names)

    def begin(self, node: ComputationNode | None, widen: bool = False) -> None:
        """Start lowering ``node`` (``None``: the graph's own glue); ``widen`` computes it in float32."""
        self._current, self._widen = node, widen
        self.dtype = "float32" if widen or node is None else node.dtype

    def emit(self, op_type: str, inputs: list[str], outputs: list[str] | int | None = None, **attrs: Any) -> str:
        """Append an ONNX node; return its first output (fresh names unless ``outputs`` are given)."""
        where = self._current.name if self._current is not None else self.graph.name
        if outputs is None or isinstance(outputs, int):
            outputs = [self.fresh(f"{where}/{op_type}") for _ in range(outputs or 1)]
        name = _unique(where if where not in self._node_names else f"{where}/{op_type}", self._node_names)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def constant(self, array: np.ndarray, hint: str) -> str:
        """A new initializer holding ``array`` (a view of it is kept, not copied, when it is a big weight)."""
        name = self.fresh(hint)
        if _is_weight(array):
            self.weights[name] = array
        else:
            self.initializers[name] = numpy_helper.from_array(np.require(array, requirements="C"), name)
        return name

    def once(self, key: tuple[Any, ...], make: Callable[[], str]) -> str:
        """``make()`` the first time ``key`` is asked for; its result from then on."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def scalar(self, value: float) -> str:
        """A rank-0 initializer of the compute dtype (shared between nodes)."""
        arr = np.array(value, dtype=self.dtype)
        return self.once(("scalar", float(value), self.dtype), lambda: self.constant(arr, f"const_{value:g}"))

    def param(self, const: ComputationNode, *, transposed: bool = False) -> str:
        """The initializer behind ``Const`` node ``const`` (its 2-D transpose when asked), made once."""
        p, arr = const.attrs["param"], self.graph.params[const.attrs["param"]]
        make = (lambda: self.constant(arr.T, f"{p}.T")) if transposed else (lambda: self.constant(arr, p))
        return self.once(("param", p, transposed), make)

    def value(self, node: ComputationNode) -> str:
        """The ONNX value name holding ``node``'s result."""
        return self.param(node) if node.op is Op.CONST else self.names[node]

    def widen(self, name: str, dtype: str) -> str:
        """``name`` cast to float32 when the current node is widened and ``dtype`` is 16-bit float."""
        if not (self._widen and dtype in _WIDENED):
            return name
        return self.once(("cast", name), lambda: self.emit("Cast", [name], to=TensorProto.FLOAT))

    def arg(self, node: ComputationNode, i: int) -> str:
        """Input ``i`` of ``node`` in the compute dtype."""
        return self.widen(self.value(node.inputs[i]), node.inputs[i].dtype)

    def args(self, node: ComputationNode) -> list[str]:
        """All inputs of ``node`` in the compute dtype."""
        return [self.arg(node, i) for i in range(len(node.inputs))]


_WEIGHT_BYTES = 1024  # float initializers this big are written straight from their arrays
_RAW_DTYPES = frozenset({"float16", "float32", "float64"})


def _is_weight(array: np.ndarray) -> bool:
    """Whether ``array`` goes into :attr:`LoweringContext.weights` (a float tensor of at least
    :data:`_WEIGHT_BYTES`; shape-like int64 constants stay inline, shape inference reads them)."""
    return array.dtype.name in _RAW_DTYPES and array.nbytes >= _WEIGHT_BYTES


def _unique(hint: str, used: set[str]) -> str:
    name, k = hint, 0
    while name in used:
        k += 1
        name = f"{hint}_{k}"
    used.add(name)
    return name


# --------------------------------------------------------------------------- export
def _live_nodes(graph: Graph) -> list[ComputationNode]:
    """The nodes the outputs depend on, in graph order; raise ``UnsupportedOpError`` for ops without a lowering."""
    live = graph.live_nodes()
    missing: dict[str, list[str]] = {}
    for n in live:
        if n.op not in OpGroup.Leaf and n.op not in OPS:
            missing.setdefault(n.op.value, []).append(n.name)
    if missing:
        listed = "; ".join(f"{op} (node(s) {', '.join(map(repr, names))})" for op, names in missing.items())
        raise UnsupportedOpError(f"graph {graph.name!r}: no ONNX lowering for {listed}", missing)
    return live


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET, *, check: bool = True, contrib: bool = False,
            max_positions: int | None = None, moe: bool = False) -> onnx.ModelProto:
    """Verify ``graph``, lower the part its outputs need to ONNX at ``opset`` (>= 18), check it.

    ``contrib``: for ONNX Runtime only, use its ``com.microsoft`` contrib ops where its own
    graph optimizer does not (:mod:`flora_graph.runtimes.ort_contrib`). A decoder's attention then
    becomes ``GroupQueryAttention``, which takes right-padded caches (the model's metadata says so);
    ``max_positions`` (the context length) lets it apply the rotary embedding too. ``moe`` (with
    ``contrib``): each mixture-of-experts block becomes one ``com.microsoft.MoE``
    (:mod:`flora_graph.runtimes.ort_moe`), the form 4-bit packages quantize to ``QMoE``; in float a
    block's expert products stay ``Loop`` nodes, whose decode steps are faster on CPU.

    Raises :class:`GraphError` for a graph that does not verify, :class:`UnsupportedOpError`
    listing the ops without a lowering and their nodes, and :class:`OnnxExportError` for a
    bad opset or a model ``onnx.checker`` refuses (``check=False`` skips the checker).
    Every graph input is a model input, in order (with ``contrib``, except one only the fused
    attention made unread, such as ``position_ids``); one with a default is also an initializer
    of its name holding the default.

    The checker (``full_check``: structure, types and shape inference) runs on the model with
    its big weights declared as typed inputs instead of initializers (:func:`check_lowered`),
    so it never serializes the weights and works past protobuf's 2 GiB too.
    """
    model, weights = lower(graph, opset, check=check, contrib=contrib, max_positions=max_positions, moe=moe)
    for name, arr in weights.items():
        add_initializer(model.graph, name, arr)
    return model


def lower(graph: Graph, opset: int = DEFAULT_OPSET, *, check: bool = True, contrib: bool = False,
          max_positions: int | None = None, moe: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """:func:`to_onnx` without the big weights: ``(model, {initializer name: array})``.

    ``model`` holds every node, input, output and small initializer; the arrays (float
    tensors of at least 1 KiB, views of the graph's weights, possibly transposed) are the
    initializers still to add, in order. :func:`save_onnx` writes them straight from the
    arrays; :func:`to_onnx` adds them to the model. Same errors, ``check``, ``contrib``,
    ``max_positions`` and ``moe`` as :func:`to_onnx`.
    """
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise OnnxExportError(f"graph {graph.name!r}: opset {opset} is outside the supported {MIN_OPSET}..{newest}")
    verify(graph)
    for out, n in graph.outputs.items():
        if any(i.name == out and i is not n for i in graph.inputs):
            raise OnnxExportError(f"graph {graph.name!r}: output {out!r} has the name of an input but another value")
    live = _live_nodes(graph)
    ctx = LoweringContext(graph, opset, live, contrib)
    for node in live:
        if node.op in OpGroup.Leaf:
            continue
        widen = node.dtype in _WIDENED and node.op not in _ANY_DTYPE
        ctx.begin(node, widen)
        out = ctx.names[node]
        result = ctx.fresh(f"{out}/float32") if widen else out
        OPS[node.op].onnx(ctx, node, result)
        if widen:
            ctx.emit("Cast", [result], [out], to=ONNX_DTYPES[node.dtype])
    opsets = [helper.make_opsetid("", opset)]
    unread: set[str] = set()
    props: dict[str, str] = {}
    if contrib:
        from flora_graph.runtimes.ort_contrib import (
            CACHE_PADDING_KEY,
            CONTRIB_DOMAIN,
            drop_unread,
            fuse_group_query_attention,
            fuse_skip_rms_norm,
        )
        from flora_graph.runtimes.ort_moe import fuse_mixture_of_experts

        experts = fuse_mixture_of_experts(ctx) if moe else 0
        if experts:
            drop_unread(ctx)  # the routing and the experts' loops the MoE nodes replace
        norms = fuse_skip_rms_norm(ctx)
        attentions, unread = fuse_group_query_attention(ctx, max_positions)
        if attentions:
            props[CACHE_PADDING_KEY] = "right"
        if experts or norms or attentions or any(n.domain == CONTRIB_DOMAIN for n in ctx.nodes):
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    if graph.dim_max:  # what ONNX cannot declare: a reader (the Generator) keeps each call within it
        props[DIM_MAX_KEY] = json.dumps(dict(sorted(graph.dim_max.items())))
    ctx.begin(None)
    _tie_transposed(ctx)
    for out, n in graph.outputs.items():  # outputs that are leaves or repeat a node: Identity
        if ctx.value(n) != out:
            ctx.emit("Identity", [ctx.value(n)], [out])
    inputs = [helper.make_tensor_value_info(n.name, ONNX_DTYPES[n.dtype], list(n.shape)) for n in graph.inputs
              if n.name not in unread]
    outputs = [helper.make_tensor_value_info(k, ONNX_DTYPES[n.dtype], list(n.shape)) for k, n in graph.outputs.items()]
    onnx_graph = helper.make_graph(ctx.nodes, graph.name, inputs, outputs, list(ctx.initializers.values()))
    ir_version = helper.find_min_ir_version_for(opsets[:1])
    model = helper.make_model(onnx_graph, opset_imports=opsets, ir_version=ir_version, producer_name="flora_graph")
    if props:
        helper.set_model_props(model, props)
    if check:
        check_lowered(model, ctx.weights, f"graph {graph.name!r}")
    return model, ctx.weights


def _tie_transposed(ctx: LoweringContext) -> None:
    """Keep a weight lowered both as it is and transposed (an embedding's table and the output layer tied to it) once.

    Each ``MatMul`` of the transposed copy becomes a ``Gemm`` with ``transB`` on the weight itself, its input flattened
    to 2-D and the result given the input's leading dims back; the copy is not written. ONNX Runtime prepacks a
    ``Gemm``'s constant ``B`` as it does a ``MatMul``'s, so the step and the load take as long, and a tied model's
    package is smaller by its table (a Qwen2-0.5B: 0.54 GB of 2.5). A copy something else reads (a subgraph
    included) stays.
    """
    from flora_graph.runtimes.onnx_writer import reads

    for key, name in list(ctx._memo.items()):
        plain = ctx._memo.get(("param", key[1], False)) if key[0] == "param" and key[2] else None
        if plain is None or name not in ctx.weights:
            continue
        readers = [i for i, n in enumerate(ctx.nodes) if name in set(reads(n))]
        if not readers or any(ctx.nodes[i].op_type != "MatMul" or ctx.nodes[i].domain
                              or list(ctx.nodes[i].input[1:]) != [name] or ctx.nodes[i].input[0] == name for i in readers):
            continue
        rows, cols = ctx.weights[name].shape  # [in, out]
        flat = ctx.once(("tied rows", rows), lambda r=rows: ctx.constant(np.array([-1, r], np.int64), "flat_rows"))
        out_dim = ctx.once(("tied cols", cols), lambda c=cols: ctx.constant(np.array([c], np.int64), "out_dim"))
        for i in reversed(readers):
            matmul = ctx.nodes[i]
            x, (y,), where = matmul.input[0], matmul.output, matmul.name or matmul.output[0]
            lead, shape, x2, prod = (ctx.fresh(f"{where}/tied/{part}") for part in ("lead", "shape", "flat", "gemm"))
            ctx.nodes[i:i + 1] = [
                helper.make_node(op, ins, [out], name=_unique(f"{where}/tied/{op}", ctx._node_names), **attrs)
                for op, ins, out, attrs in (
                    ("Shape", [x], lead, {"end": -1}), ("Concat", [lead, out_dim], shape, {"axis": 0}),
                    ("Reshape", [x, flat], x2, {}), ("Gemm", [x2, plain], prod, {"transB": 1}),
                    ("Reshape", [prod, shape], y, {}))]
        del ctx.weights[name]


def check_lowered(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], where: str) -> None:
    """``onnx.checker`` with ``full_check`` on ``model`` plus ``weights`` (the output of :func:`lower`).

    The weights take part as graph inputs of their dtype and shape: every node, type and
    shape is checked as with initializers, without copying or serializing a weight's bytes
    (which the lowering writes from arrays of exactly those dtypes and shapes).
    """
    if not weights:
        check_model(model, where)
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # small: the model without its big weights
    probe.graph.input.extend(
        helper.make_tensor_value_info(k, ONNX_DTYPES[v.dtype.name], list(v.shape)) for k, v in weights.items())
    check_model(probe, where)


def check_model(model: onnx.ModelProto | Path | bytes, where: str) -> None:
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto | bytes) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"{where}: onnx.checker refused the exported model: {exc}") from None


def little_endian(arr: np.ndarray) -> np.ndarray:
    """``arr`` C-contiguous and little-endian, as ONNX ``raw_data`` stores it (no copy when it already is)."""
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _NATIVE_LITTLE):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.ndim == 2 and not arr.flags.c_contiguous and arr.T.flags.c_contiguous:
        return _transposed_copy(arr)
    return np.ascontiguousarray(arr)


def _transposed_copy(view: np.ndarray, block: int = 16) -> np.ndarray:
    """A C-contiguous copy of a transposed 2-D view, copied in column blocks: about 3x faster than
    ``np.ascontiguousarray`` on a large weight, whose strided reads miss the cache on every value."""
    out = np.empty(view.shape, view.dtype)
    for j in range(0, view.shape[1], block):
        out[:, j:j + block] = view[:, j:j + block]
    return out


_NATIVE_LITTLE = np.little_endian


def tensor_header(name: str, arr: np.ndarray) -> onnx.TensorProto:
    """A ``TensorProto`` with ``arr``'s name, dtype and dims, no data."""
    t = TensorProto()
    t.name = name
    known = ONNX_DTYPES.get(arr.dtype.name)  # the IR's dtypes; others (a 4-bit weight's uint8) as onnx maps them
    t.data_type = known if known is not None else helper.np_dtype_to_tensor_dtype(arr.dtype)
    t.dims.extend(int(d) for d in arr.shape)
    return t


def add_initializer(graph: onnx.GraphProto, name: str, arr: np.ndarray) -> None:
    """Append ``arr`` to ``graph`` as initializer ``name`` (little-endian ``raw_data``)."""
    t = graph.initializer.add()
    t.CopyFrom(tensor_header(name, arr))
    t.raw_data = little_endian(arr).tobytes()
