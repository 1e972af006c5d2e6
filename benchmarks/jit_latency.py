"""JIT latency: eager vs torch.compile (inductor) vs torch.compile(backend="flora_graph") vs flora_graph.jit.

Run: python benchmarks/jit_latency.py [--rounds 300] [--inner 5] [--batches 1 4 16] [--json out.json]

The demo model (``build_demo_model()``: a CNN + MLP with LoRA on all five conv/linear
layers, nonzero ``B``) on ``image`` inputs of shape ``[batch, 3, 16, 16]``. ``dynamo-noop``
is a torch.compile backend that does no work: the floor every torch.compile backend pays. Fixed threads:
``torch.set_num_threads(1)``, onnxruntime ``intra_op_threads=1``, ``inter_op_threads=1``,
``allow_spinning=False``. Everything runs under ``torch.no_grad()``.

First-call time: the wall time of the first call at each batch size, batches in increasing
order, before any timing. torch.compile variants are compiled afresh per batch (see
:func:`variants`), so theirs is a full compile; a flora_graph.jit wrapper compiles batch 1
as a static graph and batch 4 with a dynamic batch dim, which batch 16 reuses (about a
millisecond). Then every (variant, batch) pair is timed in one interleaved run
(:func:`time_interleaved`); medians in microseconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import types
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config

from flora_graph.bench.timing import median_ms, time_interleaved
from flora_graph.jit import jit
from flora_graph.models import build_demo_model, demo_inputs

ORT = {"intra_op_threads": 1, "inter_op_threads": 1, "allow_spinning": False}


def own_code(model: torch.nn.Module, tag: str) -> torch.nn.Module:
    """A copy of ``model`` whose ``forward`` has a code object of its own.

    Dynamo caches compiled graphs per code object; variants sharing ``DemoNet.forward``
    would each search past the others' cache entries (and their guards) on every call.
    """
    fn = type(model).forward
    code = fn.__code__.replace(co_name=f"forward_{tag.replace('-', '_')}")
    forward = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone = copy.deepcopy(model)
    clone.__class__ = type(f"{type(model).__name__}_{tag}", (type(model),), {"forward": forward})
    return clone


def variants(model: torch.nn.Module, inductor: bool, batches: list[int]) -> dict[tuple[str, int], Callable[[torch.Tensor], torch.Tensor]]:
    """The callables compared, keyed by (variant, batch).

    torch.compile variants get one compile per batch, each on a code object of its own: a
    single dynamo cache entry, as a server with one input shape has (several entries on
    one code object are searched in turn, guards and all, which would charge a shape for
    the others' entries). Each flora_graph.jit variant is one wrapper across all batches:
    its cache is a dict keyed by signature.
    """
    out: dict[tuple[str, int], Callable[[torch.Tensor], torch.Tensor]] = {}
    jits = {p: jit(model, preset=p, **ORT) for p in ("fused", "merged")}
    for b in batches:
        out[("eager", b)] = model
        if inductor:
            out[("inductor", b)] = torch.compile(own_code(model, f"inductor_{b}"))
        for preset in ("fused", "merged"):
            tag = f"backend-{preset}"
            out[(tag, b)] = torch.compile(own_code(model, f"{tag}_{b}"), backend="flora_graph",
                                          options={"preset": preset, **ORT})
        for preset, jm in jits.items():
            out[(f"jit-{preset}", b)] = jm
        out[("dynamo-noop", b)] = torch.compile(own_code(model, f"noop_{b}"), backend=noop_backend)
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
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--no-inductor", action="store_true", help="skip torch.compile's default backend")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.no_inductor:
        inductor_config.force_disable_caches = True  # first-call times are cold compiles, not cache hits

    model = build_demo_model()
    inputs = {b: demo_inputs(b, seed=b)["image"] for b in args.batches}
    fns = variants(model, not args.no_inductor, args.batches)
    names = list(dict.fromkeys(n for n, _ in fns))
    first: dict[tuple[str, int], float] = {}
    diff: dict[tuple[str, int], float] = {}
    errors: dict[str, str] = {}
    with torch.no_grad():
        for (name, b), fn in list(fns.items()):  # batches in increasing order: a jit wrapper reuses its batch-4 graph
            if name in errors:
                del fns[(name, b)]
                continue
            x = inputs[b]
            t0 = time.perf_counter()
            try:
                y = fn(x)
            except Exception as exc:  # e.g. inductor without a working C++ toolchain
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del fns[(name, b)]
                continue
            first[(name, b)] = time.perf_counter() - t0
            diff[(name, b)] = float((y - model(x)).abs().max())
        names = [n for n in names if n not in errors]
        timed = {key: (lambda fn=fn, x=inputs[key[1]]: fn(x)) for key, fn in fns.items()}
        samples = time_interleaved(timed, rounds=args.rounds, warmup=5, inner=args.inner)

    med = {k: median_ms(v) * 1e3 for k, v in samples.items()}
    print(f"demo model, image [batch, 3, 16, 16], torch {torch.__version__}, {platform.machine()}, "
          f"threads=1 (torch and onnxruntime), rounds={args.rounds} inner={args.inner}")
    head = f"{'variant':<16}" + "".join(f"{'b=' + str(b) + ' us':>12}{'x eager':>9}" for b in args.batches)
    print(head + "".join(f"{'1st b=' + str(b) + ' s':>12}" for b in args.batches) + f"{'max|diff|':>11}")
    for name in names:
        row = f"{name:<16}"
        for b in args.batches:
            row += f"{med[(name, b)]:>12.1f}{med[('eager', b)] / med[(name, b)]:>9.2f}"
        row += "".join(f"{first[(name, b)]:>12.3f}" for b in args.batches)
        row += f"{max(diff[(name, b)] for b in args.batches):>11.1e}"
        print(row)
    for name, err in errors.items():
        print(f"{name}: failed: {err}")
    jits = {n: f for (n, _), f in fns.items() if n.startswith("jit-")}
    print("jit compiles over all batches: " + ", ".join(f"{n}={f.compile_count}" for n, f in jits.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_us": {f"{n}@{b}": v for (n, b), v in med.items()},
                       "first_call_s": {f"{n}@{b}": v for (n, b), v in first.items()},
                       "max_abs_diff": {f"{n}@{b}": v for (n, b), v in diff.items()}, "errors": errors}, f, indent=1)


if __name__ == "__main__":
    main()
