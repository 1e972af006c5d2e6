"""``train``: loss goes down, exact resume, the ``train`` CLI, and the ONNX export at the end."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from flora_graph.training.cli import add_cli
from flora_graph.training.trainer import TrainConfig, TrainConfigError, load_checkpoint, lr_at, train

TINY = {"batch": 8, "seq": 32, "corpus_bytes": 1 << 16, "export": False, "eval_batches": 2}


def _equal(a: Any, b: Any, where: str = "") -> None:
    """Recursive bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("optimizer", ["flora", "adam"])
def test_thirty_steps_lower_the_loss(optimizer: str) -> None:
    r = train(TrainConfig(steps=30, optimizer=optimizer, eval_every=10, **TINY), progress=None)
    first = r.train_losses[0][1]
    last = sum(v for _, v in r.train_losses[-5:]) / 5
    assert last < first - 1.5, (first, last)
    assert r.final_eval_loss < r.eval_losses[0][1] - 1.5
    assert [s for s, _ in r.eval_losses] == [0, 10, 20, 30]
    assert len(r.train_losses) == 30 and r.checkpoints == [] and r.export is None


@pytest.mark.parametrize(
    ("optimizer", "accum"),
    [("flora", 2), ("adam", 1), ("flora-adapter", 2)],  # FloraAccumulator, AdamW, FloraAdapter states
)
def test_resume_from_step_10_equals_an_uninterrupted_run(tmp_path: Path, optimizer: str, accum: int) -> None:
    base = TrainConfig(steps=20, optimizer=optimizer, accum=accum, kappa=3, rank=4, ckpt_every=10, eval_every=5,
                       out=str(tmp_path / "full"), **{**TINY, "batch": 4, "seq": 16})
    full = train(base, progress=None)
    ckpt10 = tmp_path / "full" / "checkpoints" / "step_000010.pt"
    assert full.checkpoints == [ckpt10, tmp_path / "full" / "checkpoints" / "step_000020.pt"]
    resumed = train(dataclasses.replace(base, out=str(tmp_path / "resumed"), resume=str(ckpt10)), progress=None)
    assert resumed.start_step == 10
    _equal(full.model.state_dict(), resumed.model.state_dict(), "model")
    _equal(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    assert full.train_losses == resumed.train_losses and full.eval_losses == resumed.eval_losses
    # the checkpoints themselves, read with weights_only=True, agree bit for bit
    a = torch.load(full.checkpoints[-1], weights_only=True)
    b = torch.load(resumed.checkpoints[-1], weights_only=True)
    for key in ("model", "optimizer", "accumulator", "adapters", "history", "step"):
        _equal(a[key], b[key], key)
    if optimizer == "flora":
        assert a["accumulator"]["steps"] == 20
    if optimizer == "flora-adapter":
        assert all(s["current_step"] == 20 for s in a["adapters"].values())


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    base = TrainConfig(steps=3, out=str(tmp_path), **{**TINY, "batch": 2, "seq": 8})
    train(base, progress=None)
    with pytest.raises(TrainConfigError, match="option rank is 4 but the checkpoint was trained with 8"):
        train(dataclasses.replace(base, rank=4, resume=str(tmp_path)), progress=None)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainConfigError, match=r"junk\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_config_validation_names_the_option() -> None:
    with pytest.raises(TrainConfigError, match="rank must be an int >= 1, got 0"):
        TrainConfig(rank=0, export=False)
    with pytest.raises(TrainConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd", export=False)
    with pytest.raises(TrainConfigError, match="need an output folder"):
        TrainConfig()  # export on, no out


def test_lr_schedule_warms_up_then_decays() -> None:
    c = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr_ratio=0.1, export=False)
    assert lr_at(c, 0) == pytest.approx(1e-3) and lr_at(c, 9) == pytest.approx(1e-2)
    assert lr_at(c, 10) == pytest.approx(1e-2) and lr_at(c, 100) == pytest.approx(1e-3)
    assert all(lr_at(c, s) >= lr_at(c, s + 1) for s in range(10, 100))
    assert lr_at(dataclasses.replace(c, schedule="constant"), 60) == 1e-2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flora-graph")
    add_cli(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    p, out = _parser(), tmp_path / "run"
    args = p.parse_args(["train", "--steps", "4", "--batch", "2", "--seq", "16", "--corpus-bytes", "65536",
                         "--ckpt-every", "2", "--eval-every", "2", "--out", str(out), "--no-export", "--progress", "none"])
    console = Console(record=True, width=200)
    assert args.func(args, console) == 0
    assert sorted(f.name for f in (out / "checkpoints").iterdir()) == ["step_000002.pt", "step_000004.pt"]
    assert not (out / "model.onnx").exists()
    text = console.export_text()
    assert "eval loss" in text and "step_000004.pt" in text
    # --resume takes the run's options from the checkpoint; only --steps changes
    args = p.parse_args(["train", "--resume", str(out), "--steps", "6", "--progress", "rich"])
    assert args.func(args, console) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 6 and ckpt["config"]["batch"] == 2 and ckpt["config"]["export"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--rank", "0"], "argument --rank: must be an int >= 1, got 0"),
     (["--lr", "-1"], "argument --lr: must be a finite number > 0"),
     (["--optimizer", "sgd"], "argument --optimizer: invalid choice")],
)  # fmt: skip
def test_cli_bad_option_is_a_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["train", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_export_at_the_end_matches_eager_torch(tmp_path: Path) -> None:
    import onnx

    r = train(TrainConfig(steps=5, out=str(tmp_path), **{**TINY, "export": True}), progress=None)
    assert r.export is not None and r.export.path == tmp_path / "model.onnx" and r.export.path.is_file()
    onnx.checker.check_model(str(r.export.path))
    assert r.export.max_abs_diff <= 1e-4, r.export.max_abs_diff
    assert r.export.ok


def test_progress_callable_sees_every_step() -> None:
    seen: list[tuple[int, int]] = []
    train(TrainConfig(steps=3, **{**TINY, "batch": 2, "seq": 8}), progress=lambda s, n, m: seen.append((s, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
