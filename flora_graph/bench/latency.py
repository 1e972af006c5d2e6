"""Fused-vs-unfused inference benchmark: every preset x backend, eager torch beside them.

One run builds every variant, then times them interleaved (:func:`time_interleaved`) and
reports medians. Ratios compare each variant with the ``merged`` preset on the same
backend and with eager torch (the user's baseline: the model with its adapters, in torch).
A ``base`` variant per backend compiles the same model with its adapters removed, the
floor that ``merged`` should reach.
"""

from __future__ import annotations

import copy
import json
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_graph.adapters import unload_all
from flora_graph.bench.timing import median_ms, time_interleaved
from flora_graph.errors import FloraGraphError
from flora_graph.frontend import capture, max_abs_diff, no_kv_cache, output_tensors
from flora_graph.ir.serialize import atomic_write_bytes
from flora_graph.passes import optimize
from flora_graph.runtimes import compile

__all__ = ["BACKENDS", "PRESETS", "BenchReport", "BenchRow", "backend_options", "bench_model"]

PRESETS = ("unfused", "fused", "merged")
BACKENDS = ("onnxruntime", "torchscript", "torch-export")


@dataclass
class BenchRow:
    """One timed variant."""

    name: str
    backend: str
    preset: str
    median_ms: float
    vs_merged: float | None = None  # median / median of the merged preset on the same backend
    vs_eager: float | None = None  # eager median / this median (speed-up over eager torch)
    max_abs_diff: float | None = None  # against eager torch with adapters


@dataclass
class BenchReport:
    """What :func:`bench_model` measured, with the settings that produced it."""

    model: str
    inputs: dict[str, list[int]]
    threads: int
    rounds: int
    rows: list[BenchRow] = field(default_factory=list)
    machine: str = field(default_factory=lambda: f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip())

    def row(self, name: str) -> BenchRow:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        """Write the JSON report atomically."""
        atomic_write_bytes(path, self.to_json().encode())


def backend_options(backend: str, threads: int) -> dict[str, Any]:
    """Fixed thread counts, and no ORT thread spinning (sessions run beside torch)."""
    if backend == "onnxruntime":
        return {"intra_op_threads": threads, "inter_op_threads": 1, "allow_spinning": False}
    if backend in ("torchscript", "torch-export"):
        return {"num_threads": threads}
    return {}


def bench_model(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    dynamic_dims: Mapping[str, Mapping[int, str]] | None,
    bench_inputs: Mapping[str, torch.Tensor],
    *,
    name: str = "model",
    presets: Sequence[str] = PRESETS,
    backends: Sequence[str] = BACKENDS,
    with_base: bool = True,
    threads: int = 1,
    rounds: int = 50,
    warmup: int = 5,
    inner: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchReport:
    """Capture ``model`` once, build every preset x backend (+ eager, + adapter-free base),
    check each against eager torch on ``bench_inputs``, then time them interleaved.

    ``progress(stage, done, total)`` reports the build and the timing rounds. A model may
    return a tensor, a tuple or a Hugging Face ``ModelOutput``: every tensor it returns is
    compared with the graph's output in the same place (:func:`output_tensors`), and a model
    with a ``config.use_cache`` runs without its key/value cache, eager included, as captured.
    Unknown presets or backends, or counts below 1, raise :class:`FloraGraphError` before
    anything runs.
    """
    _check_args(presets, backends, threads=threads, rounds=rounds, inner=inner, warmup=warmup)
    with no_kv_cache(model):
        return _bench(model, example_inputs, dynamic_dims, bench_inputs, name=name, presets=presets,
                      backends=backends, with_base=with_base, threads=threads, rounds=rounds, warmup=warmup,
                      inner=inner, progress=progress)


def _check_args(presets: Sequence[str], backends: Sequence[str], **counts: int) -> None:
    for what, given, known in (("preset", presets, PRESETS), ("backend", backends, BACKENDS)):
        unknown = [v for v in given if v not in known]
        if unknown or not given:
            raise FloraGraphError(f"unknown {what}(s) {unknown or list(given)}; choose from {list(known)}")
    for key, value in counts.items():
        if not isinstance(value, int) or value < (0 if key == "warmup" else 1):
            raise FloraGraphError(f"{key} must be an int >= {0 if key == 'warmup' else 1}, got {value!r}")


def _bench(model: nn.Module, example_inputs: Mapping[str, torch.Tensor], dynamic_dims: Mapping[str, Mapping[int, str]] | None,
           bench_inputs: Mapping[str, torch.Tensor], *, name: str, presets: Sequence[str], backends: Sequence[str],
           with_base: bool, threads: int, rounds: int, warmup: int, inner: int,
           progress: Callable[[str, int, int], None] | None) -> BenchReport:
    say = progress or (lambda stage, done, total: None)
    torch.set_num_threads(threads)
    model = model.eval()
    graph = capture(model, dict(example_inputs), dynamic_dims, name=name)
    feeds = {k: v.detach().cpu().numpy() for k, v in bench_inputs.items()}
    with torch.inference_mode():
        want = output_tensors(model(**bench_inputs))

    builds: list[tuple[str, str, str, Any]] = []
    for preset in presets:
        builds += [(f"{preset}/{b}", b, preset, optimize(graph, preset, backend=b)) for b in backends]
    if with_base:
        base_model = copy.deepcopy(model)
        unload_all(base_model)
        base_graph = capture(base_model, dict(example_inputs), dynamic_dims, name=f"{name}-base")
        builds += [(f"base/{b}", b, "base", base_graph) for b in backends]

    variants: dict[str, Callable[[], Any]] = {}
    rows: dict[str, BenchRow] = {}

    def eager() -> Any:
        with torch.inference_mode():
            return model(**bench_inputs)

    variants["eager/torch"] = eager
    rows["eager/torch"] = BenchRow("eager/torch", "torch", "eager", 0.0, max_abs_diff=0.0)
    for k, (vname, backend, preset, g) in enumerate(builds):
        say(f"compiling {vname}", k, len(builds))
        exe = compile(g, backend, **backend_options(backend, threads))
        diff = max_abs_diff(exe(feeds), want) if preset != "base" else None
        variants[vname] = lambda exe=exe: exe(feeds)
        rows[vname] = BenchRow(vname, backend, preset, 0.0, max_abs_diff=diff)
    say("compiling", len(builds), len(builds))

    samples = time_interleaved(variants, rounds=rounds, warmup=warmup, inner=inner, progress=lambda d, t: say("timing", d, t))
    for vname, s in samples.items():
        rows[vname].median_ms = median_ms(s)
    eager_ms = rows["eager/torch"].median_ms
    for row in rows.values():
        merged = rows.get(f"merged/{row.backend}")
        row.vs_merged = row.median_ms / merged.median_ms if merged else None
        row.vs_eager = eager_ms / row.median_ms
    return BenchReport(name, {k: list(v.shape) for k, v in bench_inputs.items()}, threads, rounds, list(rows.values()))
