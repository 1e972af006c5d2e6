"""Lower a :class:`~flora_graph.ir.Graph` to an ONNX ``ModelProto`` and save it.

:data:`ONNX_LOWERING` maps every non-leaf op to ``lower(ctx, node, out)``, which appends
the ONNX nodes computing ``node`` into the value named ``out``. Graph inputs and outputs
keep their names, named dims become ``dim_param`` (``"batch"``, ``"batch*seq"``), weights
become initializers named after their params, and ``onnx.checker`` (``full_check``) runs on
every export. ``Split`` nodes sharing input, axis and sizes become one multi-output ONNX
``Split``. Float16/bfloat16 arithmetic is computed in float32 between two ``Cast`` nodes,
as the numpy reference does. :func:`save_onnx` writes atomically and switches to
external data past :data:`EXTERNAL_DATA_THRESHOLD` bytes.
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
from flora_graph.ir.serialize import atomic_write_bytes
from flora_graph.ir.shapes import is_static
from flora_graph.ir.verify import verify

__all__ = [
    "DEFAULT_OPSET", "EXTERNAL_DATA_THRESHOLD", "MIN_OPSET", "ONNX_DTYPES", "ONNX_LOWERING",
    "LoweringContext", "OnnxExportError", "model_size", "save_onnx", "to_onnx",
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
        """A new initializer holding ``array``."""
        name = self.fresh(hint)
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
    bad opset or a model ``onnx.checker`` refuses (``check=False`` skips the checker). A model
    past protobuf's 2 GiB cannot be checked in memory; :func:`save_onnx` checks it by path.
    ``overrides`` lowers the given nodes with their own function instead of :data:`ONNX_LOWERING`
    (``flora_graph.serving`` rewrites LoRA branches this way); graph inputs such a lowering
    declares in ``ctx.extra_inputs`` follow the graph's own inputs.
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
        lower = overrides[node] if overrides and node in overrides else ONNX_LOWERING[node.op]
        lower(ctx, node, result)
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
    if check and model_size(model) < onnx.checker.MAXIMUM_PROTOBUF:
        _check(model, f"graph {graph.name!r}")
    return model


def _check(model: onnx.ModelProto | Path, where: str) -> None:
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"{where}: onnx.checker refused the exported model: {exc}") from None


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

    Past :data:`EXTERNAL_DATA_THRESHOLD` bytes the weights go to ``<name>.data`` beside it,
    and ``onnx.checker`` runs on the written file before it is renamed into place. Raises
    :class:`OnnxExportError` naming the path when it cannot be written; no partial file stays.
    """
    path = Path(path)
    model = to_onnx(graph_or_model, opset) if isinstance(graph_or_model, Graph) else graph_or_model
    try:
        if model_size(model) <= EXTERNAL_DATA_THRESHOLD:
            if not isinstance(graph_or_model, Graph):
                _check(model, f"model for {str(path)!r}")
            atomic_write_bytes(path, model.SerializeToString())
        else:
            _save_external(model, path)
    except OSError as exc:
        raise OnnxExportError(f"cannot write ONNX model to {str(path)!r}: {exc.strerror or exc}") from None
    return path


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
