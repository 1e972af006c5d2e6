"""``add_cli``: the serve-export / serve-package subcommands, wired into a parser as flora_graph.cli would."""

from __future__ import annotations

import argparse
import io

import numpy as np
from rich.console import Console

from flora_graph.serving import AdapterSession, MixedAdapterSession
from flora_graph.serving.cli import add_cli

from .conftest import ATOL


def run(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="flora-graph")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    buf = io.StringIO()
    return args.func(args, Console(file=buf, width=200)), buf.getvalue()


def test_serve_export_and_package(served, images, tmp_path):
    gdir = tmp_path / "graph"
    served.graph.save(gdir)
    rc, out = run(["serve-export", str(gdir), str(tmp_path / "sw.onnx"), "--adapter", str(tmp_path / "own.onnx_adapter")])
    assert rc == 0 and "swappable model written" in out
    s = AdapterSession(tmp_path / "sw.onnx", intra_op_threads=1)
    s.load_adapter("own", tmp_path / "own.onnx_adapter")
    np.testing.assert_allclose(s.run({"image": images}, "own")["output"], served.reference("a", images), atol=ATOL)
    rc, out = run(["serve-export", str(gdir), str(tmp_path / "mx.onnx"), "--mixed"])
    assert rc == 0
    m = MixedAdapterSession(tmp_path / "mx.onnx", {"own": tmp_path / "own.onnx_adapter"}, intra_op_threads=1)
    np.testing.assert_allclose(m.run({"image": images}, "own")["output"], served.reference("a", images), atol=ATOL)
    rc, out = run(["serve-package", str(gdir), str(tmp_path / "repo"), "--name", "demo", "--torchscript"])
    assert rc == 0
    assert (tmp_path / "repo" / "demo" / "config.pbtxt").is_file()
    assert (tmp_path / "repo" / "demo_torchscript" / "demo.pt").is_file()
    rc, out = run(["serve-package", str(tmp_path / "sw.onnx"), str(tmp_path / "repo"), "--name", "sw", "--torchscript"])
    assert rc == 2 and "needs a saved graph" in out
