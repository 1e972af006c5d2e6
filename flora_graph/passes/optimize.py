"""``optimize(graph, preset)``: the presets ``unfused``, ``fused`` and ``merged`` as pass pipelines.

- ``unfused``: the graph as exported (a verified copy).
- ``fused``: adapters stay separate, swappable weights (derived weights are in-graph
  expressions of them); low-rank products optimized.
- ``merged``: adapters baked into the base weights.

Both optimizing presets run ``simplify`` (operations that return an input unchanged go) and
``fuse-rms-norm`` (a pure clean-up: a hand-written RMSNorm becomes one ``RMSNorm`` node, which
ONNX Runtime runs as one fused kernel).

``slots="swappable"`` (or ``"mixed"``) runs ``adapter-slots`` once before the preset: every
LoRA site becomes an adapter slot whose weights are graph inputs, which no pass of any
preset touches, so every adapter stays swappable through ``fused`` and ``merged`` alike
(``dora=[modules]``: those modules' slots also take DoRA's magnitude; ``bias=[modules]``: a bias added to their
output).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes.adapter_slots import adapter_slots
from flora_graph.passes.base import PassFn, accepted_options, get_pass
from flora_graph.passes.pipeline import PassRecord, Pipeline, PipelineReport

__all__ = ["BACKEND_DEFAULTS", "PRESETS", "PRESET_OPTIONS", "optimize", "optimize_with_report"]

PRESETS: dict[str, tuple[str, ...]] = {
    "unfused": (),
    "fused": ("simplify", "fold-lora-scale", "reassociate-low-rank", "fuse-lora-siblings", "fuse-rms-norm", "fuse-rotary",
              "fuse-softcap-attention", "fuse-sink-attention", "share-kv-heads", "fuse-kv-attention", "group-experts", "cse", "dce"),
    "merged": ("simplify", "drop-zero-lora", "fold-lora-scale", "merge-lora", "constant-fold", "fuse-rms-norm", "fuse-rotary",
               "fuse-softcap-attention", "fuse-sink-attention", "share-kv-heads", "fuse-kv-attention", "group-experts", "cse", "dce"),
}
"""Pass names of each preset, in the order a pipeline iteration runs them."""

PRESET_OPTIONS: dict[str, dict[str, Any]] = {"fused": {"swappable": True}}
"""Options a preset sets unless the caller overrides them."""

BACKEND_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # benchmarks/fuse_base_and_down.py (ORT 1.32, one thread, session time with / without): the
    # stacked [W; A] pays off on ORT for Conv2d (demo model 0.89-0.92x at batch 16-256, 1.01x at 1)
    # but not for Linear, whose Split copies the whole output (MLP stack 1.04-1.05x; 4-layer Llama
    # 1.05x at 4x128; built-in decoder 1.05x at 4x128 and 1.05x at 1x1). TorchScript: the stacked
    # Linear measured 0.86-0.94x of plain fused; torch-export 0.93-1.06x, so not there.
    "onnxruntime": {"fused": {"fuse_base_and_down": "Conv2d"}},
    "torchscript": {"fused": {"fuse_base_and_down": True}},
}
"""Options a preset sets when :func:`optimize` is told the backend it optimizes for."""

_OWN_OPTIONS = frozenset({"fuse_base_and_down", "drop_zero_lora", "pack_slots", "skip", "max_iterations", "on_pass"})


def _plan(preset: str | Sequence[str | PassFn], options: dict[str, Any]) -> tuple[list[str | PassFn], dict[str, Any]]:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        passes: list[str | PassFn] = list(PRESETS[preset])
        options = {**PRESET_OPTIONS.get(preset, {}), **options}
    else:
        passes = list(preset)
    if options.get("drop_zero_lora") and "drop-zero-lora" not in passes:
        passes.insert(0, "drop-zero-lora")
    fbd = options.get("fuse_base_and_down")
    if fbd:
        at = passes.index("fuse-lora-siblings") if "fuse-lora-siblings" in passes else len(passes)
        passes.insert(at, "fuse-base-and-down")
    if options.get("pack_slots") and "pack-slots" not in passes:
        at = passes.index("cse") if "cse" in passes else len(passes)
        passes.insert(at, "pack-slots")
    skip = options.get("skip", ())
    skip = {skip} if isinstance(skip, str) else set(skip)
    passes = [p for p in passes if not (isinstance(p, str) and p in skip)]
    fns = [get_pass(p)[1] for p in passes]
    unknown = sorted(k for k in options if k not in _OWN_OPTIONS and k not in ("slots", "dora", "bias")
                     and not any(k in accepted_options(f, {k: 0}) for f in fns))
    if unknown:
        raise TypeError(f"option(s) {unknown} are not accepted by any pass of {[get_pass(p)[0] for p in passes]}")
    pass_options = {k: v for k, v in options.items() if k not in _OWN_OPTIONS and k not in ("dora", "bias")}
    if isinstance(fbd, str):  # fuse_base_and_down="Conv2d": that op's sites alone
        pass_options["only"] = fbd
    return passes, pass_options


def optimize_with_report(graph: Graph, preset: str | Sequence[str | PassFn] = "fused", *, verify_each: bool = False,
                         backend: str | None = None, **options: Any) -> tuple[Graph, PipelineReport]:
    """Like :func:`optimize`, also returning the :class:`PipelineReport` (per-pass stats)."""
    verify(graph)  # an invalid graph is the caller's error: raised before any pass runs
    if backend is not None and isinstance(preset, str):
        options = {**BACKEND_DEFAULTS.get(backend, {}).get(preset, {}), **options}
    passes, pass_options = _plan(preset, dict(options))
    pipeline = Pipeline(passes, verify_each=verify_each, max_iterations=int(options.get("max_iterations", 10)),
                        options=pass_options, on_pass=options.get("on_pass"))
    work = graph.copy(share_weights=True)  # copy-on-write: passes never write a weight
    first = _make_slots(work, options["slots"], verify_each, options.get("on_pass"), options.get("dora", ()),
                        options.get("bias", ())) if options.get("slots") else None
    out, report = pipeline.run(work)
    if first is not None:
        report.records.insert(0, first)
    return out, report


def _make_slots(graph: Graph, slots: str, verify_each: bool, on_pass: Any, dora: Any = (), bias: Any = ()) -> PassRecord:
    """Run ``adapter-slots`` once, before the pipeline (its typed errors reach the caller as they are)."""
    before = sum(1 for n in graph.nodes if n.op not in (Op.INPUT, Op.CONST))
    t0 = time.perf_counter()
    result = adapter_slots(graph, slots=slots, dora=dora, bias=bias)
    if verify_each:
        verify(graph)
    after = sum(1 for n in graph.nodes if n.op not in (Op.INPUT, Op.CONST))
    record = PassRecord("adapter-slots", 0, before, after, result.changed, time.perf_counter() - t0, dict(result.stats))
    if on_pass is not None:
        on_pass(record, graph)
    return record


def optimize(graph: Graph, preset: str | Sequence[str | PassFn] = "fused", *, verify_each: bool = False,
             backend: str | None = None, **options: Any) -> Graph:
    """An optimized copy of ``graph``; ``graph`` itself is never modified.

    The copy shares the weights no pass changed with ``graph`` (read-only views, no bytes
    copied); a changed weight is a new array. Writing into ``graph``'s weights in place
    afterwards therefore shows through the result: copy the result (``Graph.copy()``) first
    when you mean to do that.

    Args:
        graph: the graph; verified first, so an invalid one raises ``GraphError`` before any pass runs.
        preset: ``"unfused"``, ``"fused"``, ``"merged"``, or a sequence of pass names/callables.
        verify_each: verify after every pass (a failure raises ``PassError`` naming the pass).
        backend: the backend the result is for; adds the preset's measured defaults for it
            (:data:`BACKEND_DEFAULTS`), which explicit options override.
        **options: ``fuse_base_and_down=True`` adds that pass to the pipeline (``"Conv2d"`` or
            ``"Linear"``: for that op's sites alone, the onnxruntime default); ``drop_zero_lora=True``
            adds drop-zero-lora to ``fused`` (off there by default: a zero ``B`` may be swapped for a
            trained one later, so ``fused`` keeps every adapter); ``pack_slots=True`` adds pack-slots
            (sibling linear slots on one input become one slot over the concatenated layer: fewer
            nodes per decode step; adapters are then packed by ``serving.slots.pack_params``, which
            the serving sessions and ``write_adapter`` apply); ``skip`` names passes
            to leave out; ``on_pass(record, graph)`` is called after every pass run; ``max_iterations`` bounds the fixed-point loop; any other option goes to the
            passes that declare it (``swappable``, ``peak_flops``, ``bandwidth``, ``dynamic_dim_size``,
            ``max_elements``); ``slots="swappable"`` or ``"mixed"`` first makes every LoRA site an
            adapter slot (the ``adapter-slots`` pass, recorded as iteration 0), which every preset keeps
            intact; it raises :class:`~flora_graph.errors.AdapterError` naming the modules a pass already
            fused or merged. An option no pass accepts raises ``TypeError``.
    """
    return optimize_with_report(graph, preset, verify_each=verify_each, backend=backend, **options)[0]

