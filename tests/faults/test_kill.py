"""A writer killed at every commit boundary leaves the old artifact or the new one, bit for bit;
the next write removes what the killed one left and commits.

Each test records the boundaries a write passes (``storage._fault_hook``), then, for each one,
prepares the old artifact, forks a child that writes the new one and dies by ``os._exit`` at
that boundary, and checks what a reader finds.
"""

from __future__ import annotations

import copy
import errno
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from flora_graph import storage
from flora_graph.adapters import LoRAAdapter, adapters_of, apply_lora
from flora_graph.adapters.peft import load_peft_adapter, save_peft_adapter
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import onnx_writer
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.onnx_writer import save_onnx
from flora_graph.serving.artifacts import export_torchscript, package_triton
from flora_graph.training.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

from ..ir.helpers import rich_graph, tiny_graph
from ._harness import boundaries, hidden, kill_at

Write = Callable[[Path], object]


def every_boundary(tmp_path: Path, prepare: Write, write: Write, state: Callable[[Path], Any],
                   *, missing_ok: bool = False) -> list[str]:
    """Kill ``write`` (new artifact under a root folder) at each of its boundaries after ``prepare`` (old).

    Returns the labels. ``state(root)`` is what a reader sees (``None``: no artifact, allowed
    before the commit only when ``missing_ok``, i.e. a first write).
    """
    refs = {}
    for which, steps in (("old", [prepare]), ("new", [prepare, write])):
        root = tmp_path / f"ref_{which}"
        root.mkdir()
        for step in steps:
            step(root)
        refs[which] = state(root)
    assert refs["old"] != refs["new"]
    probe = tmp_path / "probe"
    probe.mkdir()
    prepare(probe)
    labels = boundaries(lambda: write(probe))
    assert state(probe) == refs["new"] and not hidden(probe)
    committed = False
    for i, label in enumerate(labels):
        root = tmp_path / f"kill{i}"
        root.mkdir()
        prepare(root)
        kill_at(lambda root=root: write(root), i)
        got = state(root)
        if got == refs["new"]:
            committed = True
        else:
            assert not committed, f"killed at #{i} ({label}): the old artifact came back after the new one"
            assert got == refs["old"] or (missing_ok and got is None), f"killed at #{i} ({label}): a mix"
        write(root)  # the next write cleans up and commits
        assert state(root) == refs["new"], f"the write after a kill at #{i} ({label})"
        assert not hidden(root), f"leftovers after a kill at #{i} ({label}) and a write: {hidden(root)}"
    assert committed, "no kill point after the commit"
    return labels


# ------------------------------------------------------------------ graph folders
def graph_state(root: Path) -> dict[str, bytes] | None:
    folder = root / "g"
    if not folder.exists():
        return None
    Graph.load(folder)
    notes = folder / "NOTES.txt"
    assert not (root / "notes").exists() or notes.read_bytes() == b"mine", "a file of the user's was lost"
    return {f: (folder / f).read_bytes() for f in ("graph.json", "weights.safetensors")}


def with_notes(root: Path) -> None:
    tiny_graph().save(root / "g")
    (root / "g" / "NOTES.txt").write_bytes(b"mine")
    (root / "notes").touch()  # marks that NOTES.txt must survive


def test_graph_save_over_an_old_graph(tmp_path: Path) -> None:
    labels = every_boundary(tmp_path, with_notes, lambda root: rich_graph().save(root / "g"), graph_state)
    assert "folder:staged" in labels and "folder:committed" in labels


def test_graph_save_first_write(tmp_path: Path) -> None:
    every_boundary(tmp_path, lambda root: None, lambda root: rich_graph().save(root / "g"), graph_state, missing_ok=True)


def test_graph_save_without_renameat2_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two renames instead of the exchange: a kill between them leaves the old graph under
    ``.g.old-*`` (no ``g``), which the next write (or :func:`remove_leftovers`) puts back first."""

    def refuse(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "no exchange here")

    monkeypatch.setattr(storage, "_exchange", refuse)
    labels = every_boundary(tmp_path, with_notes, lambda root: rich_graph().save(root / "g"), graph_state, missing_ok=True)
    root = tmp_path / "between"
    root.mkdir()
    with_notes(root)
    old = graph_state(root)
    kill_at(lambda: rich_graph().save(root / "g"), labels.index("folder:moved-old"))
    assert not (root / "g").exists() and sorted(p.name[:7] for p in root.iterdir() if p.name != "notes") == [".g.old-", ".g.tmp-"]
    storage.remove_leftovers(root, "g")
    assert graph_state(root) == old and not hidden(root)


def test_graph_save_in_place_where_the_folder_cannot_be_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount point (EBUSY/EXDEV): the files are renamed in one by one, graph.json last."""

    def refuse(a: Path, b: Path) -> None:
        raise OSError(errno.EXDEV, "another file system")

    monkeypatch.setattr(storage, "_exchange", refuse)
    with_notes(tmp_path)
    labels = boundaries(lambda: rich_graph().save(tmp_path / "g"))
    assert labels.count("folder:in-place") == 2 and "folder:committed" in labels
    assert graph_state(tmp_path) == {f: (tmp_path / "g" / f).read_bytes() for f in ("graph.json", "weights.safetensors")}
    assert not hidden(tmp_path)


