"""The command line and the repository's set-up promises."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from flora_graph.cli import main
from flora_graph.demo import run_demo
from flora_graph.ir import Graph

ROOT = Path(__file__).resolve().parents[1]


def test_demo_decoder_matches_eager_torch_at_every_shape():
    report = run_demo()
    assert set(report.max_abs_diff) == {(1, 5), (3, 17)}
    assert report.ok, report.max_abs_diff
    assert report.adapters == 14  # seven projections x two blocks
    assert report.graph.inputs[0].shape == ("batch", "seq")
    roles = {n.meta.get("role") for n in report.graph.nodes}
    assert {"base", "lora_down", "lora_up", "lora_scale", "lora_add"} <= roles


def test_demo_cnn_matches_eager_torch():
    report = run_demo("cnn", rank=4)
    assert report.ok and report.adapters == 5 and report.graph.inputs[0].shape[0] == "batch"


def test_demo_cli_saves_a_graph_that_show_reads(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["demo", "--model", "cnn", "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "input [4, 3, 16, 16]: max |numpy reference - eager torch|" in text and "ok" in text
    loaded = Graph.load(out)
    assert loaded.name == "demo-cnn" and f"{len(loaded.nodes)} nodes" in text
    assert main(["show", str(out)]) == 0
    assert "%conv1.lora_down = Conv2d" in capsys.readouterr().out


def test_cli_reports_typed_error_with_exit_code_2(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "GraphError" in err and "missing" in err


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    fence = readme.index("```bash")
    demo_cmd, test_cmd = readme[fence + 1], readme[fence + 2]
    assert readme[fence + 3] == "```"
    assert "-c constraints.txt" in demo_cmd and "flora-graph demo" in demo_cmd
    assert "-c constraints.txt" in test_cmd and "pytest" in test_cmd
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci_lines[-1] == test_cmd
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    shlex.split(test_cmd)  # well-formed shell words


def test_optimize_cli_prints_after_a_pass_draws_and_saves(tmp_path, capsys):
    import numpy as np

    from flora_graph.runtimes import run

    src, out = tmp_path / "g", tmp_path / "merged"
    assert main(["demo", "--model", "cnn", "--rank", "4", "--save", str(src)]) == 0
    capsys.readouterr()
    code = main(["optimize", str(src), "--preset", "merged", "--print-after", "merge-lora", "--verify",
                 "--draw", str(tmp_path / "g.png"), "--save", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "after merge-lora (iteration 1)" in text and "merge-lora x5" in text
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    before, after = Graph.load(src), Graph.load(out)
    assert not any("lora" in str(n.meta.get("role", "")) for n in after.nodes)
    x = {"image": np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(after, x)["output"], run(before, x)["output"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("flag", "fired", "refused"), [(["--fuse-base-and-down"], 5, None),
                                                        (["--fuse-base-and-down", "Conv2d"], 2, "Linear sites are left unfused"),
                                                        (["--fuse-base-and-down", "Linear"], 3, "Conv2d sites are left unfused")])
def test_optimize_cli_fuse_base_and_down_all_or_one_op(tmp_path, capsys, flag, fired, refused):
    src = tmp_path / "g"
    assert main(["demo", "--model", "cnn", "--save", str(src)]) == 0
    capsys.readouterr()
    assert main(["optimize", str(src), "--preset", "fused", *flag]) == 0
    text = capsys.readouterr().out
    assert f"fuse-base-and-down x{fired}" in text
    assert refused is None or refused in text


def test_optimize_cli_rejects_unknown_pass(tmp_path, capsys):
    src = tmp_path / "g"
    assert main(["demo", "--model", "cnn", "--save", str(src)]) == 0
    assert main(["optimize", str(src), "--print-after", "no-such-pass"]) == 2
    assert "unknown pass" in capsys.readouterr().out


def test_top_level_jit_is_the_function_and_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, flora_graph; assert 'torch' not in sys.modules; "
            "from flora_graph import jit; import flora_graph.torch_jit.dynamo; assert flora_graph.jit is jit and callable(jit)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_import_and_parser_do_not_import_torch():
    """``flora-graph --help`` starts fast: the CLI and its ``train`` subcommand import torch only when training."""
    import subprocess
    import sys

    code = (
        "import sys, flora_graph.cli as cli; assert 'torch' not in sys.modules, 'import'; "
        "cli.build_parser(); assert 'torch' not in sys.modules, 'build_parser'; "
        "import flora_graph.training as t; assert 'torch' not in sys.modules, 'training'; "
        "assert t.Flora.__name__ == 'Flora' and 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_llm_exports_generates_and_matches_eager_peft(capsys):
    assert main(["demo"]) == 0  # the README's main job: the llm demo is the default
    out = capsys.readouterr().out
    assert "GenAI package" in out and "DIFFERENT" not in out
    for what in ("Generator, base", "Generator, chat", "Generator, style", "mixed batch", "ONNX Runtime GenAI, chat"):
        assert f"{what}" in out
    assert "decode step" in out and "speed-up" in out
