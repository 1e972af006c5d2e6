"""A full disk and a read-only destination: a typed error naming the path, the old artifact
untouched, no temporary file and no folder created by the failed write.

Run on a 1 MiB tmpfs mounted for the test (root on Linux); skipped with the reason elsewhere.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from flora_graph.adapters import apply_lora
from flora_graph.adapters.peft import save_peft_adapter
from flora_graph.errors import ArtifactWriteError, FloraGraphError
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import onnx_writer
from flora_graph.runtimes.onnx_lowering import OnnxExportError
from flora_graph.runtimes.onnx_writer import save_onnx
from flora_graph.serving.artifacts import package_triton
from flora_graph.training.checkpoints import CHECKPOINT_FORMAT, save_checkpoint

from ..ir.helpers import tiny_graph
from ._harness import boundaries, hidden
from .test_kill import SMALL, Two, dense


def _mount(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=30, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 1 MiB tmpfs."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mounting a tmpfs needs Linux")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _mount(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)])
    if r.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        _mount(["umount", "-l", str(mnt)])


def big_graph() -> Graph:  # 2 MiB of weights: more than the tmpfs holds
    g = Graph("big")
    x = g.input("x", ("batch", 512))
    g.set_output("y", g.add(Op.LINEAR, [x, g.const("w", np.ones((1024, 512), np.float32))]))
    return verify(g)


def big_adapter() -> torch.nn.Module:
    model = Two()
    model.q = torch.nn.Linear(1024, 1024)
    apply_lora(model, ["q"], rank=300)
    return model


def big_checkpoint(path: Path) -> None:
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "step": 1, "w": torch.ones(512, 1024)})


WRITERS: dict[str, tuple[Callable[[Path], object], type[Exception]]] = {
    "graph": (lambda d: big_graph().save(d / "g"), ArtifactWriteError),
    "onnx-one-file": (lambda d: save_onnx(big_graph(), d / "m.onnx"), OnnxExportError),
    "onnx-external": (lambda d: save_onnx(big_graph(), d / "x.onnx"), OnnxExportError),
    "peft": (lambda d: save_peft_adapter(big_adapter(), d / "adapter"), ArtifactWriteError),
    "triton": (lambda d: package_triton(big_graph(), d / "repo", "m"), ArtifactWriteError),
    "checkpoint": (lambda d: big_checkpoint(d / "checkpoints" / "step_000001.pt"), ArtifactWriteError),
}


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def expect_failure(write: Callable[[Path], object], error: type[Exception], dest: Path, code: int) -> None:
    with pytest.raises(error) as err:
        write(dest)
    assert isinstance(err.value, FloraGraphError) and str(dest) in str(err.value), str(err.value)
    if isinstance(err.value, ArtifactWriteError):
        assert err.value.errno == code, err.value


@pytest.mark.parametrize("which", list(WRITERS))
def test_disk_full(tmpfs: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000 if which == "onnx-external" else 2_000_000_000)
    tiny_graph().save(tmpfs / "old")
    before, free = tree(tmpfs), os.statvfs(tmpfs).f_bfree
    write, error = WRITERS[which]
    expect_failure(write, error, tmpfs / "new" / "deeper", errno.ENOSPC)
    assert tree(tmpfs) == before and not hidden(tmpfs)  # no temporary file, no folder "new"
    assert os.statvfs(tmpfs).f_bfree == free
    expect_failure(write, error, tmpfs, errno.ENOSPC)  # into the mount point itself, beside the old graph
    assert tree(tmpfs) == before and not hidden(tmpfs)


def test_disk_full_over_an_old_artifact(tmpfs: Path) -> None:
    tiny_graph().save(tmpfs / "g")
    before = tree(tmpfs)
    with pytest.raises(ArtifactWriteError, match="No space left") as err:
        big_graph().save(tmpfs / "g")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmpfs / "g")
    assert tree(tmpfs) == before and Graph.load(tmpfs / "g").name == tiny_graph().name


@pytest.fixture
def read_only(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, int]]:
    """A destination holding a small graph that cannot be written: a read-only remount, else mode 0555."""
    if os.geteuid() == 0:
        mnt = request.getfixturevalue("tmpfs")
        tiny_graph().save(mnt / "g")
        r = _mount(["mount", "-o", "remount,ro", str(mnt)])
        if r.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.decode().strip()}")
        yield mnt, errno.EROFS
        return
    ro = tmp_path / "ro"  # pragma: no cover - runs only as a regular user
    ro.mkdir()
    tiny_graph().save(ro / "g")
    ro.chmod(0o555)
    try:
        yield ro, errno.EACCES
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("which", list(WRITERS))
def test_read_only_destination(read_only: tuple[Path, int], monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    dest, code = read_only
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000 if which == "onnx-external" else 2_000_000_000)
    before = tree(dest)
    write, error = WRITERS[which]
    expect_failure(write, error, dest / "new", code)
    expect_failure(write, error, dest, code)
    assert tree(dest) == before
    with pytest.raises(ArtifactWriteError) as err:  # over the old graph
        tiny_graph().save(dest / "g")
    assert err.value.errno == code and tree(dest) == before


def test_a_mount_point_is_updated_in_place(tmpfs: Path) -> None:
    """A mount point cannot be renamed: the graph is staged inside it and its files renamed in, graph.json last."""
    tiny_graph().save(tmpfs)
    (tmpfs / "NOTES").write_text("mine")
    labels = boundaries(lambda: dense(1, SMALL).save(tmpfs))
    assert labels.count("folder:in-place") == 2 and labels.index("folder:staged") < labels.index("folder:in-place")
    assert Graph.load(tmpfs).name == "dense" and (tmpfs / "NOTES").read_text() == "mine"
    assert sorted(os.listdir(tmpfs)) == ["NOTES", "graph.json", "weights.safetensors"]
