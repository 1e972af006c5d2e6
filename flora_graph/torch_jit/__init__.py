"""flora_graph as a JIT: ``jit(model)`` and the ``torch.compile`` backend ``"flora_graph"``.

* :func:`jit` wraps a model in a :class:`JitModule` that captures (``torch.export``),
  optimizes and compiles it on its first call, caches the executable per input signature,
  and rebuilds it when the weights change.
* :func:`flora_graph_backend` is registered through the ``torch_dynamo_backends`` entry
  point, so ``torch.compile(model, backend="flora_graph")`` works once the package is
  installed (``torch._dynamo`` itself is imported only when the backend first runs).
"""

from __future__ import annotations

from flora_graph.torch_jit.dynamo import flora_graph_backend, reset_stats, stats
from flora_graph.torch_jit.fingerprint import ModuleFingerprint, TensorFingerprint
from flora_graph.torch_jit.fx_islands import LoweringFallbackWarning, LoweringStats
from flora_graph.torch_jit.module import JitFallbackWarning, JitModule, JitStats, jit

__all__ = [
    "JitFallbackWarning",
    "JitModule",
    "JitStats",
    "LoweringFallbackWarning",
    "LoweringStats",
    "ModuleFingerprint",
    "TensorFingerprint",
    "flora_graph_backend",
    "jit",
    "reset_stats",
    "stats",
]