# ------------------------------------------------------------------ ONNX + external data
def dense(seed: int, width: int) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("dense")
    x = g.input("x", ("batch", 64))
    w1 = rng.standard_normal((width, 64)).astype(np.float32)
    h = g.add(Op.LINEAR, [x, g.const("w1", w1), g.const("b1", rng.standard_normal(width).astype(np.float32))])
    w2 = rng.standard_normal((8, width)).astype(np.float32)
    g.set_output("y", g.add(Op.LINEAR, [g.add(Op.TANH, [h]), g.const("w2", w2)]))
    return verify(g)


BIG, SMALL = 64, 4  # 16 KiB of weights (past the lowered threshold: external data) or 1 KiB (one file)
FEEDS = {"x": np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)}


def onnx_state(root: Path) -> tuple[bytes, bytes] | None:
    path = root / "m.onnx"
    if not path.exists():
        return None
    model = onnx.load(str(path))  # external data read in: the data file's name does not matter
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model.SerializeToString(), sess.run(None, FEEDS)[0].tobytes()


@pytest.mark.parametrize(("old", "new", "as_model"), [
    (BIG, BIG, False), (BIG, BIG, True), (SMALL, BIG, False), (BIG, SMALL, True), (None, BIG, False),
])
def test_onnx_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: int | None, new: int,
                                 as_model: bool) -> None:
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    new_graph = dense(2, new)
    new_model = to_onnx(new_graph) if as_model else new_graph
    prepare = (lambda root: save_onnx(dense(1, old), root / "m.onnx")) if old else (lambda root: None)
    every_boundary(tmp_path, prepare, lambda root: save_onnx(new_model, root / "m.onnx"), onnx_state,
                   missing_ok=old is None)
    root = tmp_path / "kill0"
    data = sorted(p.name for p in root.iterdir() if p.name != "m.onnx")
    assert len(data) == (new == BIG) and all(d.startswith("m.onnx.") and d.endswith(".data") for d in data)


def test_onnx_data_file_names_alternate_and_stale_ones_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    path = tmp_path / "m.onnx"
    save_onnx(dense(1, BIG), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    save_onnx(dense(2, BIG), path)  # the old model reads m.onnx.data: the new data goes elsewhere
    (second,) = [p.name for p in tmp_path.iterdir() if p.name != "m.onnx"]
    assert second != "m.onnx.data" and second.startswith("m.onnx.") and second.endswith(".data")
    save_onnx(dense(3, BIG), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    save_onnx(dense(3, SMALL), path)  # one file: no data file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ------------------------------------------------------------------ PEFT folders
class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).sum(-1, keepdim=True) + self.v(x)


def adapted(seed: int, alpha: float) -> nn.Module:
    torch.manual_seed(0)
    model = Two()
    apply_lora(model, ["q", "v"], rank=2, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters_of(model).values():
            assert isinstance(a, LoRAAdapter)
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g))
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
    return model


