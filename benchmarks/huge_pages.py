"""Huge pages under an ONNX Runtime session: the load time they add and the step time they save.

Builds a chain of ``--layers`` square ``MatMul`` layers holding ``--mb`` MB of float32 weights (external data, in a
temporary folder), then, for ``--rounds`` rounds, loads it in a fresh process as a server would
(:class:`flora_graph.serving.session.OrtModel`, 1 thread) with ``huge_pages=True`` and with ``huge_pages=False``,
in an order and then in its reverse, and times the load and ``--steps`` calls on one row (after 3 untimed):
a decode step's access pattern, every weight read once. Prints the medians, the step ratio (small pages / huge
pages) and the load time huge pages add per MB of weights, and how much the sessions collapsed.
Run: ``python benchmarks/huge_pages.py [--mb 512]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(folder: Path, mb: int, layers: int) -> Path:
    """The model ``folder/chain.onnx``: ``layers`` square MatMuls, ``mb`` MB of weights in all."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    side = int((mb * 2**20 / 4 / layers) ** 0.5) // 16 * 16
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((side, side)) / side**0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, side])], inits)
    path = folder / "chain.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, location="chain.onnx.data")
    return path


def worker(path: str, huge: bool, steps: int) -> None:
    """One fresh process: load, 3 untimed calls, ``steps`` timed ones; prints a JSON line."""
    import numpy as np

    from flora_graph.serving.session import OrtModel

    t0 = time.perf_counter()
    model = OrtModel(path, intra_op_threads=1, huge_pages=huge)
    load = time.perf_counter() - t0
    side = model.inputs["x"][0][1]
    feeds = {"x": np.ones((1, side), np.float32)}
    for _ in range(3):
        model.session.run(None, feeds)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.session.run(None, feeds)
        times.append(time.perf_counter() - t)
    print(json.dumps({"load": load, "step": statistics.median(times), "collapsed": model.huge_pages.bytes,
                      "reason": model.huge_pages.reason}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mb", type=int, default=512, help="MB of float32 weights")
    p.add_argument("--layers", type=int, default=32, help="square MatMul layers holding them")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each loading the model both ways twice")
    p.add_argument("--steps", type=int, default=20, help="timed calls per load")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "HUGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1] == "1", args.steps)
        return 0
    with tempfile.TemporaryDirectory(prefix="flora_graph_huge_pages_") as tmp:
        path = build(Path(tmp), args.mb, args.layers)
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.rounds):
            for huge in (True, False, False, True):
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", str(path),
                                      "1" if huge else "0"], capture_output=True, text=True, check=True)
                runs[huge].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {h: {k: statistics.median(r[k] for r in rs) for k in ("load", "step", "collapsed")} for h, rs in runs.items()}
    print(f"{args.layers} MatMuls, {args.mb} MB of float32 weights, one row, 1 thread, a fresh process per load "
          f"(medians of {2 * args.rounds} loads each way):")
    for huge in (False, True):
        m = med[huge]
        print(f"  huge_pages={huge}: load {m['load']:.2f} s, step {m['step'] * 1e3:.2f} ms, "
              f"collapsed {m['collapsed'] / 2**20:.0f} MiB" + (f" ({runs[huge][0]['reason']})" if runs[huge][0]['reason'] else ""))
    print(f"  step small / huge pages {med[False]['step'] / med[True]['step']:.2f}x; load "
          f"{(med[True]['load'] - med[False]['load']) / args.mb * 1e3:+.2f} ms per MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
