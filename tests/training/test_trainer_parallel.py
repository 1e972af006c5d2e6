"""``train`` with ``nproc=2`` (gloo, FSDP2): equal to one process, sharded checkpoints, resume, options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flora_graph.flora.options import UPDATES
from flora_graph.training.choices import FLORA_UPDATES
from flora_graph.training.trainer import TrainConfig, TrainConfigError, build_model, build_optimizer, train

TINY = {"batch": 4, "seq": 16, "corpus_bytes": 1 << 16, "export": False, "eval_batches": 2, "rank": 4, "kappa": 2}

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@needs_gloo
def test_two_processes_equal_one_and_write_sharded_checkpoints(tmp_path: Path) -> None:
    base = TrainConfig(steps=4, accum=2, eval_every=2, ckpt_every=2, flora_update="paper", out=str(tmp_path / "one"),
                       **TINY)
    one = train(base, progress=None)
    two = train(dataclasses.replace(base, nproc=2, out=str(tmp_path)), progress=None)
    assert two.optimizer is None and two.start_step == 0
    for (s1, a), (s2, b) in zip(one.train_losses + one.eval_losses, two.train_losses + two.eval_losses, strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    ref = one.model.state_dict()
    for key, value in two.model.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-5)
    folder = tmp_path / "checkpoints"
    assert two.checkpoints == [folder / "step_000002.pt", folder / "step_000004.pt"]
    assert (folder / "step_000002.dcp" / ".metadata").is_file()
    ckpt = torch.load(folder / "step_000002.pt", weights_only=True)
    assert ckpt["sharded"] == "step_000002.dcp" and "model" not in ckpt and ckpt["config"]["nproc"] == 2
    with pytest.raises(TrainConfigError, match="option nproc is 1 but the checkpoint was trained with 2"):
        train(dataclasses.replace(base, resume=str(folder / "step_000002.pt")), progress=None)


@pytest.mark.slow
@needs_gloo
def test_two_process_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    base = TrainConfig(steps=4, accum=2, eval_every=2, ckpt_every=2, nproc=2, out=str(tmp_path / "full"), **TINY)
    full = train(base, progress=None)
    resumed = train(dataclasses.replace(base, out=str(tmp_path / "resumed"),
                                        resume=str(tmp_path / "full" / "checkpoints" / "step_000002.pt")),
                    progress=None)
    assert resumed.start_step == 2 and resumed.train_losses == full.train_losses
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_flora_update_and_nproc_options() -> None:
    assert FLORA_UPDATES == UPDATES
    with pytest.raises(TrainConfigError, match=r"flora_update must be one of \('lift', 'paper'\), got 'unbiased'"):
        TrainConfig(flora_update="unbiased", export=False)
    with pytest.raises(TrainConfigError, match="nproc must be an int >= 1"):
        TrainConfig(nproc=0, export=False)
    with pytest.raises(TrainConfigError, match="batch=5 does not split evenly over nproc=2"):
        TrainConfig(batch=5, nproc=2, export=False)
    with pytest.raises(TrainConfigError, match=r"flora-adapter .* cannot run sharded"):
        TrainConfig(optimizer="flora-adapter", nproc=2, export=False)
    config = TrainConfig(flora_update="paper", export=False, **{k: v for k, v in TINY.items() if k != "export"})
    opt = build_optimizer(config, build_model(config))
    assert {g["update"] for g in opt.param_groups} == {"paper"}
    with pytest.raises(TrainConfigError, match="optimizer_factory runs in one process only"):
        train(dataclasses.replace(config, nproc=2), progress=None, optimizer_factory=lambda m, c: None)
