"""The op library: every IR op, declared once in its family module with all its rules.

Families (one module each): :mod:`~flora_graph.ops.linear` (``Linear``, ``MatMul``,
``Conv2d``), :mod:`~flora_graph.ops.elementwise` (arithmetic, activations, float math,
comparisons, logic, ``Where``, ``Cast``), :mod:`~flora_graph.ops.reduce` (``ReduceMean``,
``ReduceSum``, ``CumSum``), :mod:`~flora_graph.ops.normalization` (``Softmax``,
``LayerNorm``, ``RMSNorm``, ``LogSoftmax``, ``BatchNorm``, ``GroupNorm``), :mod:`~flora_graph.ops.pooling`
(``MaxPool2d``, ``AvgPool2d``, ``Resize``), :mod:`~flora_graph.ops.attention`
(``ScaledDotProductAttention``, ``RotaryEmbedding``; ``KVCacheAttention`` in
:mod:`~flora_graph.ops.kv_attention`, ``GatedDeltaRule`` in :mod:`~flora_graph.ops.linear_attention`), :mod:`~flora_graph.ops.movement` (reshapes, transposes,
concatenation, splits, slices, broadcasts, flips), :mod:`~flora_graph.ops.padding` (``Pad``,
``Tile``), :mod:`~flora_graph.ops.indexing` (``Gather``, ``GatherElements``, ``Index`` and
the scatters ``IndexPut``, ``ScatterElements``), :mod:`~flora_graph.ops.creation` (``Arange``) and
:mod:`~flora_graph.ops.adapters` (adapter slots). Each declares its ops through
:func:`~flora_graph.ops.registry.define`; :data:`OPS` holds them all. Importing
``flora_graph`` imports this package, so the op set is complete before any graph is built.
"""

from __future__ import annotations

from flora_graph.ops import (  # noqa: F401  (each family registers its ops on import)
    adapters,
    attention,
    creation,
    elementwise,
    indexing,
    kv_attention,
    linear,
    linear_attention,
    movement,
    normalization,
    padding,
    pooling,
    reduce,
)
from flora_graph.ops.evaluate import eval_node, resolve_attrs
from flora_graph.ops.registry import OPS, OpDef, define, op_def

__all__ = ["FAMILIES", "OPS", "OpDef", "define", "eval_node", "op_def", "resolve_attrs"]

FAMILIES = ("linear", "elementwise", "reduce", "normalization", "pooling", "attention",
            "movement", "padding", "indexing", "creation", "adapters")
"""The family modules, in the order they are documented."""
