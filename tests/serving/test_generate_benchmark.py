"""The benchmarks (`generate.py`, `int4.py`, `beam_search.py`, `dora.py`, `expert_lora.py`) on tiny runs: every column runs and produces eager PEFT's tokens."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_generate_benchmark_runs_every_column_with_equal_tokens(capsys) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        mp.delenv("FLORA_VLLM_PYTHON", raising=False)
        bench = importlib.import_module("generate")
        assert bench.main(["--adapters", "2", "--new", "6", "--rounds", "1", "--shared-rows", "5"]) == 0  # 1: tokens differ
    out = capsys.readouterr().out
    assert "greedy tokens equal (genai, genai no-branch, generator, eager; 6 tokens): True" in out
    for label in ("base:", "a0:"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(label))
        assert "genai/builder" in line and "genai/genai no-branch" in line
    assert "vLLM column skipped" in out and "tokens equal eager PEFT per row: True" in out
    assert "one more adapter into the package (--adapters-only):" in out
    assert "rows sharing adapters, 5 rows over 2 adapters" in out
    assert "and eager PEFT for the first 8 rows): True" in out


@pytest.mark.slow
def test_int4_benchmark_runs_every_column_with_equal_tokens(capsys) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        bench = importlib.import_module("int4")
        assert bench.main(["--adapters", "1", "--new", "6", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens equal (GenAI and the Generator on each int4 package, base and a0): True" in out
    assert "int4 int8-activations/builder int4" in out and "model size: fp32" in out


@pytest.mark.slow
def test_beam_search_benchmark_runs_every_column_with_equal_tokens(capsys) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        bench = importlib.import_module("beam_search")
        assert bench.main(["--adapters", "2", "--new", "5", "--rounds", "1", "--prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokens equal eager's: generator True, genai True" in out
    assert out.count("the same hypotheses: True") == 2 and "generator/genai" in out


@pytest.mark.slow
def test_dora_benchmark_runs_every_column_with_equal_tokens(capsys) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        bench = importlib.import_module("dora")
        assert bench.main(["--new", "6", "--rows", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens equal (generator, genai, eager PEFT): True" in out
    assert "a DoRA step / a LoRA step (generator)" in out and "tokens equal eager PEFT per row: True" in out


@pytest.mark.slow
def test_expert_lora_benchmark_runs_every_column_with_equal_tokens(capsys) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        bench = importlib.import_module("expert_lora")
        assert bench.main(["--hidden", "64", "--layers", "2", "--expert-width", "64", "--adapters", "2", "--new", "6",
                           "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens equal (generator, genai, eager PEFT): True" in out
    assert "tokens equal eager PEFT per row: True" in out and "adapter_names on these adapters: refused" in out
