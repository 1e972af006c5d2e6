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

from flora_graph.training.accumulate import FloraAccumulator
from flora_graph.training.corpus import Corpus, CorpusError, WindowSampler, build_corpus
from flora_graph.training.errors import NonFiniteGradientError, OptimizerError
from flora_graph.training.optimizer import Flora
from flora_graph.training.projection import (
    compress,
    decompress,
    gaussian_projection,
    layout_for,
    param_seed,
    stable_seed,
    transfer,
)
from flora_graph.training.trainer import TrainConfig, TrainConfigError, TrainResult, train

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
    "param_seed",
    "stable_seed",
    "train",
    "transfer",
]
