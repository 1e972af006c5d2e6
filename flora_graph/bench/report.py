"""Tables and plots for benchmark reports."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from flora_graph.bench.latency import BenchReport
from flora_graph.storage import atomic_write_figure

__all__ = ["latency_table", "plot_latency"]


def _x(v: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if v is None else fmt.format(v)


def latency_table(report: BenchReport) -> Table:
    """A rich table: variant, median latency, ratio to merged (same backend), speed-up over eager."""
    t = Table(title=f"{report.model}  inputs {report.inputs}  threads={report.threads}  rounds={report.rounds}")
    t.add_column("variant", no_wrap=True, min_width=22)
    t.add_column("median ms", justify="right")
    t.add_column("vs merged", justify="right")
    t.add_column("speed-up vs eager", justify="right")
    t.add_column("max |diff| vs eager", justify="right")
    for r in sorted(report.rows, key=lambda r: (r.backend, r.preset)):
        t.add_row(r.name, f"{r.median_ms:.4f}", _x(r.vs_merged), _x(r.vs_eager), _x(r.max_abs_diff, "{:.1e}"))
    return t


def plot_latency(reports: list[BenchReport], path: str | Path) -> None:
    """A PNG bar chart of median latency per variant, one panel per report (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"eager": "#888888", "unfused": "#d62728", "fused": "#1f77b4", "merged": "#2ca02c", "base": "#9467bd"}
    fig, axes = plt.subplots(len(reports), 1, figsize=(10, 3.2 * len(reports)), squeeze=False)
    for ax, rep in zip(axes[:, 0], reports, strict=True):
        rows = sorted(rep.rows, key=lambda r: (r.backend, r.preset))
        ax.bar(range(len(rows)), [r.median_ms for r in rows], color=[colours.get(r.preset, "#333333") for r in rows])
        ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("median ms")
        ax.set_title(f"{rep.model} {rep.inputs} (threads={rep.threads})", fontsize=9)
    fig.tight_layout()
    atomic_write_figure(path, fig)
