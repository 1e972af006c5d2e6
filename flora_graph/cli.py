"""``flora-graph``: a thin command line over the public functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from flora_graph.errors import FloraGraphError

__all__ = ["main"]


def _demo(args: argparse.Namespace, console: Console) -> int:
    from flora_graph.demo import run_demo

    with console.status("starting") as status:
        report = run_demo(tuple(args.batch), rank=args.rank, save=args.save, progress=lambda m: status.update(m))
    console.print(f"[bold]{report.graph.summary()}[/bold]")
    console.print(f"adapters captured: {report.adapters}; capture took {report.capture_s:.2f} s")
    if args.print_graph:
        console.print(report.graph.format(), markup=False, highlight=False, soft_wrap=True)
    for b, d in report.max_abs_diff.items():
        mark = "[green]ok[/green]" if d <= report.tolerance else "[red]MISMATCH[/red]"
        console.print(f"batch {b}: max |numpy reference - eager torch| = {d:.3e}  {mark}")
    if args.save:
        console.print(f"graph saved to {args.save}")
    return 0 if report.ok else 1


def _show(args: argparse.Namespace, console: Console) -> int:
    from flora_graph.ir import Graph

    graph = Graph.load(args.path)
    console.print(graph.summary())
    console.print(graph.format(meta=not args.no_meta), markup=False, highlight=False, soft_wrap=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flora-graph``."""
    p = argparse.ArgumentParser(prog="flora-graph", description="A LoRA-aware graph compiler for PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="capture the built-in adapted model and check it against eager torch")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to run (default: 1 4)")
    d.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4)")
    d.add_argument("--print-graph", action="store_true", help="print the captured graph")
    d.add_argument("--save", metavar="DIR", help="save the captured graph (JSON + safetensors) to DIR")
    d.set_defaults(func=_demo)
    s = sub.add_parser("show", help="print a saved graph")
    s.add_argument("path", help="directory written by Graph.save / demo --save")
    s.add_argument("--no-meta", action="store_true", help="leave out adapter tags")
    s.set_defaults(func=_show)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flora-graph`` console script."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return args.func(args, console)
    except FloraGraphError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
