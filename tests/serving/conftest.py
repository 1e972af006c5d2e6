"""Shared fixtures: the demo base model, three adapters of different ranks, and their exports (built once)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flora_graph.adapters import merge_all
from flora_graph.frontend import capture
from flora_graph.ir import Graph
from flora_graph.models import demo_inputs
from flora_graph.serving import adapter_params, export_mixed, export_swappable, write_adapter
from flora_graph.serving.demo import demo_adapter_models
from tests.serving.genai_package import folders, package  # noqa: F401 - session fixtures of the GenAI tests
from tests.serving.seq2seq_package import seq2seq_packages  # noqa: F401 - of the encoder-decoder tests

RANKS = {"a": 2, "b": 4, "c": 8}
ATOL = 2e-5


@dataclass
class Served:
    """The demo base, its adapters (as models, params and files) and the two exports."""

    base: nn.Module
    models: dict[str, nn.Module]
    params: dict[str, dict[str, np.ndarray]]
    files: dict[str, Path]
    graph: Graph
    swappable: Path
    mixed: Path
    dir: Path

    def reference(self, name: str | None, x: np.ndarray) -> np.ndarray:
        """Eager torch output of the base (``None``) or the adapter's merged model."""
        model = self.base if name is None else merged(self.models[name])
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()


_MERGED: dict[int, tuple[nn.Module, nn.Module]] = {}  # holds the model too, so its id is never reused


def merged(model: nn.Module) -> nn.Module:
    """The adapter model with every adapter merged into its base layer (cached)."""
    if id(model) not in _MERGED:
        m = copy.deepcopy(model)
        merge_all(m)
        _MERGED[id(model)] = (model, m.eval())
    return _MERGED[id(model)][1]


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    d = tmp_path_factory.mktemp("serving")
    base, models = demo_adapter_models(tuple(RANKS.values()), seed=3, names=list(RANKS))
    graph = capture(models["a"], demo_inputs(2), {"image": {0: "batch"}})
    swappable, mixed = d / "swappable.onnx", d / "mixed.onnx"
    export_swappable(graph, swappable)
    export_mixed(graph, mixed)
    params = {k: adapter_params(m) for k, m in models.items()}
    files = {k: write_adapter(d / f"{k}.onnx_adapter", p, model=swappable) for k, p in params.items()}
    return Served(base, models, params, files, graph, swappable, mixed, d)


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """Six seeded demo images."""
    return demo_inputs(6, seed=11)["image"].numpy()
