"""ONNX exports whose LoRA weights are inputs: one adapter per run, or one adapter per row.

Both lower the graph's non-LoRA part with :data:`~flora_graph.runtimes.onnx_lowering.ONNX_LOWERING`
and replace each LoRA site (see :func:`~flora_graph.serving.slots.prepare`) through
``to_onnx(overrides=...)``:

* :func:`export_swappable`: ``A`` (``[<module>.rank, in]``) and ``B`` (``[out, <module>.rank]``,
  scale folded) become graph inputs with empty (rank 0) default initializers, so the model
  runs as the base model when no adapter is active. ONNX Runtime's LoRA adapters
  (``.onnx_adapter`` files, ``RunOptions.add_active_adapter``) feed them per run.
* :func:`export_mixed`: per module, the adapters' weights stacked ``[slots, ...]``
  (zero-padded to the module's largest rank, the last slot all zeros) and a per-row
  ``adapter_index`` (``-1``: no adapter, which ``Gather`` reads as the last, zero slot) are graph inputs. A ``Linear`` site gathers each
  row's ``A``/``B`` (``Gather``) and runs two batched ``MatMul``\\ s; a ``Conv2d`` site does
  the same on its input's patches (im2col by ``Pad`` + one strided ``Slice`` per kernel
  tap), so each row pays for its own rank only. The stacks' defaults are one zero slot of
  rank 1, so without them the model is the base model.

Weights are inputs rather than initializers set at session creation so that changing the
set of adapters is a numpy restack (milliseconds) instead of a new session; gathered
weights cannot be pre-packed by ONNX Runtime either way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flora_graph.ir import ComputationNode, Graph
from flora_graph.ir.shapes import canonical_dim
from flora_graph.runtimes.onnx_lowering import DEFAULT_OPSET, ONNX_DTYPES, LoweringContext, to_onnx
from flora_graph.runtimes.onnx_writer import save_onnx
from flora_graph.serving.errors import ServingError
from flora_graph.serving.slots import LoRASite, LoRASlot, prepare, slots_to_metadata

__all__ = ["INDEX_INPUT", "SLOTS_DIM", "export_mixed", "export_swappable", "stack_names"]

INDEX_INPUT = "adapter_index"
"""Name of the mixed export's per-row adapter index input (int64 ``[batch]``, ``-1``: no adapter)."""
SLOTS_DIM = "adapter_slots"
"""Symbolic dim of the stacked weights' first axis: number of adapters + 1 (the zero slot)."""
_WIDENED = ("float16", "bfloat16")

Emit = Callable[[LoweringContext, LoRASite, str, str], str]  # (ctx, site, x, compute dtype) -> delta value


def stack_names(slot: LoRASlot) -> tuple[str, str]:
    """Input names of a slot's stacked ``A`` and ``B`` in the mixed export."""
    return f"{slot.a_name}.stack", f"{slot.b_name}.stack"


def _declare(ctx: LoweringContext, name: str, dims: list[int | str], dtype: str, default: np.ndarray | None) -> str:
    """A graph input ``name`` (an overridable initializer when ``default`` is given)."""
    if ctx.fresh(name) != name:
        raise ServingError(f"graph {ctx.graph.name!r}: ONNX name {name!r} is already taken; rename the module or param")
    ctx.extra_inputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], dims))
    if default is not None:
        ctx.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(default), name)
    return name


def _as(ctx: LoweringContext, name: str, dtype: str, compute: str) -> str:
    """``name`` cast to the compute dtype where they differ (16-bit floats are computed in float32)."""
    if dtype == compute:
        return name
    return ctx.once(("serving-cast", name), lambda: ctx.emit("Cast", [name], to=ONNX_DTYPES[compute]))


def _site_lowering(site: LoRASite, emit: Emit):
    """The lowering of ``Identity(base)`` standing for a LoRA site: ``base + delta``."""

    def lower(ctx: LoweringContext, node: ComputationNode, out: str) -> None:
        dtype = node.dtype
        compute = "float32" if dtype in _WIDENED else dtype
        base = _as(ctx, ctx.value(node.inputs[0]), dtype, compute)
        x = _as(ctx, ctx.value(site.x), site.x.dtype, compute)
        delta = emit(ctx, site, x, compute)
        if compute == dtype:
            ctx.emit("Add", [base, delta], [out])
        else:
            ctx.emit("Cast", [ctx.emit("Add", [base, delta])], [out], to=ONNX_DTYPES[dtype])

    return lower


