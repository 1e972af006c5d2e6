"""Lower a :class:`~flora_graph.ir.Graph` to an ONNX ``ModelProto`` and save it.

:data:`ONNX_LOWERING` maps every non-leaf op to ``lower(ctx, node, out)``, which appends
the ONNX nodes computing ``node`` into the value named ``out``. Graph inputs and outputs
keep their names, named dims become ``dim_param`` (``"batch"``, ``"batch*seq"``), weights
become initializers named after their params, and ``onnx.checker`` (``full_check``) runs on
every export, with the big weights declared as typed inputs so that it never serializes
them (:func:`check_lowered`). ``Split`` nodes sharing input, axis and sizes become one multi-output ONNX
``Split``. Float16/bfloat16 arithmetic is computed in float32 between two ``Cast`` nodes,
as the numpy reference does. :func:`save_onnx` writes atomically, a graph's weights straight
from their arrays (:func:`lower` keeps them out of the proto), and switches to external data
past :data:`EXTERNAL_DATA_THRESHOLD` bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flora_graph.errors import FloraGraphError, UnsupportedOpError
from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import FLOAT_DTYPES, Op, OpGroup
from flora_graph.ir.serialize import atomic_file, atomic_write_bytes
from flora_graph.ir.shapes import is_static
from flora_graph.ir.verify import verify

__all__ = [
    "DEFAULT_OPSET", "EXTERNAL_DATA_THRESHOLD", "MIN_OPSET", "ONNX_DTYPES", "ONNX_LOWERING",
    "LoweringContext", "OnnxExportError", "check_lowered", "lower", "model_size", "save_onnx", "to_onnx",
]

DEFAULT_OPSET = 20  # native Gelu; onnxruntime >= 1.17 runs it
MIN_OPSET = 18  # Split takes its sizes as an input; LayerNormalization exists
EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes; past it save_onnx writes weights to "<file>.data"
ONNX_DTYPES = {
    "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16, "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE, "int32": TensorProto.INT32, "int64": TensorProto.INT64, "bool": TensorProto.BOOL,
}
_WIDENED = frozenset({"float16", "bfloat16"})  # computed in float32, like the reference
_ANY_DTYPE = OpGroup.Movement | {Op.IDENTITY}  # ops that never widen


class OnnxExportError(FloraGraphError):
    """An ONNX model could not be built, checked or written (names the graph or file)."""


class LoweringContext:
    """The state of one export: ONNX nodes and initializers, and the value name of each IR node.

    ``dtype`` is the compute dtype of the node being lowered (float32 for widened nodes).
    """

    def __init__(self, graph: Graph, opset: int, live: list[ComputationNode]) -> None:
        self.graph, self.opset = graph, opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.weights: dict[str, np.ndarray] = {}  # big float initializers, kept as arrays until written
        self.names: dict[ComputationNode, str] = {}
        self.dtype = "float32"
        self.split_reps: dict[tuple[Any, ...], dict[int, ComputationNode]] = {}
        self._used: set[str] = {n.name for n in graph.inputs} | set(graph.outputs)
        self._memo: dict[tuple[Any, ...], str] = {}
        self._node_names: set[str] = set()
        self._current: ComputationNode | None = None
        self._widen = False
        self.extra_inputs: list[onnx.ValueInfoProto] = []  # graph inputs a lowering adds (e.g. swappable weights)
        for n in graph.inputs:
            self.names[n] = n.name
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


def split_key(node: ComputationNode) -> tuple[Any, ...]:
    """Split nodes with the same key are pieces of one ONNX ``Split``."""
    rank = len(node.inputs[0].shape)
    return (id(node.inputs[0]), node.attrs["axis"] % rank, tuple(node.attrs["sizes"]))


# --------------------------------------------------------------------------- lowerings
Lowering = Callable[[LoweringContext, ComputationNode, str], None]


def _simple(op_type: str, **attrs: str) -> Lowering:
    """A lowering to one ``op_type`` node with the same inputs and the IR ``attrs`` renamed (onnx=ir)."""

    def lower(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
        ctx.emit(op_type, ctx.args(node), [out], **{k: node.attrs[v] for k, v in attrs.items()})

    lower.__doc__ = f"Lowers to ONNX ``{op_type}``."
    return lower


def _linear(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``x @ W.T + b``: ``Gemm(transB=1)`` for 2-D float x, else ``MatMul`` with a pre-transposed W."""
    x, w = node.inputs[0], node.inputs[1]
    bias = [ctx.arg(node, 2)] if len(node.inputs) == 3 else []
    if len(x.shape) == 2 and node.dtype in FLOAT_DTYPES:
        ctx.emit("Gemm", [ctx.arg(node, 0), ctx.arg(node, 1), *bias], [out], transB=1)
        return
    if w.op is Op.CONST:
        wt = ctx.widen(ctx.param(w, transposed=True), w.dtype)
    else:
        wt = ctx.emit("Transpose", [ctx.arg(node, 1)], perm=[1, 0])
    y = ctx.emit("MatMul", [ctx.arg(node, 0), wt], None if bias else [out])
    if bias:
        ctx.emit("Add", [y, *bias], [out])


