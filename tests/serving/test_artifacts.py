"""Serving artifacts: a Triton model repository and TorchScript + JSON loadable without flora_graph."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.serving import ServingError, export_torchscript, package_triton
from flora_graph.serving.artifacts import triton_config

from .conftest import ATOL

PB_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT64: "TYPE_INT64"}


def parse_pbtxt(text: str) -> dict:
    """The top-level scalars and the input/output entries of a Triton config (a small regex parser)."""
    doc: dict = {"input": [], "output": []}
    for key in ("input", "output"):
        m = re.search(rf"^{key} \[(.*?)^\]", text, re.S | re.M)
        assert m, f"no {key} block"
        for body in re.findall(r"\{(.*?)\}", m.group(1), re.S):
            entry = dict(re.findall(r"^\s*(\w+): (.+?)\s*$", body, re.M))
            entry["name"] = entry["name"].strip('"')
            entry["dims"] = [int(d) for d in entry["dims"].strip("[] ").split(",")]
            doc[key].append(entry)
    for key, value in re.findall(r"^(\w+): (.+)$", text, re.M):
        doc[key] = value.strip('"')
    return doc


def onnx_io(model: onnx.ModelProto, which: str) -> list[tuple[str, str, list[int]]]:
    vis = model.graph.input if which == "input" else model.graph.output
    return [(v.name, PB_TYPES[v.type.tensor_type.elem_type],
             [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]) for v in vis]


@pytest.mark.parametrize("which", ["plain", "swappable", "mixed"])
def test_triton_repository_matches_model(served, tmp_path, which):
    source = {"plain": served.graph, "swappable": served.swappable, "mixed": served.mixed}[which]
    root = package_triton(source, tmp_path / "repo", f"demo_{which}")
    assert root == tmp_path / "repo" / f"demo_{which}"
    model = onnx.load(str(root / "1" / "model.onnx"))
    cfg = parse_pbtxt((root / "config.pbtxt").read_text())
    assert cfg["name"] == f"demo_{which}" and cfg["backend"] == "onnxruntime" and cfg["max_batch_size"] == "0"
    for key in ("input", "output"):
        got = [(e["name"], e["data_type"], e["dims"]) for e in cfg[key]]
        assert got == onnx_io(model, key)
    by_name = {e["name"]: e for e in cfg["input"]}
    assert by_name["image"]["dims"] == [-1, 3, 16, 16] and by_name["image"]["data_type"] == "TYPE_FP32"
    inits = {t.name for t in model.graph.initializer}
    for name, entry in by_name.items():  # LoRA weights are optional inputs, the request tensors required
        assert (entry.get("optional") == "true") == (name in inits)
    if which == "mixed":
        assert by_name["adapter_index"]["data_type"] == "TYPE_INT64" and by_name["adapter_index"]["dims"] == [-1]
    ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_triton_external_data_directory_and_batching(served, images, tmp_path):
    root = package_triton(served.graph, tmp_path, "ext", external_data=True)
    folder = root / "1" / "model.onnx"
    assert folder.is_dir() and {p.name for p in folder.iterdir()} == {"model.onnx", "model.onnx.data"}
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"image": images})[0], served.reference("a", images), atol=ATOL)
    root = package_triton(served.graph, tmp_path, "ext", max_batch_size=8)  # replaces the directory form
    assert (root / "1" / "model.onnx").is_file()
    cfg = parse_pbtxt((root / "config.pbtxt").read_text())
    assert cfg["max_batch_size"] == "8" and cfg["input"][0]["dims"] == [3, 16, 16] and "dynamic_batching" in (root / "config.pbtxt").read_text()
    with pytest.raises(ServingError, match="weight inputs"):
        triton_config(onnx.load(str(served.swappable)), "x", max_batch_size=4)
    with pytest.raises(ServingError, match="plain directory name"):
        package_triton(served.graph, tmp_path, "a/b")
    assert to_onnx(served.graph).graph.input[0].name == "image"


def test_torchscript_artifact_runs_without_flora_graph(served, images, tmp_path):
    pt, meta = export_torchscript(served.graph, tmp_path / "ts", "demo")
    doc = json.loads(meta.read_text())
    assert doc["file"] == pt.name == "demo.pt"
    assert doc["inputs"] == [{"name": "image", "dtype": "float32", "shape": [-1, 3, 16, 16], "dims": ["batch", 3, 16, 16]}]
    assert doc["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 10], "dims": ["batch", 10]}]
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["flora_graph"] = None  # any import of flora_graph now fails
        import json, numpy as np, torch
        doc = json.load(open({str(meta)!r}))
        module = torch.jit.load({str(tmp_path / "ts")!r} + "/" + doc["file"])
        x = np.load({str(tmp_path / "x.npy")!r})
        spec = doc["inputs"][0]
        assert all(s in (-1, d) for s, d in zip(spec["shape"], x.shape))
        outs = module(torch.from_numpy(x).to(getattr(torch, spec["dtype"])))
        np.save({str(tmp_path / "y.npy")!r}, outs[0].numpy())
        print("ok", [o["name"] for o in doc["outputs"]], "flora_graph" in sys.modules and sys.modules["flora_graph"] is None)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", "['output']", "True"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), served.reference("a", images), atol=ATOL)