def peft_state(root: Path) -> dict[str, bytes] | None:
    folder = root / "adapter"
    if not folder.exists():
        return None
    torch.manual_seed(0)
    load_peft_adapter(Two(), folder)
    return {f: (folder / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}


def test_save_peft_adapter(tmp_path: Path) -> None:
    old, new = adapted(1, 4.0), adapted(2, 16.0)  # new weights with the old lora_alpha would load silently wrong

    def prepare(root: Path) -> None:
        save_peft_adapter(old, root / "adapter")
        (root / "adapter" / "README.md").write_text("kept")

    every_boundary(tmp_path, prepare, lambda root: save_peft_adapter(new, root / "adapter"), peft_state)
    assert (tmp_path / "kill0" / "adapter" / "README.md").read_text() == "kept"
    check = copy.deepcopy(Two())
    load_peft_adapter(check, tmp_path / "kill0" / "adapter")
    assert torch.equal(adapters_of(check)["q"].lora_B, adapters_of(new)["q"].lora_B)


# ------------------------------------------------------------------ Triton model entries
def triton_state(root: Path) -> tuple[bytes, bytes, bytes] | None:
    entry = root / "repo" / "m"
    if not (entry / "config.pbtxt").exists():
        return None
    model = entry / "1" / "model.onnx"
    blob = onnx.load(str(model / "model.onnx" if model.is_dir() else model)).SerializeToString()
    return (entry / "config.pbtxt").read_bytes(), blob, (entry / "2" / "model.onnx").read_bytes()


@pytest.mark.parametrize("external", [False, True])
def test_triton_entry(tmp_path: Path, external: bool) -> None:
    def prepare(root: Path) -> None:
        package_triton(dense(1, BIG), root / "repo", "m", version=2)
        package_triton(dense(1, SMALL), root / "repo", "m", version=1)

    def write(root: Path) -> None:
        package_triton(dense(2, BIG), root / "repo", "m", max_batch_size=4, external_data=external)

    every_boundary(tmp_path, prepare, write, triton_state)
    entry = tmp_path / "kill0" / "repo" / "m"
    assert sorted(os.listdir(entry)) == ["1", "2", "config.pbtxt"]
    assert (entry / "1" / "model.onnx").is_dir() == external


# ------------------------------------------------------------------ TorchScript model + its I/O description
def torchscript_state(root: Path) -> tuple[bytes, bytes] | None:
    pt, meta = root / "ts" / "m.pt", root / "ts" / "m.json"
    if not meta.exists():
        return None
    module = torch.jit.load(str(pt))
    x = torch.ones(2, 64)
    return meta.read_bytes(), module(x)[0].numpy().tobytes()


def test_torchscript_pair(tmp_path: Path) -> None:
    def prepare(root: Path) -> None:
        export_torchscript(dense(1, SMALL), root / "ts", "m")
        (root / "ts" / "notes.txt").write_text("kept")

    every_boundary(tmp_path, prepare, lambda root: export_torchscript(dense(2, BIG), root / "ts", "m"), torchscript_state)
    assert (tmp_path / "kill0" / "ts" / "notes.txt").read_text() == "kept"


# ------------------------------------------------------------------ checkpoints
def ckpt_state(root: Path) -> tuple[int, bytes] | None:
    path = root / "checkpoints" / "step_000001.pt"
    if not path.exists():
        return None
    ck = load_checkpoint(path)
    buf = io.BytesIO()
    torch.save(ck["w"], buf)
    return ck["step"], buf.getvalue()


def test_checkpoint(tmp_path: Path) -> None:
    def payload(seed: int) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "step": seed, "w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}

    old, new = payload(1), payload(2)
    every_boundary(tmp_path, lambda root: save_checkpoint(root / "checkpoints" / "step_000001.pt", old),
                   lambda root: save_checkpoint(root / "checkpoints" / "step_000001.pt", new), ckpt_state)


# ------------------------------------------------------------------ what a commit keeps and follows
def test_other_entries_of_the_folder_are_kept_as_hard_links(tmp_path: Path) -> None:
    g = tmp_path / "g"
    tiny_graph().save(g)
    (g / "README").write_text("mine")
    (g / "sub" / "deep").mkdir(parents=True)
    (g / "sub" / "deep" / "f").write_text("deep")
    (g / "link").symlink_to("README")
    inode = (g / "README").stat().st_ino
    rich_graph().save(g)
    assert (g / "README").read_text() == "mine" and (g / "README").stat().st_ino == inode
    assert (g / "sub" / "deep" / "f").read_text() == "deep" and os.readlink(g / "link") == "README"
    assert Graph.load(g).name == rich_graph().name and not hidden(tmp_path)


def test_saving_into_the_working_directory_follows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = tmp_path / "g"
    tiny_graph().save(g)
    monkeypatch.chdir(g)
    rich_graph().save(".")
    assert Path.cwd() == g and Graph.load(".").name == rich_graph().name
    assert Path("graph.json").read_bytes() == (g / "graph.json").read_bytes()
    assert not hidden(tmp_path)


def test_first_write_into_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    assert boundaries(lambda: tiny_graph().save(tmp_path / "g"))[-2:] == ["folder:committed", "folder:cleaned"]
    assert sorted(os.listdir(tmp_path / "g")) == ["graph.json", "weights.safetensors"]


def test_a_live_writers_temporaries_are_not_removed(tmp_path: Path) -> None:
    """The next write removes leftovers of dead writers only: a live one holds an flock on its temporary."""
    dest = tmp_path / "g"
    with storage.staged_folder(dest) as staging:
        tiny_graph().save(dest)  # another write to the same destination meanwhile
        assert staging.is_dir()
        storage.write_new(staging / "extra", b"1")
    assert sorted(os.listdir(dest)) == ["extra", "graph.json", "weights.safetensors"]
    with storage.atomic_file(tmp_path / "f") as f:
        storage.atomic_write_bytes(tmp_path / "f", b"other")
        f.write(b"mine")
    assert (tmp_path / "f").read_bytes() == b"mine" and not hidden(tmp_path)
