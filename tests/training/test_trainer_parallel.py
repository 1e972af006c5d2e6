"""``train`` with ``nproc=2`` (gloo, FSDP2): equal to one process, sharded checkpoints, resume, options."""

from __future__ import annotations

import dataclasses
import re
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
    ckpt = torch.load(folder / "step_000002.pt", weights_only=True)
    assert re.fullmatch(r"step_000002\.[0-9a-f]{8}\.dcp", ckpt["sharded"]), ckpt["sharded"]
    assert (folder / ckpt["sharded"] / ".metadata").is_file()
    assert [f.name for f in folder.glob("step_000002*.dcp")] == [ckpt["sharded"]]  # one shard folder per step
    assert "model" not in ckpt and ckpt["config"]["nproc"] == 2
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
    with pytest.raises(TrainConfigError, match=r"flora_update must be one of \('scaled', 'lift', 'paper'\), got 'unbiased'"):
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


def test_stale_shard_folders_of_a_step_are_removed_after_the_commit(tmp_path: Path) -> None:
    from flora_graph.training.checkpoints import remove_stale_shards

    for name in ("step_000002.dcp", "step_000002.0a1b2c3d.dcp", "step_000002.deadbeef.dcp", "step_000004.0a1b2c3d.dcp",
                 "step_000002.notes"):
        (tmp_path / name).mkdir()
    removed = remove_stale_shards(tmp_path / "step_000002.pt", keep="step_000002.deadbeef.dcp")
    assert sorted(f.name for f in removed) == ["step_000002.0a1b2c3d.dcp", "step_000002.dcp"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["step_000002.deadbeef.dcp", "step_000002.notes",
                                                          "step_000004.0a1b2c3d.dcp"]


def test_a_rank_error_crosses_to_the_launcher_as_json_of_its_class(tmp_path: Path) -> None:
    from flora_graph.errors import FloraGraphError
    from flora_graph.training.parallel import _read_error, _write_error

    _write_error(tmp_path / "e.json", TrainConfigError("resume: option nproc differs"))
    err = _read_error(tmp_path / "e.json")
    assert type(err) is TrainConfigError and str(err) == "resume: option nproc differs"
    (tmp_path / "f.json").write_text('{"module": "os", "type": "system", "message": "x"}')
    assert type(_read_error(tmp_path / "f.json")) is FloraGraphError  # only flora_graph error classes come back


class _DiedBySignal:
    """A stand-in for ``torch.multiprocessing``'s context whose rank 1 died by SIGABRT."""

    def join(self, timeout: float | None = None) -> bool:
        import torch.multiprocessing as mp

        raise mp.ProcessExitedException("process 1 terminated with signal SIGABRT", error_index=1, error_pid=1,
                                        exit_code=-6, signal_name="SIGABRT")


def test_a_rank_dying_in_teardown_after_the_run_completed_loses_nothing(tmp_path: Path) -> None:
    """gloo can abort a rank while its process group is torn down on a loaded machine: after rank 0 marked the run
    complete (every rank past the last barrier, the result written) that is no failure; before, it is."""
    import torch.multiprocessing as mp

    from flora_graph.training.parallel import DONE, join_ranks

    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        join_ranks(_DiedBySignal(), tmp_path)
    (tmp_path / DONE).touch()
    join_ranks(_DiedBySignal(), tmp_path)
