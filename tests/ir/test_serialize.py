"""Graph files: exact round trip, and every corruption raises GraphError (never another type)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save
from safetensors.torch import save as st_save_torch

from flora_graph.errors import GraphError
from flora_graph.ir import Graph, Op, load_graph, verify
from flora_graph.ir import serialize as ser

from .helpers import assert_graphs_equal, rich_graph, tiny_graph

FILES = {"graph.json", "weights.safetensors"}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Graph, Path]:
    g = rich_graph()
    g.save(tmp_path / "g")
    return g, tmp_path / "g"


def read_doc(path: Path) -> dict:
    return json.loads((path / "graph.json").read_text())


def write_doc(path: Path, doc) -> None:
    (path / "graph.json").write_text(json.dumps(doc))


def node_doc(doc: dict, name: str) -> dict:
    return next(n for n in doc["nodes"] if n["name"] == name)


# ------------------------------------------------------------------ round trip
def test_round_trip_is_exact(saved):
    g, path = saved
    h = Graph.load(path)
    verify(h)
    assert_graphs_equal(g, h)
    assert str(h) == str(g)
    assert h.summary() == g.summary()


def test_round_trip_details(saved):
    _g, path = saved
    h = load_graph(path)
    assert [n.name for n in h.inputs] == ["x", "img", "h"]
    assert list(h.outputs) == ["z_flat", "a_neg", "vision", "half", "mask", "steps"]
    conv = h.node("conv")
    assert conv.attrs == {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}
    assert all(isinstance(v, tuple) for k, v in conv.attrs.items() if k != "groups")
    assert h.node("ln").attrs["epsilon"] == 1e-6
    assert h.node("flatten").shape == ("2*batch", "4*seq")
    assert h.node("up").meta == {"adapter": "default", "role": "lora_up", "rank": 2}
    assert h.node("x").meta == {"module": "embed"}
    assert {h.params[k].dtype.name for k in h.params} == {"float32", "float64", "float16", "int64", "bool"}
    assert h.node("conv_k").attrs == {"param": "conv_w"}  # node and param names may differ
    # the loaded graph keeps working as a graph
    h.add(Op.RELU, [h.node("neg")], name="more")
    h.toposort()
    verify(h)


def test_round_trip_preserves_special_float_bits(tmp_path):
    g = Graph("bits")
    vals = np.array([0.0, -0.0, 1e-45, np.finfo(np.float32).max, np.nan, np.inf, -np.inf], np.float32)
    c = g.const("v", vals)
    g.set_output("v", c)
    g.save(tmp_path)
    h = Graph.load(tmp_path)
    assert h.params["v"].tobytes() == vals.tobytes()


def test_round_trip_twice_gives_identical_files(saved, tmp_path):
    _, path = saved
    load_graph(path).save(tmp_path / "again")
    for f in FILES:
        assert (tmp_path / "again" / f).read_bytes() == (path / f).read_bytes()


def test_graph_without_params(tmp_path):
    g = Graph("noweights")
    x = g.input("x", ("batch",))
    g.set_output("y", g.add(Op.RELU, [x]))
    g.save(tmp_path)
    assert_graphs_equal(g, Graph.load(tmp_path))


def test_save_leaves_no_temp_files(tmp_path):
    tiny_graph().save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == FILES


def test_save_creates_missing_directories(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    tiny_graph().save(target)
    assert {p.name for p in target.iterdir()} == FILES


def test_save_over_existing_graph(tmp_path):
    rich_graph().save(tmp_path)
    g = tiny_graph()
    g.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == FILES
    assert_graphs_equal(g, Graph.load(tmp_path))


def test_save_refuses_an_invalid_graph(tmp_path):
    g = tiny_graph()
    g.outputs.clear()
    with pytest.raises(GraphError):
        g.save(tmp_path)
    assert not any(tmp_path.iterdir())


def test_save_refuses_params_no_node_uses(tmp_path):
    """load_graph rejects unused weights, so save must not write a file it cannot read back."""
    g = tiny_graph()
    g.params["spare"] = np.zeros(3, np.float32)
    verify(g)  # legal in memory
    with pytest.raises(GraphError, match="spare"):
        g.save(tmp_path)
    assert not any(tmp_path.iterdir())
    g.remove_dead()
    g.save(tmp_path)
    assert_graphs_equal(g, Graph.load(tmp_path))


def test_save_refuses_unserializable_meta(tmp_path):
    g = tiny_graph()
    g.node("lin").meta["obj"] = object()
    with pytest.raises(GraphError, match="lin"):
        g.save(tmp_path)
    g.node("lin").meta["obj"] = float("nan")
    with pytest.raises(GraphError, match="lin"):
        g.save(tmp_path)


def test_failed_write_leaves_no_temp_file_and_old_file_intact(tmp_path, monkeypatch):
    g = tiny_graph()
    g.save(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in FILES}

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ser.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        rich_graph().save(tmp_path)
    monkeypatch.undo()
    assert {p.name for p in tmp_path.iterdir()} == FILES
    assert {f: (tmp_path / f).read_bytes() for f in FILES} == before


def test_half_replaced_pair_is_detected(tmp_path, monkeypatch):
    """New weights written, crash before the new JSON: the folder is committed whole, so the old
    graph still loads; a pair mixed by hand (new weights, old JSON) is caught by the JSON's hash."""
    tiny_graph().save(tmp_path / "g")
    before = {f: (tmp_path / "g" / f).read_bytes() for f in FILES}
    real = ser.write_new

    def weights_only(path, data):
        if Path(path).name == "graph.json":
            raise OSError("crash")
        real(path, data)

    monkeypatch.setattr(ser, "write_new", weights_only)
    with pytest.raises(OSError):
        rich_graph().save(tmp_path / "g")
    monkeypatch.undo()
    assert {f: (tmp_path / "g" / f).read_bytes() for f in FILES} == before
    assert [p.name for p in tmp_path.iterdir()] == ["g"]
    Graph.load(tmp_path / "g")
    rich_graph().save(tmp_path / "new")
    (tmp_path / "g" / "weights.safetensors").write_bytes((tmp_path / "new" / "weights.safetensors").read_bytes())
    with pytest.raises(GraphError, match="SHA-256"):
        Graph.load(tmp_path / "g")


