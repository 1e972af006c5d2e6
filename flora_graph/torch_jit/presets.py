"""Which preset a JIT compile runs: the named presets, plus ``"auto"``.

A graph the JIT compiles is private to it and rebuilt from the live module whenever a
weight changes, so the reason ``fused`` exists for exports (adapters kept apart, swappable
in a serving runtime) does not apply there. What remains is arithmetic: merging rounds
``W + s * B @ A`` to the weight's dtype once. In float32 or float64 that rounding is as
small as any reordering of the sums; in float16 or bfloat16 an update below half an ulp
of ``W`` is lost outright, while ``fused`` keeps it (its low-rank product runs beside the
base product and the two are only added as activations).

``"auto"`` therefore resolves, per graph, to ``merged`` when no weight of the graph is
float16/bfloat16, and to ``fused`` otherwise.
"""

from __future__ import annotations

from flora_graph.errors import FloraGraphError
from flora_graph.ir import Graph, Op
from flora_graph.passes.optimize import PRESETS

__all__ = ["AUTO", "HALF_DTYPES", "JIT_PRESETS", "check_preset", "resolve_preset"]

AUTO = "auto"
HALF_DTYPES = frozenset({"float16", "bfloat16"})
JIT_PRESETS = (*sorted(PRESETS), AUTO)
"""What ``flora_graph.jit`` and the ``torch.compile`` backend accept as ``preset``."""


def check_preset(preset: object, where: str) -> str:
    """``preset`` if the JIT knows it; otherwise :class:`FloraGraphError` naming ``where`` and the choices."""
    if preset not in JIT_PRESETS:
        raise FloraGraphError(f"{where}: unknown preset {preset!r}; choose one of {list(JIT_PRESETS)}")
    return str(preset)


def resolve_preset(graph: Graph, preset: str) -> str:
    """The named preset to run on ``graph``: ``preset`` itself, or for ``"auto"`` ``"fused"`` when a
    weight of ``graph`` is float16/bfloat16 (merging would round the update into it) and ``"merged"``
    otherwise."""
    if preset != AUTO:
        return preset
    half = any(n.op is Op.CONST and n.dtype in HALF_DTYPES for n in graph.live_nodes())
    return "fused" if half else "merged"
