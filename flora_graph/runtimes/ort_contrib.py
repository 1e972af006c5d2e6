"""ONNX Runtime's contrib ops for a lowered model, where ORT's own graph optimizer misses them.

:func:`~flora_graph.runtimes.onnx_lowering.lower` writes standard ONNX; given
``contrib=True`` it then calls :func:`fuse_skip_rms_norm` on the nodes it emitted, while the
IR shapes are still at hand. The result runs on ONNX Runtime only (its ``com.microsoft``
domain), which is what the ONNX Runtime GenAI package is for.

- ``fuse_skip_rms_norm``: a residual ``Add(a, b)`` read by ``RMSNormalization`` becomes one
  ``com.microsoft.SkipSimplifiedLayerNormalization(a, b, scale)`` whose fourth output is the
  sum, so the residual stream's other readers keep their value. ONNX Runtime (1.32) makes this
  node itself from ``Add`` + its own ``SimplifiedLayerNormalization`` but not from the opset-23
  ``RMSNormalization``; in a decoder it is every norm but the first. The kernel adds in the
  input dtype and normalizes in float32, as ``Add`` + ``RMSNormalization(stash_type=1)`` do.
  Fused only where ``a`` and ``b`` have one shape of rank 2 or 3 (no broadcasting), the norm is
  over the last axis with a scale, in float32 or float16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
from onnx import helper

from flora_graph.ir.shapes import canonical_dim

if TYPE_CHECKING:
    from flora_graph.ir.node import ComputationNode
    from flora_graph.runtimes.onnx_lowering import LoweringContext

__all__ = ["CONTRIB_DOMAIN", "fuse_skip_rms_norm"]

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
