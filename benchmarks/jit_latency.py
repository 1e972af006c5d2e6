"""JIT latency: eager vs torch.compile (inductor) vs torch.compile(backend="flora_graph") vs flora_graph.torch_jit.

Run: python benchmarks/jit_latency.py [--model decoder|cnn] [--shapes 1x1 1x32 4x128] [--rounds 300]
     [--inner 5] [--json out.json]

The default model is the package's demo model (what ``flora-graph demo`` builds): the built-in
byte-level Llama-style decoder (``build_decoder(lora_rank=8)``: LoRA on all seven projections
of both blocks, nonzero ``B``) on int64 ``input_ids`` of shape ``[batch, seq]``; shapes are
``BxS`` (default ``1x1 1x32 4x128``). ``--model cnn`` picks the small CNN + MLP
(``build_demo_model()``: LoRA on its five conv/linear layers) on ``image`` inputs
``[batch, 3, 16, 16]``; its shapes are batch sizes (default ``1 4 16``).

Variants: ``eager`` (the adapted model, unmerged), ``inductor`` (``torch.compile``),
``dynamo-noop`` (a torch.compile backend that does no work: the floor every torch.compile
backend pays), ``backend`` (``torch.compile(backend="flora_graph")`` with its default preset,
``auto``: ``merged`` for these float32 weights; the run prints what it resolved to),
``backend-fused`` (``options={"preset": "fused"}``) and ``jit-fused``/``jit-merged``
(``flora_graph.jit``). Fixed threads:
``torch.set_num_threads(1)``, onnxruntime ``intra_op_threads=1``, ``inter_op_threads=1``,
``allow_spinning=False``. Everything runs under ``torch.no_grad()``, on the same model
weights and the same inputs.

First-call time: the wall time of the first call at each shape, shapes in the order given,
before any timing. torch.compile variants are compiled afresh per shape (see
:func:`variants`), so theirs is a full compile (inductor's caches disabled); a
flora_graph.jit wrapper is one per preset across all shapes, so a shape whose signature it
has already compiled (a dynamic batch/sequence dim) reuses that graph. Then every
(variant, shape) pair is timed in one interleaved run (:func:`time_interleaved`); medians
in microseconds, with ``x eager`` = eager / variant and ``x ind`` = inductor / variant
(above 1: faster). The 10th percentile is printed too: on a machine shared with other work,
preemption inflates long calls (eager) more than short ones, and the lower decile shows it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
import types
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config

from flora_graph.bench.timing import median_ms, time_interleaved
from flora_graph.torch_jit import jit
from flora_graph.torch_jit import stats as backend_stats

ORT = {"intra_op_threads": 1, "inter_op_threads": 1, "allow_spinning": False}
DEFAULT_SHAPES = {"decoder": ["1x1", "1x32", "4x128"], "cnn": ["1", "4", "16"]}


def own_code(model: torch.nn.Module, tag: str) -> torch.nn.Module:
    """A shallow copy of ``model`` whose ``forward`` has a code object of its own.

    Dynamo caches compiled graphs per code object; variants sharing ``Decoder.forward``
    would each search past the others' cache entries (and their guards) on every call.
    The copy shares ``model``'s submodules and weights (as eager and the jit wrappers do):
    every variant reads the same tensors, and a weight edit reaches all of them.
    """
    fn = type(model).forward
    code = fn.__code__.replace(co_name=f"forward_{tag.replace('-', '_')}")
    forward = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone = copy.copy(model)
    clone.__class__ = type(f"{type(model).__name__}_{tag}", (type(model),), {"forward": forward})
    return clone


def build(model: str, shapes: list[str]) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """The model, one seeded input per shape label, and a description of the input."""
    if model == "decoder":
        from flora_graph.models import build_decoder

        net = build_decoder(lora_rank=8)
        vocab = net.config.vocab_size
        inputs = {}
        for k, s in enumerate(shapes):
            b, n = (int(v) for v in s.split("x"))
            inputs[s] = torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(k))
        return net, inputs, "decoder (build_decoder(lora_rank=8)), input_ids int64 [batch, seq]"
    from flora_graph.models import build_demo_model, demo_inputs

    return (build_demo_model(), {s: demo_inputs(int(s), seed=int(s))["image"] for s in shapes},
            "cnn (build_demo_model()), image [batch, 3, 16, 16]")


def variants(model: torch.nn.Module, inductor: bool, shapes: list[str]) -> dict[tuple[str, str], Callable[[torch.Tensor], torch.Tensor]]:
    """The callables compared, keyed by (variant, shape).

    torch.compile variants get one compile per shape, each on a code object of its own: a
    single dynamo cache entry, as a server with one input shape has (several entries on
    one code object are searched in turn, guards and all, which would charge a shape for
    the others' entries). Each flora_graph.jit variant is one wrapper across all shapes:
    its cache is a dict keyed by signature.
    """
    out: dict[tuple[str, str], Callable[[torch.Tensor], torch.Tensor]] = {}
    jits = {p: jit(model, preset=p, **ORT) for p in ("fused", "merged")}
    for s in shapes:
        tag = s.replace("x", "_")
        out[("eager", s)] = model
        if inductor:
            out[("inductor", s)] = torch.compile(own_code(model, f"inductor_{tag}"))
        out[("dynamo-noop", s)] = torch.compile(own_code(model, f"noop_{tag}"), backend=noop_backend)
        for name, preset in (("backend", {}), ("backend-fused", {"preset": "fused"})):
            out[(name, s)] = torch.compile(own_code(model, f"{name.replace('-', '_')}_{tag}"), backend="flora_graph",
                                           options={**preset, **ORT})
        for preset, jm in jits.items():
            out[(f"jit-{preset}", s)] = jm
    return out


def noop_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """The torch.compile tax alone: dynamo's guards and AOT autograd's wrappers around a function
    that hands back the output of its first call (correct here only because the input never changes)."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(fw: torch.fx.GraphModule, inputs: list) -> Callable:
        ready: list[torch.Tensor] = []

        def run(args: list) -> list:
            if not ready:  # built on the first real call: the compiler itself runs under fake tensors
                ready.extend(fw(*args))
            args.clear()
            return list(ready)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    return aot_autograd(fw_compiler=compiler)(gm, example_inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(DEFAULT_SHAPES), default="decoder")
    ap.add_argument("--shapes", nargs="+", help="decoder: BxS (default 1x1 1x32 4x128); cnn: batch sizes (default 1 4 16)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--no-inductor", action="store_true", help="skip torch.compile's default backend")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    shapes = args.shapes or DEFAULT_SHAPES[args.model]
    torch.set_num_threads(1)
    if not args.no_inductor:
        inductor_config.force_disable_caches = True  # first-call times are cold compiles, not cache hits

    model, inputs, what = build(args.model, shapes)
    fns = variants(model, not args.no_inductor, shapes)
    names = list(dict.fromkeys(n for n, _ in fns))
    first: dict[tuple[str, str], float] = {}
    diff: dict[tuple[str, str], float] = {}
    errors: dict[str, str] = {}
    with torch.no_grad():
        for (name, s), fn in list(fns.items()):  # shapes in order: a jit wrapper reuses the graphs it has
            if name in errors:
                del fns[(name, s)]
                continue
            x = inputs[s]
            t0 = time.perf_counter()
            try:
                y = fn(x)
            except Exception as exc:  # e.g. inductor without a working C++ toolchain
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del fns[(name, s)]
                continue
            first[(name, s)] = time.perf_counter() - t0
            diff[(name, s)] = float((y - model(x)).abs().max())
        names = [n for n in names if n not in errors]
        timed = {key: (lambda fn=fn, x=inputs[key[1]]: fn(x)) for key, fn in fns.items()}
        samples = time_interleaved(timed, rounds=args.rounds, warmup=5, inner=args.inner)

    med = {k: median_ms(v) * 1e3 for k, v in samples.items()}
    p10 = {k: sorted(v)[len(v) // 10] * 1e6 for k, v in samples.items()}
    ind = "inductor" in names
    load = f", load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    print(f"{what}, torch {torch.__version__}, {platform.machine()}, threads=1 (torch and onnxruntime), "
          f"rounds={args.rounds} inner={args.inner}{load}")
    for label, fig in (("median", med), ("10th percentile (less sensitive to other load on the CPUs)", p10)):
        print(f"{label}: us per call; x eager = eager/variant" + (", x ind = inductor/variant" if ind else "") + " (>1: faster)")
        print(f"{'variant':<16}" + "".join(f"{s + ' us':>11}{'x eager':>8}" + (f"{'x ind':>7}" if ind else "") for s in shapes))
        for name in names:
            row = f"{name:<16}"
            for s in shapes:
                row += f"{fig[(name, s)]:>11.1f}{fig[('eager', s)] / fig[(name, s)]:>8.2f}"
                row += f"{fig[('inductor', s)] / fig[(name, s)]:>7.2f}" if ind else ""
            print(row)
    print("first call (s) and max |variant - eager|")
    print(f"{'variant':<16}" + "".join(f"{'1st ' + s:>11}" for s in shapes) + f"{'max|diff|':>11}")
    for name in names:
        row = f"{name:<16}" + "".join(f"{first[(name, s)]:>11.3f}" for s in shapes)
        print(row + f"{max(diff[(name, s)] for s in shapes):>11.1e}")
    for name, err in errors.items():
        print(f"{name}: failed: {err}")
    jits = {n: f for (n, _), f in fns.items() if n.startswith("jit-")}
    print("jit compiles over all shapes: " + ", ".join(f"{n}={f.compile_count}" for n, f in jits.items()))
    print(f"flora_graph backend compiles per preset run (both backend variants): {dict(backend_stats().presets)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "median_us": {f"{n}@{s}": v for (n, s), v in med.items()},
                       "p10_us": {f"{n}@{s}": v for (n, s), v in p10.items()},
                       "first_call_s": {f"{n}@{s}": v for (n, s), v in first.items()},
                       "max_abs_diff": {f"{n}@{s}": v for (n, s), v in diff.items()}, "errors": errors}, f, indent=1)


if __name__ == "__main__":
    main()
