"""Benchmarks: fused vs unfused inference latency, compiler pipeline speed, reports."""

from __future__ import annotations

from flora_graph.bench.latency import BenchReport, BenchRow, bench_model
from flora_graph.bench.timing import median_ms, time_interleaved

__all__ = ["BenchReport", "BenchRow", "bench_model", "median_ms", "time_interleaved"]
