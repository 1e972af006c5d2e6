"""Training with Flora (arXiv:2402.03293): the ``Flora`` optimizer, compressed gradient accumulation.

::

    from flora_graph.training import Flora, FloraAccumulator

    opt = Flora(model.named_parameters(), lr=1e-3)        # rank 8, kappa 1000, beta1 0.9: compressed
    acc = FloraAccumulator(model.named_parameters(), rank=8)
    for micro_batches in loader:
        for x, y in micro_batches:
            with acc.no_sync(ddp_model):
                (loss_fn(ddp_model(x), y) / len(micro_batches)).backward()
            acc.accumulate()
        acc.finalize()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), path)                    # seeds and steps: resumes exactly, on any device

Modules: :mod:`.projection` (seeds, layouts, compress/decompress/transfer), :mod:`.moments`
(per-parameter state, factored second moment), :mod:`.optimizer` (``Flora``),
:mod:`.checkpoint` (name-based state loading), :mod:`.accumulate` (``FloraAccumulator``),
:mod:`.options` (validation, parameter names), :mod:`.errors`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# public name -> submodule defining it; imported on first use, so ``import flora_graph.training``
# (and the ``flora-graph`` CLI, which registers ``train`` from here) does not import torch
_EXPORTS = {
    "Corpus": "corpus",
    "CorpusError": "corpus",
    "Flora": "optimizer",
    "FloraAccumulator": "accumulate",
    "NonFiniteGradientError": "errors",
    "OptimizerError": "errors",
    "TrainConfig": "trainer",
    "TrainConfigError": "trainer",
    "TrainResult": "trainer",
    "WindowSampler": "corpus",
    "build_corpus": "corpus",
    "compress": "projection",
    "decompress": "projection",
    "gaussian_projection": "projection",
    "layout_for": "projection",
    "lift": "projection",
    "param_seed": "projection",
    "stable_seed": "projection",
    "train": "trainer",
    "transfer": "projection",
}

__all__ = [
    "Corpus",
    "CorpusError",
    "Flora",
    "FloraAccumulator",
    "NonFiniteGradientError",
    "OptimizerError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "WindowSampler",
    "build_corpus",
    "compress",
    "decompress",
    "gaussian_projection",
    "layout_for",
    "lift",
    "param_seed",
    "stable_seed",
    "train",
    "transfer",
]


def __getattr__(name: str) -> Any:
    """Resolve a public name from its submodule on first use (PEP 562) and cache it here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flora_graph.training' has no attribute {name!r}")
    value = getattr(import_module(f"flora_graph.training.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
