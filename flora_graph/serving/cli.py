"""``flora-graph serve-export`` / ``serve-package``: the serving layer on the command line.

``flora_graph.cli`` stays a thin layer; it wires these in with ``add_cli(subparsers)``.
Each handler takes ``(args, console)`` and returns the exit status, as the others there do.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_cli"]


def _export(args: argparse.Namespace, console: Any) -> int:
    from flora_graph.ir import Graph
    from flora_graph.serving.adapter_file import write_adapter
    from flora_graph.serving.export import export_mixed, export_swappable
    from flora_graph.serving.slots import graph_adapter_params

    graph = Graph.load(args.graph)
    model = (export_mixed if args.mixed else export_swappable)(graph, args.out)
    kind = "mixed-adapter" if args.mixed else "swappable"
    console.print(f"{kind} model written to {args.out} ({len(model.graph.input)} inputs)")
    if args.adapter:
        swappable = model if not args.mixed else export_swappable(graph)
        write_adapter(args.adapter, graph_adapter_params(graph), model=swappable)
        console.print(f"the graph's own adapter written to {args.adapter}")
    return 0


def _package(args: argparse.Namespace, console: Any) -> int:
    from flora_graph.serving.artifacts import export_torchscript, package_triton

    root = package_triton(args.source, args.out, args.name, max_batch_size=args.max_batch_size,
                          external_data=True if args.external_data else None)
    console.print(f"Triton model repository entry written to {root}")
    if args.torchscript:
        from flora_graph.ir import Graph

        if not (Path(args.source) / "graph.json").is_file():
            console.print("[red]--torchscript needs a saved graph directory as SOURCE[/red]")
            return 2
        pt, meta = export_torchscript(Graph.load(args.source), Path(args.out) / f"{args.name}_torchscript", args.name)
        console.print(f"TorchScript written to {pt} (I/O in {meta})")
    return 0


def add_cli(subparsers: Any) -> None:
    """Add the ``serve-export`` and ``serve-package`` subcommands to ``subparsers`` (``add_subparsers()``)."""
    e = subparsers.add_parser("serve-export", help="export a saved graph with swappable (or per-row) LoRA adapters")
    e.add_argument("graph", help="graph directory (Graph.save / demo --save) with LoRA branches")
    e.add_argument("out", help="the .onnx file to write")
    e.add_argument("--mixed", action="store_true", help="per-row adapters (stacked weights + adapter_index)")
    e.add_argument("--adapter", metavar="FILE", help="also write the graph's own adapter as an .onnx_adapter file")
    e.set_defaults(func=_export)
    p = subparsers.add_parser("serve-package", help="write a Triton model repository (and TorchScript) for a model")
    p.add_argument("source", help="a .onnx file or a saved graph directory")
    p.add_argument("out", help="the model repository directory")
    p.add_argument("--name", required=True, help="the Triton model name")
    p.add_argument("--max-batch-size", type=int, default=0, help="Triton max_batch_size (default 0: batch dim in dims)")
    p.add_argument("--external-data", action="store_true", help="write the model as a directory with external data")
    p.add_argument("--torchscript", action="store_true", help="also write <name>.pt + <name>.json (graph SOURCE only)")
    p.set_defaults(func=_package)
