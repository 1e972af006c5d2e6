"""``flora-graph serve-export`` / ``serve-package``: the serving layer on the command line.

``flora_graph.cli`` stays a thin layer; it wires these in with ``add_cli(subparsers)``.
Each handler takes ``(args, console)`` and returns the exit status, as the others there do.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape

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


def _refuse(console: Any, message: str) -> int:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return 2


def _package(args: argparse.Namespace, console: Any) -> int:
    # every argument is checked before anything is loaded or written
    from flora_graph.serving.errors import ServingError
    from flora_graph.storage import check_name

    name, source = args.name, Path(args.source)
    try:
        check_name(name, "--name", error=ServingError)
    except ServingError as exc:
        return _refuse(console, str(exc))
    if '"' in name:  # config.pbtxt quotes it
        return _refuse(console, f"--name {name!r} must not hold '\"'")
    if args.max_batch_size < 0:
        return _refuse(console, f"--max-batch-size must be >= 0, got {args.max_batch_size}")
    is_graph = (source / "graph.json").is_file()
    if not (is_graph or source.is_file()):
        return _refuse(console, f"SOURCE {str(source)!r} is neither a .onnx file nor a saved graph directory")
    if args.torchscript and not is_graph:
        return _refuse(console, f"--torchscript needs a saved graph directory as SOURCE, got {str(source)!r}")
    from flora_graph.serving.artifacts import package_torchscript, package_triton

    if args.torchscript:  # scripted and checked first: it refuses what the ONNX entry would refuse, and more
        from flora_graph.ir import Graph

        graph = Graph.load(source)
        ts = package_torchscript(graph, args.out, f"{name}_torchscript", max_batch_size=args.max_batch_size,
                                 archive_name=name)
    root = package_triton(graph if args.torchscript else source, args.out, name, max_batch_size=args.max_batch_size,
                          external_data=True if args.external_data else None)
    console.print(f"Triton model repository entry written to {root}")
    if args.torchscript:
        console.print(f"Triton TorchScript entry (pytorch_libtorch) written to {ts}; the archive alone: {ts / name}.pt "
                      f"(I/O in {ts / name}.json)")
    return 0


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


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
    p.add_argument("--max-batch-size", type=_non_negative_int, default=0,
                   help="Triton max_batch_size (default 0: the batch dim stays in dims)")
    p.add_argument("--external-data", action="store_true", help="write the model as a directory with external data")
    p.add_argument("--torchscript", action="store_true",
                   help="also write the Triton PyTorch entry <name>_torchscript (config.pbtxt, 1/model.pt; with the "
                        "archive <name>.pt + <name>.json beside them); graph SOURCE only")
    p.set_defaults(func=_package)
