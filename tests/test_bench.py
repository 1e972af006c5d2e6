"""Benchmark harness: interleaving, report contents, files written. No timing asserts."""

from __future__ import annotations

import json

import pytest

from flora_graph.bench import bench_model, time_interleaved
from flora_graph.bench.report import latency_table, plot_latency
from flora_graph.ir.draw import draw_graphs
from flora_graph.models import build_demo_model, demo_inputs


def test_time_interleaved_rotates_the_order_and_counts_every_call():
    calls: list[str] = []
    variants = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    samples = time_interleaved(variants, rounds=3, warmup=1, inner=2)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    timed = calls[3:]  # after one warm-up round of a, b, c
    firsts = [timed[i * 6] for i in range(3)]
    assert firsts == ["a", "b", "c"]  # each round starts with the next variant
    assert len(calls) == 3 + 3 * 3 * 2
    with pytest.raises(ValueError):
        time_interleaved(variants, rounds=0)


def test_bench_model_reports_every_variant_checked_against_eager(tmp_path):
    report = bench_model(build_demo_model(), demo_inputs(2), {"image": {0: "batch"}}, demo_inputs(1, seed=3),
                         name="demo", backends=("onnxruntime", "torchscript"), rounds=2, warmup=0)
    names = {r.name for r in report.rows}
    assert names == {"eager/torch"} | {f"{p}/{b}" for p in ("unfused", "fused", "merged", "base") for b in ("onnxruntime", "torchscript")}
    for r in report.rows:
        assert r.median_ms > 0
        if r.preset in ("unfused", "fused", "merged"):
            assert r.max_abs_diff is not None and r.max_abs_diff < 1e-5, r
    assert report.row("merged/onnxruntime").vs_merged == 1.0
    assert report.row("eager/torch").vs_eager == 1.0
    report.save(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "demo"
    plot_latency([report], tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latency_table(report).row_count == len(report.rows)


def test_draw_graphs_writes_png_and_svg_and_rejects_other_formats(tmp_path):
    from flora_graph.frontend import capture
    from flora_graph.passes import optimize

    g = capture(build_demo_model(), demo_inputs(2), {"image": {0: "batch"}})
    draw_graphs([g, optimize(g, "merged")], tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    draw_graphs([g], tmp_path / "g.svg")
    assert b"<svg" in (tmp_path / "g.svg").read_bytes()[:2000]
    from flora_graph.errors import GraphError

    with pytest.raises(GraphError, match=r"\.png or \.svg"):
        draw_graphs([g], tmp_path / "g.jpg")
    assert not (tmp_path / "g.jpg").exists()
