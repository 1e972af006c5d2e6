"""Issue 16, items 7 and 8: input, file and command-line defects, one test per defect.

Each refusal is typed (exit status 2, a message naming the culprit, no traceback) and
happens before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import flora_graph
from flora_graph.cli import ARTIFACT_BACKENDS, HelpFormatter, build_parser, main
from flora_graph.errors import FloraGraphError
from flora_graph.ir import Graph, Op

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(capsys: pytest.CaptureFixture[str], *culprits: str) -> str:
    """The stderr + stdout of a refused command: names every culprit, holds no traceback."""
    out = capsys.readouterr()
    text = out.err + out.out
    assert "Traceback" not in text, text
    for c in culprits:
        assert c in text, (c, text)
    return text


# ---------------------------------------------------------------------------------------------- files (item 7)


def test_latest_checkpoint_compares_steps_as_numbers(tmp_path: Path) -> None:
    from flora_graph.training.checkpoints import checkpoint_step, latest_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step_999999.pt", "step_1000000.pt", "step_000002.pt", "step_latest.pt"):
        (folder / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == folder / "step_1000000.pt"
    assert checkpoint_step("step_1000000.pt") == 1_000_000 and checkpoint_step("step_latest.pt") is None


def _model_folder(path: Path, *, architectures: object = ("LlamaForCausalLM",), weights: str = "model.safetensors") -> Path:
    """A model folder's files, without real weights: every check here runs before weights are read."""
    path.mkdir()
    cfg = {"model_type": "llama", "architectures": list(architectures) if isinstance(architectures, tuple) else architectures,
           "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / weights).write_bytes(b"\x80\x04never read")
    return path


def test_export_of_a_pickle_only_folder_is_refused_naming_the_file(tmp_path, capsys) -> None:
    folder = _model_folder(tmp_path / "model", weights="pytorch_model.bin")
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    _refused(capsys, "ModelFolderError", "pytorch_model.bin", "safetensors")
    assert _files(tmp_path) == ["model", "model/config.json", "model/pytorch_model.bin"]


@pytest.mark.parametrize("entry", [["logging"], ["LlamaConfig"], [3], "LlamaForCausalLM", []],
                         ids=["module", "config-class", "not-a-string", "not-a-list", "empty"])
def test_export_refuses_an_odd_architectures_entry_naming_it(tmp_path, capsys, entry) -> None:
    folder = _model_folder(tmp_path / "model", architectures=entry)
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    text = _refused(capsys, "ModelFolderError", "config.json", "architectures")
    assert repr(entry[0] if isinstance(entry, list) and entry else entry) in text
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------------------------------------- export (item 8)


def test_export_checks_the_adapter_folder_before_loading_the_model(tmp_path, capsys, monkeypatch) -> None:
    import flora_graph.model_export as me

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter folder was checked")

    monkeypatch.setattr(me, "load_model", must_not_load)
    missing = tmp_path / "no-adapter"
    assert main(["export", "--adapter", str(missing), "--out", str(tmp_path / "out")]) == 2
    _refused(capsys, "AdapterError", str(missing), "adapter_config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_model.bin").write_bytes(b"")
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    assert main(["export", "--adapter", str(empty), "--out", str(tmp_path / "out")]) == 2
    _refused(capsys, "adapter_model.bin", "safetensors")
    assert not list(tmp_path.glob("out*"))


def test_export_says_which_preset_it_used(tmp_path, capsys, monkeypatch) -> None:
    import flora_graph.model_export as me

    seen = {}

    def fake_export(model, out, *, adapter, backend, preset, progress, attention_mask):
        seen.update(model=model, backend=backend, preset=preset, attention_mask=attention_mask)
        return me.ExportReport(Path(out).with_suffix(".pt"), backend, preset, "graph 'g': 1 nodes", {"load": 0.0}, 0.0)

    monkeypatch.setattr(me, "export_model", fake_export)
    assert main(["export", "--backend", "torchscript", "--out", str(tmp_path / "m")]) == 0
    assert seen == {"model": "default", "backend": "torchscript", "preset": "merged", "attention_mask": False}
    assert "with preset merged for torchscript" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- serve-package


def _graph_dir(path: Path) -> Graph:
    g = Graph("tiny")
    x = g.input("x", ("batch", 4))
    w = g.const("w", np.arange(12, dtype=np.float32).reshape(3, 4) / 10)
    g.set_output("logits", g.add(Op.RELU, [g.add(Op.LINEAR, [x, w], name="lin")], name="act"))
    g.save(path)
    return g


@pytest.mark.parametrize(("argv", "culprit"), [
    (["--name", "n", "--torchscript"], "--torchscript needs a saved graph directory"),
    (["--name", "a/b"], "--name 'a/b'"),
])
def test_serve_package_refuses_bad_arguments_before_writing(tmp_path, capsys, argv, culprit) -> None:
    source = tmp_path / "x.onnx"
    source.write_bytes(b"not read")
    assert main(["serve-package", str(source), str(tmp_path / "repo"), *argv]) == 2
    _refused(capsys, culprit)
    assert _files(tmp_path) == ["x.onnx"]


def test_serve_package_refuses_a_missing_source_and_a_negative_batch_size(tmp_path, capsys) -> None:
    assert main(["serve-package", str(tmp_path / "nothing"), str(tmp_path / "repo"), "--name", "n"]) == 2
    _refused(capsys, "nothing", "neither a .onnx file nor a saved graph directory")
    with pytest.raises(SystemExit) as exc:
        main(["serve-package", str(tmp_path / "nothing"), str(tmp_path / "repo"), "--name", "n", "--max-batch-size", "-1"])
    assert exc.value.code == 2
    _refused(capsys, "--max-batch-size", "must be an int >= 0")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("max_batch", [0, 8])
def test_serve_package_torchscript_entry_has_the_layout_triton_requires(tmp_path, capsys, max_batch) -> None:
    graph = _graph_dir(tmp_path / "g")
    repo = tmp_path / "repo"
    assert main(["serve-package", str(tmp_path / "g"), str(repo), "--name", "n", "--torchscript",
                 "--max-batch-size", str(max_batch)]) == 0
    entry = repo / "n_torchscript"
    config = (entry / "config.pbtxt").read_text()
    assert 'name: "n_torchscript"' in config and 'platform: "pytorch_libtorch"' in config
    assert f"max_batch_size: {max_batch}" in config
    assert 'name: "x__0"' in config and 'name: "logits__0"' in config  # Triton's <name>__<index> convention
    assert ("dims: [ 4 ]" if max_batch else "dims: [ -1, 4 ]") in config and "TYPE_FP32" in config
    assert ("dynamic_batching" in config) == bool(max_batch)
    assert (entry / "1" / "model.pt").is_file() and (entry / "n.pt").is_file()
    doc = json.loads((entry / "n.json").read_text())
    assert [e["triton_name"] for e in doc["inputs"] + doc["outputs"]] == ["x__0", "logits__0"]
    assert (repo / "n" / "config.pbtxt").is_file() and (repo / "n" / "1" / "model.onnx").is_file()
    module = torch.jit.load(str(entry / "1" / "model.pt"))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, np.maximum(x @ graph.params["w"].T, 0), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Hugging Face models


@pytest.fixture(scope="module")
def cached_llama() -> torch.nn.Module:
    """A 1-layer Llama causal LM with transformers' default ``use_cache=True`` (a DynamicCache in its output)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.config.use_cache
    return model


def _ids(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))}


def test_capture_of_a_causal_lm_with_use_cache_on(cached_llama) -> None:
    from flora_graph.frontend import capture, output_tensors
    from flora_graph.runtimes import run

    graph = capture(cached_llama, _ids(2, 8, 0), {"input_ids": {0: "batch", 1: "seq"}})
    assert list(graph.outputs) == ["output"] and cached_llama.config.use_cache  # logits only; the flag restored
    x = _ids(3, 5, 1)
    with torch.no_grad():
        want = output_tensors(cached_llama(**x))  # logits first, then (not a tensor leaf) the cache
    np.testing.assert_allclose(run(graph, {k: v.numpy() for k, v in x.items()})["output"], want[0].numpy(),
                               atol=1e-5, rtol=1e-5)


def test_bench_model_on_a_peft_causal_lm_with_model_output(cached_llama) -> None:
    import peft

    from flora_graph.bench import bench_model

    model = peft.get_peft_model(cached_llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    try:
        rep = bench_model(model, _ids(2, 8, 0), {"input_ids": {0: "batch", 1: "seq"}}, _ids(3, 6, 2), presets=("fused",),
                          backends=("onnxruntime",), with_base=False, rounds=2, warmup=1)
    finally:
        model.unload()
    assert rep.row("fused/onnxruntime").max_abs_diff < 1e-4
    assert cached_llama.config.use_cache


def test_bench_model_refuses_unknown_backends_before_capturing() -> None:
    from flora_graph.bench import bench_model

    class NotRun(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("captured before the arguments were checked")

    with pytest.raises(FloraGraphError, match=r"unknown backend\(s\) \['foo'\]"):
        bench_model(NotRun(), {"x": torch.ones(2)}, None, {"x": torch.ones(2)}, backends=["foo"])
    with pytest.raises(FloraGraphError, match="rounds must be an int >= 1"):
        bench_model(NotRun(), {"x": torch.ones(2)}, None, {"x": torch.ones(2)}, rounds=0)


# ---------------------------------------------------------------------------------------------- the command line


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_shows_its_choices_and_default() -> None:
    """The mechanism: one help formatter for every subcommand (flora_graph, serving and training parsers)."""
    parsers = _subparsers(build_parser())
    assert {"demo", "show", "optimize", "export", "bench", "serve-export", "serve-package", "train"} <= set(parsers)
    checked = 0
    for name, sub in parsers.items():
        assert sub.formatter_class is HelpFormatter, name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._expand_help(action)
            for choice in action.choices or ():
                assert str(choice) in text, (where, choice, text)
            if action.default not in (None, False, argparse.SUPPRESS):
                assert re.search(r"\bdefault\b[:;]?\s", text), (where, text)
            checked += 1
    assert checked > 40
    optimize = " ".join(parsers["optimize"].format_help().split())
    assert "choices: unfused, fused, merged; default: fused" in optimize


def test_bench_backends_list_their_choices_and_a_bad_one_is_refused_by_the_parser(capsys, monkeypatch) -> None:
    import flora_graph.bench as bench

    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backends", "onnxruntime", "foo"])
    assert exc.value.code == 2
    _refused(capsys, "--backends", "'foo'", "onnxruntime")
    for bad in (["--batch", "0"], ["--rounds", "-3"], ["--threads", "x"]):
        with pytest.raises(SystemExit):
            main(["bench", *bad])
        _refused(capsys, bad[0], "must be an int >= 1")


def test_artifact_backends_are_the_export_and_bench_backends() -> None:
    from flora_graph.bench.latency import BACKENDS
    from flora_graph.model_export import SUFFIX

    assert tuple(SUFFIX) == ARTIFACT_BACKENDS == BACKENDS


def test_version_prints_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flora-graph {flora_graph.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == flora_graph.__version__


def test_the_default_run_leaves_out_slow_tests() -> None:
    """The ``slow`` marker's description is true: ``addopts`` deselects it; ``-m slow`` given later wins."""
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    args = shlex.split(ini["addopts"])
    assert args[args.index("-m") + 1] == "not slow"
    assert any(m.startswith("slow:") and "excluded from the default run" in m for m in ini["markers"])


def test_optimize_refuses_a_bad_drawing_name_before_loading(tmp_path, capsys) -> None:
    _graph_dir(tmp_path / "g")
    assert main(["optimize", str(tmp_path / "g"), "--draw", str(tmp_path / "g.pdf"), "--save", str(tmp_path / "o")]) == 2
    _refused(capsys, "g.pdf", ".png or .svg")
    assert not (tmp_path / "o").exists() and not (tmp_path / "g.pdf").exists()


def test_max_abs_diff_compares_every_output_and_keeps_nan() -> None:
    from flora_graph.frontend import max_abs_diff

    a, b = torch.ones(2, 3), torch.zeros(4)
    assert max_abs_diff({"o0": a.numpy(), "o1": b.numpy() + 0.5}, [a, b]) == 0.5  # the second output counts too
    assert max_abs_diff({"o0": a.numpy()}, [a, b]) == float("inf")
    assert max_abs_diff({"o0": a.numpy()[:1]}, [a]) == float("inf")
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert np.isnan(max_abs_diff({"o0": nan.numpy(), "o1": b.numpy() + 1}, [a, b]))


def test_error_messages_are_printed_whole_and_as_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A long path is not broken across lines (whatever the terminal width) and brackets are not markup."""
    from flora_graph.cli import main

    deep = tmp_path / ("d" * 120) / "[red]graph[/red]"
    assert main(["show", str(deep)]) == 2
    err = capsys.readouterr().err
    assert str(deep) in err, err
