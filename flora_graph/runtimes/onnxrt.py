"""The ``onnxruntime`` backend: a graph lowered to ONNX and run in an ``InferenceSession``.

``compile(graph, "onnxruntime", intra_op_threads=2)`` returns an
:class:`OnnxRuntimeExecutable`. Inputs are validated by :class:`Executable` before the
session sees them; anything onnxruntime raises (at session creation or at run time) comes
back as an :class:`OnnxRuntimeError` naming the graph, never as an ORT stack dump.
onnxruntime's python API has no numpy bfloat16, so bfloat16 graph inputs and outputs cross
the session boundary as float32 (an exact widening) through ``Cast`` nodes added to the
session's copy of the model; :attr:`OnnxRuntimeExecutable.model` stays the exported one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from flora_graph.errors import FloraGraphError
from flora_graph.ir.graph import Graph
from flora_graph.ops.evaluate import np_dtype
from flora_graph.runtimes import onnx_writer
from flora_graph.runtimes.executable import Executable, register_backend
from flora_graph.runtimes.onnx_lowering import DEFAULT_OPSET, to_onnx
from flora_graph.runtimes.onnx_writer import model_size, save_onnx

__all__ = [
    "GRAPH_OPTIMIZATION_LEVELS", "OnnxRuntimeError", "OnnxRuntimeExecutable", "make_session_options", "onnxruntime_backend",
    "ort_message",
]

GRAPH_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
_OPTIONS = (
    "opset", "intra_op_threads", "inter_op_threads", "graph_optimization_level", "allow_spinning", "providers",
)


class OnnxRuntimeError(FloraGraphError):
    """onnxruntime refused a model or failed running it (names the graph)."""


def ort_message(exc: BaseException) -> str:
    """The first line of an onnxruntime error, without C++ stack frames or the source location."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.rsplit(") ", 1)[-1][:1000] if first.startswith("/") else first[:1000]