def _lower(graph: Graph, emit: Emit, kind: str, opset: int,
           check: Callable[[list[LoRASite]], None] | None = None) -> onnx.ModelProto:
    prepared, sites = prepare(graph)
    if check is not None:
        check(sites)
    overrides = {s.site: _site_lowering(s, emit) for s in sites}
    model = to_onnx(prepared, opset, overrides=overrides)
    props = {p.key: p.value for p in model.metadata_props}
    helper.set_model_props(model, {**props, **slots_to_metadata([s.slot for s in sites], kind)})
    return model


# --------------------------------------------------------------------------- swappable
def _emit_swappable(ctx: LoweringContext, site: LoRASite, x: str, compute: str) -> str:
    s = site.slot
    a = _declare(ctx, s.a_name, [s.rank_dim, *s.in_dims], s.dtype, np.zeros(s.a_shape(0), s.dtype))
    b = _declare(ctx, s.b_name, [s.out, s.rank_dim, *s.b_tail], s.dtype, np.zeros(s.b_shape(0), s.dtype))
    a, b = _as(ctx, a, s.dtype, compute), _as(ctx, b, s.dtype, compute)
    if s.kind == "conv":
        pads = [*s.padding, *s.padding]
        h = ctx.emit("Conv", [x, a], kernel_shape=list(s.in_dims[1:]), strides=list(s.stride), pads=pads,
                     dilations=list(s.dilation))
        return ctx.emit("Conv", [h, b], kernel_shape=[1, 1])
    if len(site.x.shape) == 2:
        return ctx.emit("Gemm", [ctx.emit("Gemm", [x, a], transB=1), b], transB=1)
    h = ctx.emit("MatMul", [x, ctx.emit("Transpose", [a], perm=[1, 0])])
    return ctx.emit("MatMul", [h, ctx.emit("Transpose", [b], perm=[1, 0])])


def export_swappable(graph: Graph, path: str | Path | None = None, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of ``graph`` with every LoRA site's weights as rank-0-default inputs.

    ``graph`` is a captured (unfused) graph with LoRA branches; their weights are dropped
    from the model (write them with ``write_adapter(path, graph_adapter_params(graph))``).
    The slots are recorded in the model's metadata. Writes ``path`` atomically when given.
    Raises :class:`ServingError` naming the module for a branch that cannot be made swappable.
    """
    model = _lower(graph, _emit_swappable, "swappable", opset)
    if path is not None:
        save_onnx(model, path)
    return model


# --------------------------------------------------------------------------- mixed
def _slot_index(ctx: LoweringContext, batch: int | str) -> str:
    """The per-row index input; ``-1`` needs no mapping: ``Gather`` counts it from the end, the zero slot."""
    return ctx.once(("serving-index",), lambda: _declare(ctx, INDEX_INPUT, [batch], "int64", None))


def _reshape_like(ctx: LoweringContext, value: str, like: ComputationNode, hint: str) -> str:
    """``value`` reshaped to ``like``'s shape: a constant target when only the first dim is dynamic."""
    rest = like.shape[1:]
    if all(isinstance(d, int) for d in rest):
        target = ctx.constant(np.array([0, *rest], np.int64), f"{hint}/shape")
    else:
        target = ctx.emit("Shape", [ctx.value(like)])
    return ctx.emit("Reshape", [value, target])


def _patches(ctx: LoweringContext, site: LoRASite, x: str) -> str:
    """im2col of a conv site's input as ``[batch, kh*kw*C, H'*W']`` (channel order ``(i, j, c)``).

    Pad, then one strided ``Slice`` per kernel tap, concatenated along channels: copies
    only, so the per-row product that follows costs what a rank-``r`` convolution costs.
    """
    s = site.slot
    c, kh, kw = s.in_dims
    (sh, sw), (ph, pw), (dh, dw) = s.stride, s.padding, s.dilation
    shape = site.x.shape
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return ctx.emit("Reshape", [x, ctx.constant(np.array([0, c, -1], np.int64), f"{s.module}/patches_shape")])
    if not all(isinstance(d, int) for d in shape[2:]):
        raise ServingError(f"module {s.module!r}: per-row conv adapters need static spatial dims, got {list(shape)}")
    h, w = int(shape[2]), int(shape[3])
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ph or pw:
        x = ctx.emit("Pad", [x, ctx.constant(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64), f"{s.module}/pads")])
    axes = ctx.once(("serving-axes-23",), lambda: ctx.constant(np.array([2, 3], np.int64), "axes_2_3"))
    steps = ctx.constant(np.array([sh, sw], np.int64), f"{s.module}/steps")
    taps = []
    for i in range(kh):
        for j in range(kw):
            starts = ctx.constant(np.array([i * dh, j * dw], np.int64), f"{s.module}/start_{i}_{j}")
            ends = ctx.constant(np.array([i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1], np.int64),
                                f"{s.module}/end_{i}_{j}")
            taps.append(ctx.emit("Slice", [x, starts, ends, axes, steps]))
    cat = ctx.emit("Concat", taps, axis=1)
    return ctx.emit("Reshape", [cat, ctx.constant(np.array([0, kh * kw * c, oh * ow], np.int64), f"{s.module}/patches_shape")])


