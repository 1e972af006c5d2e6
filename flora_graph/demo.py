"""The main job: capture the default adapted model and check it against eager torch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flora_graph.frontend import capture
from flora_graph.ir import Graph
from flora_graph.models import build_demo_model, demo_inputs
from flora_graph.runtimes import run

__all__ = ["DemoReport", "run_demo"]


@dataclass
class DemoReport:
    """What the demo measured."""

    graph: Graph
    max_abs_diff: dict[int, float] = field(default_factory=dict)  # batch -> max |numpy - torch|
    adapters: int = 0
    capture_s: float = 0.0
    tolerance: float = 1e-5

    @property
    def ok(self) -> bool:
        """Whether every batch size matched eager torch within ``tolerance``."""
        return all(d <= self.tolerance for d in self.max_abs_diff.values())


def run_demo(batches: tuple[int, ...] = (1, 4), rank: int = 4, save: str | Path | None = None, progress=None) -> DemoReport:
    """Build the demo model with LoRA (nonzero ``B``), capture it with a dynamic batch,
    run the numpy reference interpreter at each batch size and compare with eager torch.

    ``progress(message)`` is called before each stage when given.
    """
    say = progress or (lambda msg: None)
    say("building the demo model with LoRA adapters")
    model = build_demo_model(rank=rank)
    say("capturing with torch.export (dynamic batch)")
    t0 = time.perf_counter()
    graph = capture(model, demo_inputs(batch=2), {"image": {0: "batch"}}, name="demo")
    report = DemoReport(graph, capture_s=time.perf_counter() - t0)
    report.adapters = len({n.meta["module"] for n in graph.nodes if "module" in n.meta})
    for b in batches:
        say(f"running the numpy reference interpreter at batch {b}")
        inputs = demo_inputs(batch=b, seed=100 + b)
        with torch.no_grad():
            want = model(**inputs).numpy()
        got = run(graph, {k: v.numpy() for k, v in inputs.items()})["output"]
        report.max_abs_diff[b] = float(np.max(np.abs(got - want)))
    if save is not None:
        say(f"saving the graph to {save}")
        graph.save(save)
    return report