def _conv2d(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``Conv`` with symmetric pads ``[ph, pw, ph, pw]``."""
    (ph, pw), kernel = node.attrs["padding"], [int(d) for d in node.inputs[1].shape[2:]]
    ctx.emit("Conv", ctx.args(node), [out], kernel_shape=kernel, strides=list(node.attrs["stride"]),
             pads=[ph, pw, ph, pw], dilations=list(node.attrs["dilation"]), group=node.attrs["groups"])


def _gelu(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """Native ``Gelu`` from opset 20; before it the ``Erf``/``Tanh`` formula."""
    x, approximate = ctx.arg(node, 0), node.attrs["approximate"]
    if ctx.opset >= 20:
        ctx.emit("Gelu", [x], [out], approximate=approximate)
        return
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = ctx.emit("Mul", [ctx.emit("Mul", [x, x]), x])
        inner = ctx.emit("Add", [x, ctx.emit("Mul", [cube, ctx.scalar(0.044715)])])
        t = ctx.emit("Tanh", [ctx.emit("Mul", [inner, ctx.scalar(math.sqrt(2.0 / math.pi))])])
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        t = ctx.emit("Erf", [ctx.emit("Mul", [x, ctx.scalar(1.0 / math.sqrt(2.0))])])
    half_x = ctx.emit("Mul", [x, ctx.scalar(0.5)])
    ctx.emit("Mul", [half_x, ctx.emit("Add", [t, ctx.scalar(1.0)])], [out])


def _silu(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``x * Sigmoid(x)``."""
    x = ctx.arg(node, 0)
    ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x])], [out])


