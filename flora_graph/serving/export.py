"""ONNX exports whose LoRA weights are inputs: one adapter per run, or one adapter per row.

Both make the graph's LoRA sites adapter slots (the ``adapter-slots`` pass,
:mod:`flora_graph.passes.adapter_slots`; a graph that has slots already, say from
``optimize(graph, "fused", slots="swappable")``, keeps them, and slots of the other kind are
converted), lower it with :func:`~flora_graph.runtimes.onnx_lowering.to_onnx` and record the
slots in the model's metadata (``flora_graph.lora_slots``):

* :func:`export_swappable`: ``A`` (``[<module>.rank, in]``) and ``B`` (``[out, <module>.rank]``,
  scale folded) are graph inputs with empty (rank 0) default initializers, so the model
  runs as the base model when no adapter is active. ONNX Runtime's LoRA adapters
  (``.onnx_adapter`` files, ``RunOptions.add_active_adapter``) feed them per run.
* :func:`export_mixed`: per module, the adapters' weights stacked ``[slots, ...]``
  (zero-padded to the module's largest rank, the last slot all zeros) and a per-row
  ``adapter_index`` (``-1``: no adapter, which ``Gather`` reads as the last, zero slot) are
  graph inputs. A ``Linear`` site gathers each row's ``A``/``B`` (``Gather``) and runs two
  batched ``MatMul``\\ s; a ``Conv2d`` site does the same on its input's patches (im2col by
  ``Pad`` + one strided ``Slice`` per kernel tap), so each row pays for its own rank only.
  The stacks' defaults are one zero slot of rank 1, so without them the model is the base model.

A site that cannot stay swappable is a :class:`ServingError` naming the module, never a
silently baked adapter: in particular a graph whose adapters a preset fused or merged
(``optimize(graph, "fused")`` without ``slots=``). Weights are inputs rather than
initializers set at session creation so that changing the set of adapters is a numpy
restack (milliseconds) instead of a new session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from flora_graph.errors import AdapterError
from flora_graph.ir import Graph
from flora_graph.passes.adapter_slots import (
    INDEX_INPUT,
    SLOTS_DIM,
    adapter_slots,
    bias_name,
    magnitude_name,
    weight_names,
)
from flora_graph.runtimes.onnx_lowering import DEFAULT_OPSET, add_initializer, lower
from flora_graph.runtimes.onnx_writer import save_lowered
from flora_graph.serving.errors import ServingError
from flora_graph.serving.slots import LoRASlot, graph_slots, slots_to_metadata

__all__ = ["INDEX_INPUT", "SLOTS_DIM", "export_mixed", "export_swappable", "lower_slotted", "slotted", "stack_names",
           "stacked_inputs"]


def stack_names(slot: LoRASlot) -> tuple[str, str]:
    """Input names of a slot's stacked ``A`` and ``B`` in the mixed export."""
    return weight_names(slot.module, "mixed")


def stacked_inputs(slot: LoRASlot) -> tuple[str, ...]:
    """Every stacked input of a slot in the mixed export: ``A``, ``B``, a DoRA slot's magnitudes and a slot's biases
    (in the order of :attr:`~flora_graph.serving.slots.LoRASlot.vector_names`)."""
    return (*stack_names(slot), *((magnitude_name(slot.module, "mixed"),) if slot.dora else ()),
            *((bias_name(slot.module, "mixed"),) if slot.lora_bias else ()))


def slotted(graph: Graph, slots: str = "swappable") -> Graph:
    """A copy of ``graph`` (weights shared) whose LoRA sites are ``slots`` adapter slots.

    Raises :class:`ServingError` naming the module for a site that cannot be a slot, or the
    modules whose adapter a pass already fused or merged, and for a graph without LoRA.
    """
    g = graph.copy(share_weights=True)
    try:
        adapter_slots(g, slots=slots)
    except AdapterError as exc:
        raise ServingError(str(exc)) from None
    return g


def lower_slotted(graph: Graph, slots: str = "swappable", *, opset: int = DEFAULT_OPSET, packed: Sequence[LoRASlot] = (),
                  contrib: bool = False, max_positions: int | None = None,
                  moe: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """:func:`export_swappable` (``slots="swappable"``) or :func:`export_mixed` (``"mixed"``) with the big weights
    apart, as :func:`~flora_graph.runtimes.onnx_lowering.lower` gives them: ``(model, {initializer: array})``,
    the arrays views of the graph's weights, for :func:`~flora_graph.runtimes.onnx_writer.save_lowered` to
    write without a copy in memory. Same errors as those; ``moe`` as for :func:`~flora_graph.runtimes.onnx_lowering.lower`."""
    g = slotted(graph, slots)
    model, weights = lower(g, opset, contrib=contrib, max_positions=max_positions, moe=moe)
    props = {p.key: p.value for p in model.metadata_props}
    helper.set_model_props(model, {**props, **slots_to_metadata(graph_slots(g), slots, packed)})
    return model, weights


def _export(graph: Graph, slots: str, opset: int, path: str | Path | None,
            packed: Sequence[LoRASlot] = (), contrib: bool = False, max_positions: int | None = None) -> onnx.ModelProto:
    model, weights = lower_slotted(graph, slots, opset=opset, packed=packed, contrib=contrib, max_positions=max_positions)
    if path is not None:
        save_lowered(model, weights, path)
    for name, arr in weights.items():
        add_initializer(model.graph, name, arr)
    return model


def export_swappable(graph: Graph, path: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                     contrib: bool = False, max_positions: int | None = None) -> onnx.ModelProto:
    """The ONNX model of ``graph`` with every LoRA site's weights as rank-0-default inputs.

    ``graph`` is a captured graph with LoRA branches, or a graph with adapter slots (for
    example ``optimize(graph, preset, slots="swappable")``); the adapters' own weights are
    not in the model (write them with ``write_adapter(path, graph_adapter_params(graph))``
    from the captured graph). The slots are recorded in the model's metadata. Writes
    ``path`` atomically when given. ``contrib``: the model is for ONNX Runtime only and may use
    its contrib ops (see :func:`~flora_graph.runtimes.onnx_lowering.to_onnx`, also for
    ``max_positions``). Raises
    :class:`ServingError` naming the module for a branch that cannot be made swappable.
    """
    return _export(graph, "swappable", opset, path, contrib=contrib, max_positions=max_positions)


def export_mixed(graph: Graph, path: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                 packed: Sequence[LoRASlot] = (), contrib: bool = False,
                 max_positions: int | None = None) -> onnx.ModelProto:
    """The ONNX model of ``graph`` serving rows with different adapters in one call.

    Inputs: the graph's own, ``adapter_index`` (int64 ``[batch]``, ``-1``: no adapter) and,
    per LoRA site, ``<module>.lora_A.stack`` / ``<module>.lora_B.stack`` (see
    :func:`~flora_graph.serving.mixed.stack_adapters` for their layout). Every site's input
    must have the batch rows as its first dim (the first graph input's first dim);
    :class:`ServingError` names a module where it does not. Writes ``path`` atomically when given.
    ``packed``: the packed slots (``pack-slots``) of the swappable export beside it, whose adapter
    files a :class:`~flora_graph.serving.mixed.MixedAdapterSession` on this model then unpacks per
    module (the mixed model itself is best left unpacked: its per-row gathers would copy the
    zero blocks of a block-diagonal ``B``). ``contrib`` and ``max_positions`` as for :func:`export_swappable`.
    """
    return _export(graph, "mixed", opset, path, packed, contrib, max_positions)
