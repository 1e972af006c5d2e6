"""``Pipeline``: run passes in order, repeatedly, until none changes the graph (torch.fx ``PassManager``).

With ``verify_each=True`` (tests always ask) the graph is verified after every pass. A
pass that raises, or leaves a graph that does not verify, becomes a :class:`PassError`
naming the pass and the passes already run. Every run of a pass is recorded in a
:class:`PipelineReport`: nodes before/after, rules fired, refusals, time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes.base import PassError, PassFn, PassResult, accepted_options, get_pass

__all__ = ["PassRecord", "Pipeline", "PipelineReport"]


def _count(graph: Graph) -> int:
    return sum(1 for n in graph.nodes if n.op not in (Op.INPUT, Op.CONST))


@dataclass
class PassRecord:
    """One run of one pass: which iteration, op-node counts before/after, whether it changed, its stats."""

    name: str
    iteration: int
    nodes_before: int
    nodes_after: int
    changed: bool
    time_s: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def fired(self) -> dict[str, int]:
        """Rule name -> times fired in this run."""
        return dict(self.stats.get("fired", {}))


@dataclass
class PipelineReport:
    """Every :class:`PassRecord` of a pipeline run, in order, and whether a fixed point was reached."""

    records: list[PassRecord] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per pass: runs, time, rules fired (summed) and the last refusals."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.records:
            t = out.setdefault(r.name, {"runs": 0, "time_s": 0.0, "fired": {}, "refused": {}, "changed": 0})
            t["runs"] += 1
            t["time_s"] += r.time_s
            t["changed"] += int(r.changed)
            for k, v in r.fired.items():
                t["fired"][k] = t["fired"].get(k, 0) + v
            t["refused"].update(r.stats.get("refused", {}))
        return out

    def fired(self) -> dict[str, int]:
        """Rule name -> times fired over the whole run."""
        out: dict[str, int] = {}
        for r in self.records:
            for k, v in r.fired.items():
                out[k] = out.get(k, 0) + v
        return out

    def format(self) -> str:
        """A small text table: one line per pass run."""
        lines = [f"{'iter':>4}  {'pass':<22} {'nodes':>13}  {'ms':>8}  fired"]
        for r in self.records:
            fired = ", ".join(f"{k} x{v}" for k, v in r.fired.items()) or "-"
            lines.append(f"{r.iteration:>4}  {r.name:<22} {r.nodes_before:>5} -> {r.nodes_after:<5}  "
                         f"{r.time_s * 1e3:>8.2f}  {fired}")
        lines.append(f"{'converged' if self.converged else 'NOT converged'} after {self.iterations} iteration(s)")
        return "\n".join(lines)

    __str__ = format


class Pipeline:
    """Passes (registered names or callables) run in order to a fixed point, at most ``max_iterations`` times.

    ``options`` are handed to each pass that declares them as keyword parameters;
    ``on_pass(record, graph)`` is called after every pass run (inspection, ``--print-after``).
    """

    def __init__(self, passes: Sequence[str | PassFn], *, verify_each: bool = False, max_iterations: int = 10,
                 options: Mapping[str, Any] | None = None,
                 on_pass: Callable[[PassRecord, Graph], None] | None = None) -> None:
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        self.passes: list[tuple[str, PassFn]] = [get_pass(p) for p in passes]
        self.verify_each = verify_each
        self.max_iterations = max_iterations
        self.options = dict(options or {})
        self.on_pass = on_pass

    @property
    def pass_name(self) -> str:
        """The name a pipeline run as a pass is recorded under: ``pipeline[a,b,...]``."""
        return f"pipeline[{','.join(self.names)}]"

    @property
    def names(self) -> list[str]:
        """The pass names, in order."""
        return [n for n, _ in self.passes]

    def run(self, graph: Graph) -> tuple[Graph, PipelineReport]:
        """Run to a fixed point; passes may edit ``graph`` in place. Returns the graph and the report."""
        report = PipelineReport()
        ran: list[str] = []
        for it in range(1, self.max_iterations + 1):
            report.iterations = it
            changed = False
            for name, fn in self.passes:
                before = _count(graph)
                t0 = time.perf_counter()
                where = f"pass {name!r} (iteration {it}; passes run before it: {ran or 'none'})"
                try:
                    result = fn(graph, **accepted_options(fn, self.options))
                except PassError:
                    raise
                except Exception as exc:
                    raise PassError(f"{where} failed: {type(exc).__name__}: {exc}", name, ran) from exc
                if not isinstance(result, PassResult):
                    raise PassError(f"{where} returned {type(result).__name__}, not a PassResult", name, ran)
                if self.verify_each:
                    try:
                        verify(result.graph)
                    except Exception as exc:
                        raise PassError(f"{where} left an invalid graph: {exc}", name, ran) from exc
                graph = result.graph
                record = PassRecord(name, it, before, _count(graph), result.changed,
                                    time.perf_counter() - t0, dict(result.stats))
                report.records.append(record)
                if self.on_pass is not None:
                    self.on_pass(record, graph)
                ran.append(name)
                changed |= result.changed
            if not changed:
                report.converged = True
                break
        return graph, report

    def __call__(self, graph: Graph) -> PassResult:
        """Run as a pass itself: ``PassResult(graph, changed, {"report": PipelineReport})``."""
        graph, report = self.run(graph)
        return PassResult(graph, any(r.changed for r in report.records), {"report": report})
