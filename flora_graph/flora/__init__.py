"""The Flora library (arXiv:2402.03293): projections, compression, moments, the ``Flora`` optimizer.

::

    from flora_graph.flora import Flora, FloraAccumulator

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

``Flora(..., update="paper")`` runs the paper's Algorithm 2 (unbiased ``P^T C``) instead of the
default ``"lift"`` rule. Under FSDP2 (``fully_shard``: ``Shard(0)`` DTensor parameters) both
classes work shard by shard, equal to one process up to rounding, with the optimizer state
sharded; ``opt.sharded_state_dict()`` / ``opt.load_sharded_state_dict()`` pair with
``torch.distributed.checkpoint`` for a bit-exact resume.

Both the optimizer and :class:`~flora_graph.adapters.FloraAdapter` build on this package; the
trainer application (corpus, training loop, CLI) is :mod:`flora_graph.training`. This package
imports only torch, :mod:`flora_graph.errors` and its own modules, never an application layer.

Modules: :mod:`.projection` (seeds, layouts, compress/decompress/transfer, the projection cache),
:mod:`.moments` (per-parameter state, factored second moment), :mod:`.momentum` (the ``lift`` and
``paper`` update rules), :mod:`.optimizer` (``Flora``), :mod:`.plans` (per-parameter plans, the
step's work buffer), :mod:`.foreach` (multi-tensor parts of a step), :mod:`.sharding` (FSDP2 shards and collectives),
:mod:`.checkpoint` (name-based optimizer-state loading, sharded state dicts), :mod:`.accumulate` (``FloraAccumulator``),
:mod:`.options` (validation, parameter names), :mod:`.errors` (``OptimizerError``,
``NonFiniteGradientError``).
"""

from __future__ import annotations

from flora_graph.flora.accumulate import FloraAccumulator
from flora_graph.flora.checkpoint import load_flora_state
from flora_graph.flora.errors import NonFiniteGradientError, OptimizerError
from flora_graph.flora.optimizer import Flora
from flora_graph.flora.projection import (
    compress,
    decompress,
    gaussian_projection,
    layout_for,
    lift,
    param_seed,
    stable_seed,
    transfer,
)

__all__ = [
    "Flora",
    "FloraAccumulator",
    "NonFiniteGradientError",
    "OptimizerError",
    "compress",
    "decompress",
    "gaussian_projection",
    "layout_for",
    "lift",
    "load_flora_state",
    "param_seed",
    "stable_seed",
    "transfer",
]
