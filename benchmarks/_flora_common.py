"""Helpers shared by the Flora quality benchmarks (``flora_quality.py``, ``flora_finetune.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flora_graph.models.decoder import DECODER_PROJECTIONS
from flora_graph.training.trainer import TrainConfig

__all__ = ["PROJECTIONS", "at_edge", "galore_factory", "galore_missing", "optimizer_state_bytes"]

PROJECTIONS = DECODER_PROJECTIONS


def galore_factory(rank: int, gap: int) -> Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]:
    """An ``optimizer_factory`` for :func:`train`: GaLore AdamW on the projection weights, AdamW on the rest.

    Only trainable parameters are optimized; a projection is recognised by its module name
    (``...q_proj.weight``), GaLore's ``scale`` is 0.25 and ``proj_type`` ``"std"``.
    """

    def make(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        low = [p for n, p in named if p.ndim == 2 and n.split(".")[-2] in PROJECTIONS]
        ids = {id(p) for p in low}
        rest = [p for _, p in named if id(p) not in ids]
        groups = [{"params": rest}, {"params": low, "rank": rank, "update_proj_gap": gap, "scale": 0.25,
                                     "proj_type": "std"}]
        return GaLoreAdamW(groups, lr=config.base_lr, betas=(config.beta1, 0.999), weight_decay=0.0,
                           no_deprecation_warning=True)

    return make


def galore_missing() -> str | None:
    """``None`` when ``galore_torch.GaLoreAdamW`` imports, else why not (a one-line reason to print)."""
    try:
        from galore_torch import GaLoreAdamW  # noqa: F401
    except Exception as exc:  # not installed, or a broken dependency of it
        return f"galore_torch is not importable ({type(exc).__name__}: {exc}); pip install galore-torch to run it"
    return None


def at_edge(best: dict[str, Any], runs: list[dict[str, Any]], same: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether ``best``'s lr is the smallest or largest of its grid (so the optimum may lie outside it)."""
    lrs = sorted({x["lr"] for x in runs if same(x)})
    return len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state`` (moments, compressed momenta, projections, step counters)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
