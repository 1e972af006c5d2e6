"""The main job: capture the default adapted model and check it against eager torch.

The default model is the built-in byte-level Llama-style decoder with LoRA (nonzero ``B``)
on all seven projections of every block; ``model="cnn"`` picks the small CNN + MLP instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flora_graph.frontend import capture
from flora_graph.ir import Graph
from flora_graph.runtimes import run

__all__ = ["DEMO_MODELS", "DemoReport", "run_demo"]

DEMO_MODELS = ("decoder", "cnn")


@dataclass
class DemoReport:
    """What the demo measured."""

    graph: Graph
    max_abs_diff: dict[tuple[int, ...], float] = field(default_factory=dict)  # input shape -> max |numpy - torch|
    adapters: int = 0
    capture_s: float = 0.0
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        """Whether every input shape matched eager torch within ``tolerance``."""
        return all(d <= self.tolerance for d in self.max_abs_diff.values())


def _decoder_case(rank: int):
    from flora_graph.models.decoder import build_decoder

    model = build_decoder(lora_rank=rank)
    vocab = model.config.vocab_size

    def inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))}

    shapes = [(1, 5), (3, 17)]
    return model, inputs(2, 8, 0), {"input_ids": {0: "batch", 1: "seq"}}, [inputs(b, s, 100 + b) for b, s in shapes]


def _cnn_case(rank: int):
    from flora_graph.models import build_demo_model, demo_inputs

    return build_demo_model(rank=rank), demo_inputs(2), {"image": {0: "batch"}}, [demo_inputs(b, seed=100 + b) for b in (1, 4)]


def run_demo(model: str = "decoder", rank: int = 8, save: str | Path | None = None, progress=None) -> DemoReport:
    """Build the demo model with LoRA (nonzero ``B``), capture it with dynamic dims, run the
    numpy reference interpreter at two input shapes and compare with eager torch.

    ``progress(message)`` is called before each stage when given.
    """
    if model not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {model!r}; choose one of {DEMO_MODELS}")
    say = progress or (lambda msg: None)
    say(f"building the {model} with LoRA adapters")
    net, example, dynamic, checks = (_decoder_case if model == "decoder" else _cnn_case)(rank)
    say("capturing with torch.export (dynamic dims)")
    t0 = time.perf_counter()
    graph = capture(net, example, dynamic, name=f"demo-{model}")
    report = DemoReport(graph, capture_s=time.perf_counter() - t0)
    report.adapters = len({n.meta["module"] for n in graph.nodes if "module" in n.meta})
    for inputs in checks:
        shape = tuple(next(iter(inputs.values())).shape)
        say(f"running the numpy reference interpreter at {list(shape)}")
        with torch.no_grad():
            want = net(**inputs).numpy()
        got = run(graph, {k: v.numpy() for k, v in inputs.items()})["output"]
        report.max_abs_diff[shape] = float(np.max(np.abs(got - want)))
    if save is not None:
        say(f"saving the graph to {save}")
        graph.save(save)
    return report