def _check_threads(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise FloraGraphError(f"onnxruntime option {name}={value!r} must be an int >= 0 (0: onnxruntime's default)")


def make_session_options(
    *,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    graph_optimization_level: str = "all",
    allow_spinning: bool = False,
) -> ort.SessionOptions:
    """``SessionOptions`` with thread counts, optimization level and spin-waiting set.

    ``None`` thread counts keep onnxruntime's default. ``allow_spinning=False`` (the
    default) stops idle worker threads from busy-waiting, which keeps a serving process
    from burning its cores between requests.
    """
    _check_threads("intra_op_threads", intra_op_threads)
    _check_threads("inter_op_threads", inter_op_threads)
    if graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
        raise FloraGraphError(
            f"onnxruntime option graph_optimization_level={graph_optimization_level!r} must be one of "
            f"{list(GRAPH_OPTIMIZATION_LEVELS)}"
        )
    if not isinstance(allow_spinning, bool):
        raise FloraGraphError(f"onnxruntime option allow_spinning={allow_spinning!r} must be a bool")
    opts = ort.SessionOptions()
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
    if inter_op_threads is not None:
        opts.inter_op_num_threads = inter_op_threads
    opts.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[graph_optimization_level]
    for key in _SPINNING_KEYS:
        opts.add_session_config_entry(key, "1" if allow_spinning else "0")
    return opts


def _float32_boundary(model: onnx.ModelProto, inputs: set[str], outputs: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose bfloat16 ``inputs``/``outputs`` are float32, with Casts inside."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    rename = {name: f"{name}/bfloat16" for name in inputs | outputs}
    for vi in [*g.input, *g.output]:
        if vi.name in rename:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for t in g.initializer:  # an input's default is its initializer: widened with it
        if t.name in inputs:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for node in g.node:
        node.input[:] = [rename.get(v, v) for v in node.input]
        node.output[:] = [rename.get(v, v) for v in node.output]
    pre = [helper.make_node("Cast", [x], [rename[x]], name=f"{x}/to_bfloat16", to=TensorProto.BFLOAT16) for x in inputs]
    post = [helper.make_node("Cast", [rename[y]], [y], name=f"{y}/to_float32", to=TensorProto.FLOAT) for y in outputs]
    nodes = [*pre, *g.node, *post]
    del g.node[:]
    g.node.extend(nodes)
    return copy


class OnnxRuntimeExecutable(Executable):
    """A graph lowered by :func:`~flora_graph.runtimes.onnx_lowering.to_onnx`, run by onnxruntime.

    Attributes:
        model: the exported ``onnx.ModelProto`` (what :meth:`save` writes).
        session: the ``onnxruntime.InferenceSession``.
        session_options: the ``SessionOptions`` the session was created with.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        graph: Graph,
        *,
        opset: int = DEFAULT_OPSET,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        allow_spinning: bool = False,
        providers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(graph)
        self.session_options = make_session_options(
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            graph_optimization_level=graph_optimization_level,
            allow_spinning=allow_spinning,
        )
        if graph.input_defaults:  # inputs with defaults are initializers by design; ORT would warn about each
            self.session_options.log_severity_level = max(self.session_options.log_severity_level, 3)
        self.providers = self._check_providers(providers)
        self.model = to_onnx(graph, opset)
        self._bf16_inputs = {n.name for n in graph.inputs if n.dtype == "bfloat16"}
        self._bf16_outputs = {k for k, n in graph.outputs.items() if n.dtype == "bfloat16"}
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None  # holds a >2 GB model's files
        self.session = self._make_session()

    def _check_providers(self, providers: Sequence[str] | None) -> list[str]:
        chosen = list(providers) if providers is not None else ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        unknown = [p for p in chosen if p not in available]
        if not chosen or unknown:
            raise OnnxRuntimeError(
                f"graph {self.graph.name!r}: execution provider(s) {unknown or chosen} not available; "
                f"this onnxruntime has {available}"
            )
        return chosen

    def _make_session(self) -> ort.InferenceSession:
        model = self.model
        if self._bf16_inputs or self._bf16_outputs:
            model = _float32_boundary(model, self._bf16_inputs, self._bf16_outputs)
        try:
            if model_size(model) <= onnx_writer.EXTERNAL_DATA_THRESHOLD:
                source: str | bytes = model.SerializeToString()
            else:  # protobuf cannot hold it: go through a file with external data
                self._tmpdir = tempfile.TemporaryDirectory(prefix="flora_graph_ort_")
                # a fixed file name: the graph's name comes from a file and is no path to write to
                source = str(save_onnx(model, Path(self._tmpdir.name) / "model.onnx"))
            return ort.InferenceSession(source, sess_options=self.session_options, providers=self.providers)
        except FloraGraphError:
            raise
        except Exception as exc:  # onnxruntime's pybind errors (Fail, NotImplemented, InvalidGraph, ...)
            raise OnnxRuntimeError(
                f"onnxruntime cannot load graph {self.graph.name!r}: {ort_message(exc)}"
            ) from None

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on validated inputs; ORT failures become :class:`OnnxRuntimeError`."""
        feeds = {
            k: np.ascontiguousarray(v.astype(np.float32) if k in self._bf16_inputs else v) for k, v in inputs.items()
        }
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as exc:  # onnxruntime's pybind errors carry no common base class
            raise OnnxRuntimeError(
                f"onnxruntime failed running graph {self.graph.name!r}: {ort_message(exc)}"
            ) from None
        out = dict(zip(self.output_names, values, strict=True))
        for name in self._bf16_outputs:
            out[name] = out[name].astype(np_dtype("bfloat16"))
        return out

    def save(self, path: str | Path) -> Path:
        """Write the ONNX model to ``path`` atomically (external data past 2 GB); return the path."""
        return save_onnx(self.model, path)


@register_backend("onnxruntime")
def onnxruntime_backend(graph: Graph, **options: Any) -> OnnxRuntimeExecutable:
    """The ``onnxruntime`` backend factory; ``options`` are :class:`OnnxRuntimeExecutable`'s keywords."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise FloraGraphError(f"backend 'onnxruntime' has no option(s) {unknown}; it takes {list(_OPTIONS)}")
    return OnnxRuntimeExecutable(graph, **options)
