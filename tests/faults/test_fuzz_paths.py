"""Hostile ``graph.json`` names: loading gives a graph or a typed error, never a crash or a hang, and
what loads is written (graph folder, ONNX with external data, an ONNX Runtime session) only
where the caller said: names read from a file never become paths."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flora_graph.errors import FloraGraphError, GraphError
from flora_graph.ir import Graph
from flora_graph.runtimes import compile as compile_graph
from flora_graph.runtimes import onnx_writer
from flora_graph.runtimes.onnx_writer import save_onnx

from .test_kill import BIG, dense

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SECONDS = 20  # one example: load, save, write ONNX, build a session; far more means a hang

PATHS = st.sampled_from(["..", "../..", "../../evil", "/", "{abs}", "{abs}/x", "a/b", "", ".", "x\0y", "~", "./x",
                         "x" * 300, "graph.json", "weights.safetensors", ".g.tmp-000000000000", "C:\\evil", "\n"])
NAMES = PATHS | st.text(alphabet=st.sampled_from("./\\\0a~ :"), max_size=12) | st.text(max_size=8)


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def hang(*_: object) -> None:
        raise TimeoutError(f"took more than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz_paths")
    dense(1, BIG).save(root / "valid")
    return root, json.loads((root / "valid" / "graph.json").read_text())


def rename(doc: dict[str, Any], old: str, new: str) -> None:
    """Rename node ``old`` to ``new`` everywhere the document names it."""
    for n in doc["nodes"]:
        if n["name"] == old:
            n["name"] = new
        n["inputs"] = [new if i == old else i for i in n["inputs"]]
    doc["inputs"] = [new if i == old else i for i in doc["inputs"]]
    doc["outputs"] = {k: new if v == old else v for k, v in doc["outputs"].items()}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@FUZZ
@given(graph_name=NAMES, node=st.integers(0, 20), node_name=NAMES, output=NAMES, param=st.none() | NAMES)
def test_path_like_names_stay_names(base: tuple[Path, dict[str, Any]], graph_name: str, node: int, node_name: str,
                                    output: str, param: str | None) -> None:
    root, valid = base
    box = Path(tempfile.mkdtemp(dir=root))
    sub = box / "a" / "b" / "c"
    abs_target = str(box / "abs_evil")
    doc = copy.deepcopy(valid)
    doc["name"] = graph_name.replace("{abs}", abs_target)
    rename(doc, doc["nodes"][node % len(doc["nodes"])]["name"], node_name.replace("{abs}", abs_target))
    doc["outputs"] = {output.replace("{abs}", abs_target): v for v in doc["outputs"].values()}
    consts = [n for n in doc["nodes"] if n["op"] == "Const"]
    if consts and param is not None:  # a param name that is a path: the weights file does not hold it, so this must fail cleanly
        consts[0]["attrs"]["param"] = param.replace("{abs}", abs_target)
    src = sub / "src"
    src.mkdir(parents=True)
    shutil.copy(root / "valid" / "weights.safetensors", src)
    (src / "graph.json").write_text(json.dumps(doc))
    (sub / "tmp").mkdir()
    before = tree(box)
    old_threshold, old_tempdir = onnx_writer.EXTERNAL_DATA_THRESHOLD, tempfile.tempdir
    onnx_writer.EXTERNAL_DATA_THRESHOLD = 10_000
    tempfile.tempdir = str(sub / "tmp")
    try:
        with time_limit(SECONDS):
            try:
                g = Graph.load(src)
            except GraphError:
                event("refused with GraphError")
                return
            event("loaded")
            out = sub / "out"
            g.save(out / "g")
            assert Graph.load(out / "g").name == g.name
            try:
                save_onnx(g, out / "m.onnx")
                compile_graph(g, "onnxruntime")
            except FloraGraphError:  # a name ONNX cannot take: typed
                pass
            made = tree(box) - before
            assert all(p.startswith("a/b/c/out") or p.startswith("a/b/c/tmp/") for p in made), sorted(made)
            assert {p for p in made if p.startswith("a/b/c/out/")} <= {
                "a/b/c/out/g", "a/b/c/out/g/graph.json", "a/b/c/out/g/weights.safetensors", "a/b/c/out/m.onnx",
                "a/b/c/out/m.onnx.data"}
    finally:
        onnx_writer.EXTERNAL_DATA_THRESHOLD, tempfile.tempdir = old_threshold, old_tempdir
        shutil.rmtree(box, ignore_errors=True)


@pytest.mark.parametrize("raw", [b"[" * 200_000, b"{\"a\":" * 100_000, b"1e999999", b'{"format": "flora_graph", "version": 1e400}'],
                         ids=["deep-list", "deep-object", "huge-float", "inf-version"])
def test_pathological_json_is_a_graph_error(base: tuple[Path, dict[str, Any]], tmp_path: Path, raw: bytes) -> None:
    root, _ = base
    shutil.copytree(root / "valid", tmp_path / "g")
    (tmp_path / "g" / "graph.json").write_bytes(raw)
    with time_limit(SECONDS), pytest.raises(GraphError):
        Graph.load(tmp_path / "g")