def _emit_mixed(ctx: LoweringContext, site: LoRASite, x: str, compute: str) -> str:
    s = site.slot
    a_name, b_name = stack_names(s)
    if s.kind == "conv":  # A as [slots, rank, kh*kw*C] (taps major), B as [slots, out, rank]
        a_dims, b_dims = [SLOTS_DIM, s.rank_dim, int(np.prod(s.in_dims))], [SLOTS_DIM, s.out, s.rank_dim]
    else:  # A.T as [slots, in, rank], B.T as [slots, rank, out]
        a_dims, b_dims = [SLOTS_DIM, s.in_dims[0], s.rank_dim], [SLOTS_DIM, s.rank_dim, s.out]
    a = _declare(ctx, a_name, a_dims, s.dtype, np.zeros([1 if isinstance(d, str) else d for d in a_dims], s.dtype))
    b = _declare(ctx, b_name, b_dims, s.dtype, np.zeros([1 if isinstance(d, str) else d for d in b_dims], s.dtype))
    idx = _slot_index(ctx, site.x.shape[0])
    ag = ctx.emit("Gather", [_as(ctx, a, s.dtype, compute), idx], axis=0)
    bg = ctx.emit("Gather", [_as(ctx, b, s.dtype, compute), idx], axis=0)
    if s.kind == "conv":  # [batch, out, rank] @ ([batch, rank, kkC] @ [batch, kkC, H'W'])
        d = ctx.emit("MatMul", [bg, ctx.emit("MatMul", [ag, _patches(ctx, site, x)])])
    else:  # [batch, rows, in] @ [batch, in, rank] @ [batch, rank, out]
        x3 = ctx.once(("serving-rows", x), lambda: ctx.emit(  # shared by the sites reading x (q/k/v)
            "Reshape", [x, ctx.constant(np.array([0, -1, s.in_dims[0]], np.int64), f"{a_name}/rows")]))
        d = ctx.emit("MatMul", [ctx.emit("MatMul", [x3, ag]), bg])
    return _reshape_like(ctx, d, site.site.inputs[0], f"{s.module}/delta")


def export_mixed(graph: Graph, path: str | Path | None = None, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of ``graph`` serving rows with different adapters in one call.

    Inputs: the graph's own, ``adapter_index`` (int64 ``[batch]``, ``-1``: no adapter) and,
    per LoRA site, ``<module>.lora_A.stack`` / ``<module>.lora_B.stack`` (see
    :func:`~flora_graph.serving.mixed.stack_adapters` for their layout). Every site's input
    must have the batch rows as its first dim (the first graph input's first dim);
    :class:`ServingError` names a module where it does not. Writes ``path`` atomically when given.
    """
    if not graph.inputs or not graph.inputs[0].shape:
        raise ServingError(f"graph {graph.name!r}: the first input must have a batch dim for per-row adapters")
    batch = canonical_dim(graph.inputs[0].shape[0])

    def check(sites: list[LoRASite]) -> None:
        for s in sites:
            if len(s.x.shape) < 2 or canonical_dim(s.x.shape[0]) != batch:
                raise ServingError(f"module {s.slot.module!r}: its input {s.x.name!r} has shape {list(s.x.shape)}, whose "
                                   f"first dim is not the batch dim {batch!r} of input {graph.inputs[0].name!r}; "
                                   "rows cannot pick adapters there")

    model = _lower(graph, _emit_mixed, "mixed", opset, check)
    if path is not None:
        save_onnx(model, path)
    return model
