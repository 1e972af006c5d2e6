"""The ``torch.compile`` backend ``"flora_graph"``.

Registered through the ``torch_dynamo_backends`` entry point (``pyproject.toml``), so after
``pip install``::

    compiled = torch.compile(model, backend="flora_graph")                         # preset "auto"
    compiled = torch.compile(model, backend="flora_graph", options={"preset": "fused"})

Each fx graph dynamo captures goes through AOT autograd to ATen. What happens next depends
on whether autograd must record:

* **inference** (``torch.no_grad()``/``inference_mode``, or nothing requires grad): AOT's
  inference graph is canonicalized, split into islands the capture table converts, and each
  island is converted to the IR, optimized with ``preset`` and compiled for ``backend`` on its
  first call, with the weights it reads then (dynamo marks parameters and buffers as static
  inputs). A weight whose version counter or data pointer moves rebuilds the island; a new
  module structure makes dynamo recompile. Ops outside the table (reductions, comparisons
  from graph breaks, ...) run in torch, named once in a :class:`LoweringFallbackWarning`.
* **training** (grad enabled and a weight or input requiring grad): forward and backward
  are AOT's ATen graphs run by torch (as ``backend="aot_eager"`` does); flora_graph compiles
  no backward, so the forward stays differentiable and correct.

Options (``options={...}``): ``preset`` (``auto``, the default, or ``fused``, ``merged``,
``unfused``), ``backend``
(``onnxruntime``, ``numpy``, ``torchscript``, ``torch-export``), ``fallback`` (``"torch"``:
ops outside the table run in torch, warned once; ``"error"``: raise
:class:`UnsupportedOpError`), ``check_weights`` (``"version"``/``"content"``, see
:mod:`flora_graph.torch_jit.fingerprint`), ``on_compile`` (called with each optimized IR graph),
and any option of the flora_graph backend (``intra_op_threads``, ``allow_spinning``, ...).

Choosing a preset: the compiled graph is private to the backend and rebuilt from the live
module whenever a weight changes, so keeping adapters swappable (what ``fused`` is for in
an export) buys nothing here. The default ``auto`` (:mod:`flora_graph.torch_jit.presets`) runs
``merged`` on an island whose weights are all float32/float64, the fastest form
(``benchmarks/jit_latency.py``, built-in decoder at 1x32: ``merged`` 3.1-3.2x eager,
``fused`` 2.6-2.9x over three runs; ONNX Runtime's small products dominate there and the
LoRA branches are 40 of the session's ~200 us), and ``fused`` where a weight is float16/bfloat16: merging rounds
``W + s * B @ A`` to the weight's dtype once, which in half precision can drop a small
update that ``fused``, computing the low-rank product apart, keeps.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from torch import fx

from flora_graph.errors import FloraGraphError
from flora_graph.torch_jit.canonicalize import canonicalize
from flora_graph.torch_jit.fingerprint import check_mode
from flora_graph.torch_jit.fx_islands import STATS, WARNED, LoweringConfig, LoweringStats, partition
from flora_graph.torch_jit.presets import check_preset

__all__ = ["config_from_options", "flora_graph_backend", "reset_stats", "stats"]

_OWN = ("preset", "backend", "fallback", "check_weights", "on_compile")
_counter = itertools.count()


def config_from_options(options: Mapping[str, Any] | None) -> LoweringConfig:
    """Validate ``torch.compile(..., options=...)`` for this backend."""
    options = dict(options or {})
    own = {k: options.pop(k) for k in _OWN if k in options}
    config = LoweringConfig(**own, backend_options=options)
    check_preset(config.preset, "flora_graph backend")
    if config.fallback not in ("torch", "error"):
        raise FloraGraphError(f"flora_graph backend: fallback={config.fallback!r} must be 'torch' or 'error'")
    check_mode(config.check_weights)
    return config


def stats() -> LoweringStats:
    """The backend's process-wide counters (graphs, islands, compiles, ops left to torch)."""
    return STATS


def reset_stats() -> None:
    """Zero :func:`stats` and re-arm the once-per-process fallback warnings."""
    for f in dataclasses.fields(LoweringStats):
        setattr(STATS, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    WARNED.clear()


def _static_indices(count: int) -> list[int] | None:
    """Positions of the graph inputs dynamo marked static (parameters and buffers), if known."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    found = getattr(meta, "static_input_indices", None)
    if found is None:
        return None  # decided at the first call: nn.Parameter arguments are the weights
    return [i for i in found if i < count]


def _torch_compiler(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[[list], Any]:
    """Training forward/backward: AOT's ATen graph, run by torch."""
    STATS.torch_graphs += 1

    def run(args: list) -> Any:
        values = list(args)
        args.clear()
        return gm(*values)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _inference_compiler(config: LoweringConfig, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[[list], Any]:
    STATS.inference_graphs += 1
    canonicalize(gm)
    count = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    run = partition(gm, _static_indices(count), config, name=f"dynamo_{next(_counter)}")
    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def flora_graph_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The ``torch.compile`` backend: lowers dynamo's graphs through AOT autograd to flora_graph.

    Args:
        gm: the graph dynamo captured.
        example_inputs: its example inputs.
        options: see the module docstring (``preset``, ``backend``, ``fallback``, ...).
        mode: only ``None``/``"default"``; flora_graph has no other torch.compile modes.
    """
    if mode not in (None, "default"):
        raise FloraGraphError(f"flora_graph backend has no torch.compile mode {mode!r}")
    config = config_from_options(options)
    STATS.graphs += 1
    from torch._dynamo.backends.common import aot_autograd

    backend = aot_autograd(
        fw_compiler=_torch_compiler,
        bw_compiler=_torch_compiler,
        inference_compiler=partial(_inference_compiler, config),
    )
    return backend(gm, example_inputs)

