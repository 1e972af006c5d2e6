"""Compiler speed: capture + optimize + lower for a deep adapted stack, and optimize scaling."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flora_graph.adapters import adapters_of
from flora_graph.frontend import capture
from flora_graph.models import build_mlp_stack
from flora_graph.passes import optimize
from flora_graph.runtimes import compile

__all__ = ["PipelineTiming", "optimize_scaling", "time_pipeline"]


@dataclass
class PipelineTiming:
    """Seconds spent in each stage for one model."""

    layers: int
    adapters: int
    nodes: int
    capture_s: float
    optimize_s: dict[str, float]
    lower_s: dict[str, float]

    def total_s(self, preset: str, backend: str) -> float:
        """Capture + optimize(preset) + lower(preset, backend)."""
        return self.capture_s + self.optimize_s[f"{preset}/{backend}"] + self.lower_s[f"{preset}/{backend}"]


def time_pipeline(layers: int = 32, presets: Sequence[str] = ("fused", "merged"), backends: Sequence[str] = ("onnxruntime",)) -> PipelineTiming:
    """Time capture, optimize and lower for :func:`build_mlp_stack` with ``layers`` blocks (7 adapters each)."""
    model = build_mlp_stack(layers)
    t0 = time.perf_counter()
    graph = capture(model, torch.randn(2, 128), {"x": {0: "batch"}})
    cap = time.perf_counter() - t0
    opt: dict[str, float] = {}
    low: dict[str, float] = {}
    for preset in presets:
        for backend in backends:
            t0 = time.perf_counter()
            g = optimize(graph, preset, backend=backend)
            opt[f"{preset}/{backend}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            compile(g, backend)
            low[f"{preset}/{backend}"] = time.perf_counter() - t0
    return PipelineTiming(layers, len(adapters_of(model)), len(graph.nodes), cap, opt, low)


def optimize_scaling(layer_counts: Sequence[int] = (4, 8, 16, 32, 64), preset: str = "fused", repeats: int = 3) -> list[tuple[int, int, float]]:
    """``(layers, nodes, best optimize seconds)`` per stack depth: linear growth means constant s/node."""
    out = []
    for layers in layer_counts:
        graph = capture(build_mlp_stack(layers), torch.randn(2, 128), {"x": {0: "batch"}})
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            optimize(graph, preset)
            best = min(best, time.perf_counter() - t0)
        out.append((layers, len(graph.nodes), best))
    return out