# ------------------------------------------------------------------ corrupt files
def test_missing_files(saved):
    _, path = saved
    with pytest.raises(GraphError):
        Graph.load(path.parent / "nowhere")
    (path / "weights.safetensors").unlink()
    with pytest.raises(GraphError):
        Graph.load(path)


@pytest.mark.parametrize("keep", [0, 1, 10, 100, 0.5, 0.99])
def test_truncated_graph_json(saved, keep):
    _, path = saved
    raw = (path / "graph.json").read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    (path / "graph.json").write_bytes(raw[:n])
    with pytest.raises(GraphError):
        Graph.load(path)


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, 0.999])
def test_truncated_weights(saved, keep):
    _, path = saved
    raw = (path / "weights.safetensors").read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    (path / "weights.safetensors").write_bytes(raw[:n])
    with pytest.raises(GraphError, match="SHA-256"):
        Graph.load(path)


@pytest.mark.parametrize("where", [0, 5, 20, -1, -100])
def test_flipped_byte_in_weights(saved, where):
    _, path = saved
    raw = bytearray((path / "weights.safetensors").read_bytes())
    raw[where] ^= 0x01
    (path / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(GraphError, match="SHA-256"):
        Graph.load(path)


def _replace_weights(path: Path, data: bytes) -> None:
    """Write ``data`` as the weights and record its hash, as a careful forger would."""
    (path / "weights.safetensors").write_bytes(data)
    doc = read_doc(path)
    doc["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    write_doc(path, doc)


def test_invalid_safetensors_with_matching_hash(saved):
    _, path = saved
    _replace_weights(path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(GraphError, match="safetensors"):
        Graph.load(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_weights_in_a_dtype_numpy_lacks(tmp_path, dtype):
    tiny_graph().save(tmp_path)
    data = st_save_torch({"w": torch.zeros(4, 8, dtype=dtype), "b": torch.ones(4)})
    _replace_weights(tmp_path, data)
    with pytest.raises(GraphError, match="safetensors"):
        Graph.load(tmp_path)


def test_weights_that_disagree_with_the_graph(tmp_path):
    tiny_graph().save(tmp_path)
    ok_b = np.ones(4, np.float32)
    cases = [
        {"w": np.zeros((4, 9), np.float32), "b": ok_b},  # shape
        {"w": np.zeros((4, 8), np.float64), "b": ok_b},  # dtype
        {"b": ok_b},  # missing param
        {"w": np.zeros((4, 8), np.float32), "b": ok_b, "spare": ok_b},  # unused param
        {"w": np.zeros((4, 8), np.uint8), "b": ok_b},  # dtype outside the IR
    ]
    for params in cases:
        _replace_weights(tmp_path, st_save(params))
        with pytest.raises(GraphError):
            Graph.load(tmp_path)


EDITS = {
    "shape changed": lambda d: node_doc(d, "base").__setitem__("shape", ["batch", "seq", 9]),
    "dim made negative": lambda d: node_doc(d, "x").__setitem__("shape", ["batch", "seq", -8]),
    "dim made float": lambda d: node_doc(d, "x").__setitem__("shape", ["batch", "seq", 8.0]),
    "dim made bool": lambda d: node_doc(d, "x").__setitem__("shape", ["batch", "seq", True]),
    "dim made invalid name": lambda d: node_doc(d, "x").__setitem__("shape", ["batch", "se q", 8]),
    "dim made superscript": lambda d: node_doc(d, "x").__setitem__("shape", ["batch", "²", 8]),
    "input shape changed": lambda d: node_doc(d, "img").__setitem__("shape", ["batch", 4, 9]),
    "const shape changed": lambda d: node_doc(d, "conv_k").__setitem__("shape", [6, 2, 3, 4]),
    "op renamed to unknown": lambda d: node_doc(d, "sigmoid").__setitem__("op", "Swish"),
    "op changed arity": lambda d: node_doc(d, "base").__setitem__("op", "MatMul"),
    "op changed shape": lambda d: node_doc(d, "neg").__setitem__("op", "Flatten"),
    "op made leaf": lambda d: node_doc(d, "neg").__setitem__("op", "Input"),
    "const made input": lambda d: node_doc(d, "w").__setitem__("op", "Input"),
    "input made relu": lambda d: node_doc(d, "x").__setitem__("op", "Relu"),
    "op lower case": lambda d: node_doc(d, "neg").__setitem__("op", "neg"),
    "input ref unknown": lambda d: node_doc(d, "neg").__setitem__("inputs", ["nope"]),
    "input ref later node": lambda d: node_doc(d, "base").__setitem__("inputs", ["x", "y", "b"]),
    "input ref self": lambda d: node_doc(d, "neg").__setitem__("inputs", ["neg"]),
    "input ref int": lambda d: node_doc(d, "neg").__setitem__("inputs", [3]),
    "input ref list": lambda d: node_doc(d, "neg").__setitem__("inputs", [["div"]]),
    "attr unknown": lambda d: node_doc(d, "softmax")["attrs"].__setitem__("dim", 1),
    "attr removed": lambda d: node_doc(d, "transpose")["attrs"].clear(),
    "attr wrong type": lambda d: node_doc(d, "softmax")["attrs"].__setitem__("axis", "1"),
    "attr changes shape": lambda d: node_doc(d, "softmax")["attrs"].__setitem__("axis", 7),
    "attr float for ints": lambda d: node_doc(d, "conv")["attrs"].__setitem__("stride", [2.0, 1]),
    "const param unknown": lambda d: node_doc(d, "w")["attrs"].__setitem__("param", "zzz"),
    "const param not str": lambda d: node_doc(d, "w")["attrs"].__setitem__("param", 5),
    "dtype changed": lambda d: node_doc(d, "neg").__setitem__("dtype", "float64"),
    "dtype unknown": lambda d: node_doc(d, "x").__setitem__("dtype", "complex64"),
    "dtype not str": lambda d: node_doc(d, "x").__setitem__("dtype", 32),
    "duplicate node name": lambda d: node_doc(d, "neg").__setitem__("name", "div"),
    "name not str": lambda d: node_doc(d, "neg").__setitem__("name", 7),
    "meta not dict": lambda d: node_doc(d, "base").__setitem__("meta", ["adapter"]),
    "attrs not dict": lambda d: node_doc(d, "softmax").__setitem__("attrs", [["axis", 1]]),
    "shape not list": lambda d: node_doc(d, "x").__setitem__("shape", "batch,seq,8"),
    "inputs not list": lambda d: node_doc(d, "neg").__setitem__("inputs", "div"),
    "node not dict": lambda d: d["nodes"].__setitem__(3, ["base"]),
    "node removed": lambda d: d["nodes"].remove(node_doc(d, "div")),
    "node moved first": lambda d: d["nodes"].insert(0, d["nodes"].pop(len(d["nodes"]) - 1 - 3)),
    "nodes not list": lambda d: d.__setitem__("nodes", {}),
    "field name removed": lambda d: node_doc(d, "neg").pop("name"),
    "field op removed": lambda d: node_doc(d, "neg").pop("op"),
    "field inputs removed": lambda d: node_doc(d, "neg").pop("inputs"),
    "field attrs removed": lambda d: node_doc(d, "neg").pop("attrs"),
    "field shape removed": lambda d: node_doc(d, "neg").pop("shape"),
    "field dtype removed": lambda d: node_doc(d, "neg").pop("dtype"),
    "field meta removed": lambda d: node_doc(d, "neg").pop("meta"),
    "field format removed": lambda d: d.pop("format"),
    "field version removed": lambda d: d.pop("version"),
    "field name of graph removed": lambda d: d.pop("name"),
    "field inputs of graph removed": lambda d: d.pop("inputs"),
    "field outputs removed": lambda d: d.pop("outputs"),
    "field weights removed": lambda d: d.pop("weights"),
    "field sha removed": lambda d: d["weights"].pop("sha256"),
    "format wrong": lambda d: d.__setitem__("format", "onnx"),
    "version future": lambda d: d.__setitem__("version", 2),
    "version str": lambda d: d.__setitem__("version", "1"),
    "version bool": lambda d: d.__setitem__("version", True),
    "sha wrong": lambda d: d["weights"].__setitem__("sha256", "0" * 64),
    "sha int": lambda d: d["weights"].__setitem__("sha256", 0),
    "weights not dict": lambda d: d.__setitem__("weights", "weights.safetensors"),
    "graph name int": lambda d: d.__setitem__("name", 1),
    "outputs empty": lambda d: d.__setitem__("outputs", {}),
    "outputs list": lambda d: d.__setitem__("outputs", ["neg"]),
    "output unknown": lambda d: d["outputs"].__setitem__("a_neg", "ghost"),
    "output not str": lambda d: d["outputs"].__setitem__("a_neg", None),
    "graph input unknown": lambda d: d["inputs"].append("ghost"),
    "graph input not an Input": lambda d: d["inputs"].append("neg"),
    "graph input twice": lambda d: d["inputs"].append("x"),
    "graph input dropped": lambda d: d["inputs"].remove("h"),
    "graph input not str": lambda d: d["inputs"].append(0),
    "inputs of graph dict": lambda d: d.__setitem__("inputs", {"x": 0}),
    "const node dropped with its param": lambda d: d["nodes"].remove(node_doc(d, "steps"))
    or d["outputs"].pop("steps"),
    "document is a list": lambda d: [d],
    "document is null": lambda d: None,
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_edited_json_raises_graph_error(saved, edit):
    _, path = saved
    doc = read_doc(path)
    result = EDITS[edit](doc)
    write_doc(path, result if edit.startswith("document") else doc)
    with pytest.raises(GraphError):
        Graph.load(path)


def test_edit_errors_name_the_node_at_fault(saved):
    _, path = saved
    doc = read_doc(path)
    node_doc(doc, "softmax")["attrs"]["axis"] = 7
    write_doc(path, doc)
    with pytest.raises(GraphError, match="softmax") as info:
        Graph.load(path)
    assert "graph.json" in str(info.value)  # and the file


@pytest.mark.parametrize(
    "text",
    [b"", b"{", b"[]", b"null", b"\xff\xfe\x00garbage", b'{"format": "flora_graph"', b"[" * 100_000, b"NaN"],
)
def test_garbage_graph_json(saved, text):
    _, path = saved
    (path / "graph.json").write_bytes(text)
    with pytest.raises(GraphError):
        Graph.load(path)


def test_harmless_edit_still_loads(saved):
    """A change the format allows (a meta tag) loads, so the corruption tests are not vacuous."""
    g, path = saved
    doc = read_doc(path)
    node_doc(doc, "base")["meta"]["note"] = "edited"
    write_doc(path, doc)
    h = Graph.load(path)
    assert h.node("base").meta["note"] == "edited"
    del h.node("base").meta["note"]
    assert_graphs_equal(g, h)