def _layer_norm(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``LayerNormalization``; a missing scale becomes ones (an initializer, or ``ConstantOfShape`` if dynamic)."""
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    args = ctx.args(node)
    if len(args) == 1:
        norm = x.shape[axis:]
        if is_static(norm):
            args.append(ctx.constant(np.ones([int(d) for d in norm], dtype=ctx.dtype), f"{out}/ones"))
        else:
            shape = ctx.emit("Shape", [args[0]], start=axis)
            one = numpy_helper.from_array(np.ones(1, dtype=ctx.dtype))
            args.append(ctx.emit("ConstantOfShape", [shape], value=one))
    stash = TensorProto.DOUBLE if ctx.dtype == "float64" else TensorProto.FLOAT
    ctx.emit("LayerNormalization", args, [out], axis=axis, epsilon=node.attrs["epsilon"], stash_type=stash)


def _reshape(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """``Reshape`` with an int64 shape initializer (0 copies a dim, -1 infers one, as in the IR)."""
    shape = ctx.constant(np.array(node.attrs["shape"], dtype=np.int64), f"{node.name}/shape")
    ctx.emit("Reshape", [ctx.arg(node, 0), shape], [out])


def _split(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
    """One ONNX ``Split`` for every IR ``Split`` sharing input, axis and sizes; duplicates are Identity."""
    key = split_key(node)
    reps, sizes = ctx.split_reps[key], node.attrs["sizes"]

    def emit_split() -> str:  # at the first piece in graph order, writing every live piece's value
        outs = [ctx.names[reps[i]] if i in reps else ctx.fresh(f"{out}/unused_{i}") for i in range(len(sizes))]
        split = ctx.constant(np.array(sizes, dtype=np.int64), f"{node.name}/sizes")
        return ctx.emit("Split", [ctx.arg(node, 0), split], outs, axis=key[1])

    ctx.once(("split", *key), emit_split)
    rep = reps[node.attrs["index"]]
    if rep is not node:
        ctx.emit("Identity", [ctx.names[rep]], [out])


ONNX_LOWERING: dict[Op, Lowering] = {
    Op.LINEAR: _linear,
    Op.MATMUL: _simple("MatMul"),
    Op.CONV2D: _conv2d,
    Op.ADD: _simple("Add"),
    Op.SUB: _simple("Sub"),
    Op.MUL: _simple("Mul"),
    Op.DIV: _simple("Div"),
    Op.NEG: _simple("Neg"),
    Op.RELU: _simple("Relu"),
    Op.GELU: _gelu,
    Op.SILU: _silu,
    Op.SIGMOID: _simple("Sigmoid"),
    Op.TANH: _simple("Tanh"),
    Op.IDENTITY: _simple("Identity"),
    Op.SOFTMAX: _simple("Softmax", axis="axis"),
    Op.LAYER_NORM: _layer_norm,
    Op.RESHAPE: _reshape,
    Op.FLATTEN: _simple("Flatten", axis="axis"),
    Op.TRANSPOSE: _simple("Transpose", perm="perm"),
    Op.CONCAT: _simple("Concat", axis="axis"),
    Op.SPLIT: _split,
}


# --------------------------------------------------------------------------- export
def _live_nodes(graph: Graph, overrides: Mapping[ComputationNode, Lowering] | None = None) -> list[ComputationNode]:
    """The nodes the outputs depend on, in graph order; raise ``UnsupportedOpError`` for ops without a lowering."""
    live = graph.live_nodes()
    missing: dict[str, list[str]] = {}
    for n in live:
        if n.op not in OpGroup.Leaf and n.op not in ONNX_LOWERING and n not in (overrides or {}):
            missing.setdefault(n.op.value, []).append(n.name)
    if missing:
        listed = "; ".join(f"{op} (node(s) {', '.join(map(repr, names))})" for op, names in missing.items())
        raise UnsupportedOpError(f"graph {graph.name!r}: no ONNX lowering for {listed}", missing)
    return live


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET, *, check: bool = True,
            overrides: Mapping[ComputationNode, Lowering] | None = None) -> onnx.ModelProto:
    """Verify ``graph``, lower the part its outputs need to ONNX at ``opset`` (>= 18), check it.

    Raises :class:`GraphError` for a graph that does not verify, :class:`UnsupportedOpError`
    listing the ops without a lowering and their nodes, and :class:`OnnxExportError` for a
    bad opset or a model ``onnx.checker`` refuses (``check=False`` skips the checker).
    ``overrides`` lowers the given nodes with their own function instead of :data:`ONNX_LOWERING`
    (``flora_graph.serving`` rewrites LoRA branches this way); graph inputs such a lowering
    declares in ``ctx.extra_inputs`` follow the graph's own inputs.

    The checker (``full_check``: structure, types and shape inference) runs on the model with
    its big weights declared as typed inputs instead of initializers (:func:`check_lowered`),
    so it never serializes the weights and works past protobuf's 2 GiB too.
    """
    model, weights = lower(graph, opset, check=check, overrides=overrides)
    for name, arr in weights.items():
        _add_initializer(model.graph, name, arr)
    return model


def lower(graph: Graph, opset: int = DEFAULT_OPSET, *, check: bool = True,
          overrides: Mapping[ComputationNode, Lowering] | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """:func:`to_onnx` without the big weights: ``(model, {initializer name: array})``.

    ``model`` holds every node, input, output and small initializer; the arrays (float
    tensors of at least 1 KiB, views of the graph's weights, possibly transposed) are the
    initializers still to add, in order. :func:`save_onnx` writes them straight from the
    arrays; :func:`to_onnx` adds them to the model. Same errors and ``check`` as :func:`to_onnx`.
    """
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise OnnxExportError(f"graph {graph.name!r}: opset {opset} is outside the supported {MIN_OPSET}..{newest}")
    verify(graph)
    for out, n in graph.outputs.items():
        if any(i.name == out and i is not n for i in graph.inputs):
            raise OnnxExportError(f"graph {graph.name!r}: output {out!r} has the name of an input but another value")
    live = _live_nodes(graph, overrides)
    ctx = LoweringContext(graph, opset, live)
    for node in live:
        if node.op in OpGroup.Leaf:
            continue
        widen = node.dtype in _WIDENED and node.op not in _ANY_DTYPE
        ctx.begin(node, widen)
        out = ctx.names[node]
        result = ctx.fresh(f"{out}/float32") if widen else out
        fn = overrides[node] if overrides and node in overrides else ONNX_LOWERING[node.op]
        fn(ctx, node, result)
        if widen:
            ctx.emit("Cast", [result], [out], to=ONNX_DTYPES[node.dtype])
    ctx.begin(None)
    for out, n in graph.outputs.items():  # outputs that are leaves or repeat a node: Identity
        if ctx.value(n) != out:
            ctx.emit("Identity", [ctx.value(n)], [out])
    inputs = [helper.make_tensor_value_info(n.name, ONNX_DTYPES[n.dtype], list(n.shape)) for n in graph.inputs]
    inputs += ctx.extra_inputs
    outputs = [helper.make_tensor_value_info(k, ONNX_DTYPES[n.dtype], list(n.shape)) for k, n in graph.outputs.items()]
    onnx_graph = helper.make_graph(ctx.nodes, graph.name, inputs, outputs, list(ctx.initializers.values()))
    opsets = [helper.make_opsetid("", opset)]
    ir_version = helper.find_min_ir_version_for(opsets)
    model = helper.make_model(onnx_graph, opset_imports=opsets, ir_version=ir_version, producer_name="flora_graph")
    if check:
        check_lowered(model, ctx.weights, f"graph {graph.name!r}")
    return model, ctx.weights


def check_lowered(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], where: str) -> None:
    """``onnx.checker`` with ``full_check`` on ``model`` plus ``weights`` (the output of :func:`lower`).

    The weights take part as graph inputs of their dtype and shape: every node, type and
    shape is checked as with initializers, without copying or serializing a weight's bytes
    (which the lowering writes from arrays of exactly those dtypes and shapes).
    """
    if not weights:
        _check(model, where)
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # small: the model without its big weights
    probe.graph.input.extend(
        helper.make_tensor_value_info(k, ONNX_DTYPES[v.dtype.name], list(v.shape)) for k, v in weights.items())
    _check(probe, where)


def _check(model: onnx.ModelProto | Path | bytes, where: str) -> None:
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto | bytes) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"{where}: onnx.checker refused the exported model: {exc}") from None


def _little_endian(arr: np.ndarray) -> np.ndarray:
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


def _tensor_header(name: str, arr: np.ndarray) -> onnx.TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = ONNX_DTYPES[arr.dtype.name]
    t.dims.extend(int(d) for d in arr.shape)
    return t


def _add_initializer(graph: onnx.GraphProto, name: str, arr: np.ndarray) -> None:
    t = graph.initializer.add()
    t.CopyFrom(_tensor_header(name, arr))
    t.raw_data = _little_endian(arr).tobytes()


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` in bytes, estimated without serializing it (inline weights counted)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type != TensorProto.STRING else 1
            total += max(math.prod(t.dims) * itemsize, len(t.string_data)) + 16 + len(t.name)
    small = [*model.graph.node, *model.graph.input, *model.graph.output, *model.graph.value_info]
    return total + sum(p.ByteSize() + 8 for p in small) + 1024


def save_onnx(graph_or_model: Graph | onnx.ModelProto, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write a graph (lowered first) or model to ``path`` atomically; return the path.

    Past :data:`EXTERNAL_DATA_THRESHOLD` bytes the weights go to ``<name>.data`` beside it.
    A graph is checked before anything is written (:func:`check_lowered`) and its weights are
    written straight from its arrays; a model is serialized once and checked (by path when
    it has external data). Raises :class:`OnnxExportError` naming the path when it cannot
    be written; no partial file stays.
    """
    path = Path(path)
    try:
        if isinstance(graph_or_model, Graph):
            model, weights = lower(graph_or_model, opset)
            _write_lowered(model, weights, path)
        elif model_size(graph_or_model) <= EXTERNAL_DATA_THRESHOLD:
            data = graph_or_model.SerializeToString()
            _check(data, f"model for {str(path)!r}")
            atomic_write_bytes(path, data)
        else:
            _save_external(graph_or_model, path)
    except OSError as exc:
        raise OnnxExportError(f"cannot write ONNX model to {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(field: int, size: int) -> bytes:
    """The key and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(size)


_GRAPH_FIELD, _INITIALIZER_FIELD, _RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def _write_lowered(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], path: Path) -> None:
    """Write the output of :func:`lower` as one ONNX file, or with external data past the threshold.

    One file is ``model``'s bytes followed by a second ``graph`` field holding the weights as
    initializers (protobuf merges repeated occurrences of a message field, so every reader
    sees one graph); each weight's bytes go from its array to the file without a copy.
    """
    head = model.SerializeToString()
    tensors = []
    for name, arr in weights.items():
        header = _tensor_header(name, arr).SerializeToString()
        body = len(header) + len(_len_field(_RAW_DATA_FIELD, arr.nbytes)) + arr.nbytes
        tensors.append((header, arr, body))
    chunk = sum(len(_len_field(_INITIALIZER_FIELD, body)) + body for _, _, body in tensors)
    if len(head) + chunk > EXTERNAL_DATA_THRESHOLD:
        _write_external(model, weights, path)
        return
    with atomic_file(path) as fh:
        fh.write(head)
        if tensors:
            fh.write(_len_field(_GRAPH_FIELD, chunk))
        for header, arr, body in tensors:
            fh.write(_len_field(_INITIALIZER_FIELD, body) + header + _len_field(_RAW_DATA_FIELD, arr.nbytes))
            fh.write(_little_endian(arr).reshape(-1).view(np.uint8).data)


def _write_external(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], path: Path) -> None:
    """``model`` with ``weights`` as external data in ``<name>.data`` (64-byte aligned), written atomically."""
    data_name = f"{path.name}.data"
    model = _copy_proto(model)
    offset = 0
    with atomic_file(path.parent / data_name) as fh:
        for name, arr in weights.items():
            pad = -offset % 64
            fh.write(b"\0" * pad)
            offset += pad
            t = model.graph.initializer.add()
            t.CopyFrom(_tensor_header(name, arr))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            fh.write(_little_endian(arr).reshape(-1).view(np.uint8).data)
            offset += arr.nbytes
    try:
        atomic_write_bytes(path, model.SerializeToString())
    except BaseException:
        (path.parent / data_name).unlink(missing_ok=True)
        raise


def _copy_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """Save with external data through a temporary folder beside ``path``; check, then rename both files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        data = f"{path.name}.data"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving with external data empties the tensors it moves out
        onnx.save_model(copy, tmp / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _check(tmp / path.name, f"model for {str(path)!r}")
        if (tmp / data).exists():
            os.replace(tmp / data, path.parent / data)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The transformer op family (attention, RMSNorm, Gather, Slice, ...) registers its lowerings into
# ONNX_LOWERING when imported; importing it here keeps the table complete for every importer.
import flora_graph.runtimes.onnx_lowering_ops  # noqa: E402, F401
