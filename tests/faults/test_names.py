"""Names that become paths are one plain component; graph files are read without following symlinks."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from flora_graph.errors import ArtifactWriteError, FloraGraphError, GraphError, UnsafeNameError
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import compile as compile_graph
from flora_graph.runtimes import onnx_writer
from flora_graph.serving.artifacts import export_torchscript, package_triton
from flora_graph.serving.errors import ServingError
from flora_graph.storage import check_name

from ..ir.helpers import rich_graph, tiny_graph

BAD = ["", ".", "..", "a/b", "../evil", "/abs", "/", "a\\b", "C:\\x", "a\0b", "a\nb", "tab\t", "\x7f", "x" * 256,
       "é" * 128, 3, None]
GOOD = ["model", "a.b", "名前", "x" * 255, "-x", " a ", "..x", "x..", ".hidden"]


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_check_name_refuses(name: object) -> None:
    with pytest.raises(UnsafeNameError, match="plain directory name") as err:
        check_name(name, "graph name")
    assert isinstance(err.value, FloraGraphError) and isinstance(err.value, ValueError)
    with pytest.raises(ServingError, match="model name"):
        check_name(name, "model name", error=ServingError)


@pytest.mark.parametrize("name", GOOD, ids=repr)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name, "graph name") == name


@pytest.mark.parametrize("name", ["../evil", "/abs/evil", "a/b", "..", "x\0"], ids=repr)
def test_writers_refuse_path_names_before_writing(tmp_path: Path, name: str) -> None:
    out = tmp_path / "deep" / "out"
    with pytest.raises(ServingError, match="plain directory name"):
        package_triton(tiny_graph(), out, name)
    with pytest.raises(ServingError, match="plain directory name"):
        export_torchscript(tiny_graph(), out, name)
    assert list(tmp_path.iterdir()) == []


def wide(name: str) -> Graph:
    g = Graph(name)
    x = g.input("x", ("batch", 64))
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    g.set_output("y", g.add(Op.LINEAR, [x, g.const("w", w)]))
    return verify(g)


@pytest.mark.parametrize("name", ["../../evil", "{abs}", "a/b/c"])
def test_large_model_session_writes_only_in_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            name: str) -> None:
    """A graph name read from a file never becomes the path of the session's temporary model."""
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    base = tmp_path / "a" / "b" / "tmp"
    base.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    exe = compile_graph(wide(name.format(abs=tmp_path / "evil")), "onnxruntime")
    assert exe._tmpdir is not None
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(exe({"x": x})["y"], x @ exe.graph.params["w"].T, rtol=1e-5)
    outside = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if base not in p.parents)
    assert outside == ["a", "a/b", "a/b/tmp"]


# ------------------------------------------------------------------ reading without following symlinks
@pytest.mark.parametrize("which", ["graph.json", "weights.safetensors"])
def test_graph_load_refuses_a_symlinked_file(tmp_path: Path, which: str) -> None:
    tiny_graph().save(tmp_path / "g")
    shutil.move(tmp_path / "g" / which, tmp_path / "elsewhere")
    (tmp_path / "g" / which).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(GraphError, match="symbolic link") as err:
        Graph.load(tmp_path / "g")
    assert which in str(err.value) and "symbolic link" in str(err.value)


def test_graph_folder_itself_may_be_a_symlink(tmp_path: Path) -> None:
    rich_graph().save(tmp_path / "v1")
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    assert Graph.load(tmp_path / "current").name == rich_graph().name
    tiny_graph().save(tmp_path / "current")  # writes into the folder the link names; the link stays
    assert (tmp_path / "current").is_symlink() and Graph.load(tmp_path / "v1").name == tiny_graph().name


def test_graph_load_of_a_fifo_does_not_block(tmp_path: Path) -> None:
    tiny_graph().save(tmp_path / "g")
    (tmp_path / "g" / "graph.json").unlink()
    os.mkfifo(tmp_path / "g" / "graph.json")

    def hang(*_: object) -> None:
        raise TimeoutError("Graph.load blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        with pytest.raises(GraphError, match="not a regular file"):
            Graph.load(tmp_path / "g")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ destinations that cannot be written
def test_save_where_a_file_is(tmp_path: Path) -> None:
    (tmp_path / "g").write_text("a file of mine")
    with pytest.raises(ArtifactWriteError, match="not a directory") as err:
        tiny_graph().save(tmp_path / "g")
    assert str(tmp_path / "g") in str(err.value) and isinstance(err.value, FloraGraphError)
    assert (tmp_path / "g").read_text() == "a file of mine" and os.listdir(tmp_path) == ["g"]


def test_save_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ArtifactWriteError, match="cannot write graph") as err:
        tiny_graph().save(tmp_path / "f" / "sub" / "g")
    assert str(tmp_path / "f" / "sub" / "g") in str(err.value) and isinstance(err.value, OSError)
    assert os.listdir(tmp_path) == ["f"]
