"""The Flora trainer application: a byte-level decoder trained on the stdlib corpus, the ``train`` CLI.

::

    from flora_graph.training import TrainConfig, train

    result = train(TrainConfig(steps=200, out="runs/flora"))      # Flora r=8, checkpoints + model.onnx

The Flora math itself (projections, moments, the ``Flora`` optimizer, ``FloraAccumulator``,
optimizer-state loading, option validation, its errors) is the library :mod:`flora_graph.flora`;
its public names are re-exported here for convenience (``from flora_graph.training import Flora``
still works). This package builds on :mod:`flora_graph.flora`, :mod:`flora_graph.adapters`,
:mod:`flora_graph.models` and :mod:`flora_graph.model_export`; nothing below it imports it.

Modules: :mod:`.corpus` (stdlib byte corpus, window sampling), :mod:`.config` (``TrainConfig``,
validation, learning-rate schedule), :mod:`.trainer` (``train``, the loop, export; re-exports
:mod:`.config`), :mod:`.checkpoints` (find/read/write/restore), :mod:`.parallel` (``nproc > 1``:
gloo ranks, FSDP2, sharded checkpoints), :mod:`.choices` (option strings, torch-free), :mod:`.cli`
(the ``flora-graph train`` subcommand).

Every name is imported on first use, so ``import flora_graph.training`` (and the ``flora-graph``
CLI, which registers ``train`` from here) does not import torch.
"""

from __future__ import annotations

from flora_graph._lazy import lazy_exports

_FLORA = "flora_graph.flora"

# public name -> absolute module defining it
_EXPORTS = {
    "Corpus": "flora_graph.training.corpus",
    "CorpusError": "flora_graph.training.corpus",
    "Flora": _FLORA,
    "FloraAccumulator": _FLORA,
    "NonFiniteGradientError": _FLORA,
    "OptimizerError": _FLORA,
    "TrainConfig": "flora_graph.training.config",
    "TrainConfigError": "flora_graph.training.config",
    "TrainResult": "flora_graph.training.trainer",
    "WindowSampler": "flora_graph.training.corpus",
    "build_corpus": "flora_graph.training.corpus",
    "compress": _FLORA,
    "decompress": _FLORA,
    "gaussian_projection": _FLORA,
    "layout_for": _FLORA,
    "lift": _FLORA,
    "param_seed": _FLORA,
    "stable_seed": _FLORA,
    "train": "flora_graph.training.trainer",
    "transfer": _FLORA,
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
