"""Under FSDP2 (``fully_shard``, gloo, 2 CPU processes): Flora equals one process on the whole batch.

One run of the 2-rank worker (module fixture) covers both update rules, ``FloraAccumulator`` and
the other options (full second moment, relative step, weight decay) across resamples (``kappa=2``, 4 steps), a bit-exact ``torch.distributed.checkpoint`` resume, the
optimizer-state bytes per rank (the one-process formula / 2), and the refusals: mixed plain and
sharded parameters, layouts Flora cannot compress, state from another sharding, and the 2-rank
checkpoint loaded on a 1-rank mesh (another world size), refused with the state unchanged.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flora_graph.flora.moments import state_shapes
from flora_graph.flora.projection import layout_for
from flora_graph.training.parallel import DONE
from tests.training import _fsdp_worker as w

STEPS = 4
SCENARIOS = ("flora", "lift", "paper", "accumulate", "options")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _spawn(fn, nprocs: int, args: tuple, limit: float = 120.0) -> None:
    """Run ``fn(rank, nprocs, meet, *args)`` on ``nprocs`` processes, as the trainer's launcher runs its ranks
    (``flora_graph.training.parallel``): they meet through a file store in a fresh folder ``meet`` (no port to race
    another test for, no rank hosting a server the others outlive), and a rank killed by a signal after rank 0 marked
    the run complete there (``DONE``: every rank past its last barrier, its results written), as gloo can abort one
    while tearing the group down on a loaded machine, loses nothing. Fails the test past ``limit`` seconds."""
    with tempfile.TemporaryDirectory(prefix="flora-ranks-") as meet:
        ctx = mp.start_processes(fn, args=(nprocs, meet, *args), nprocs=nprocs, join=False)
        deadline = time.monotonic() + limit
        try:
            while not ctx.join(timeout=1):  # raises if a rank fails
                if time.monotonic() > deadline:
                    for proc in ctx.processes:  # only the ranks this test started
                        proc.terminate()
                    pytest.fail(f"{fn.__name__}: ranks did not finish within {limit:.0f} s")
        except mp.ProcessExitedException:
            if not (Path(meet) / DONE).is_file():
                raise


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    _spawn(w.worker, 2, (str(out), STEPS, SCENARIOS))
    return {"ranks": [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]}


def _one_process(scenario: str) -> dict[str, torch.Tensor]:
    model = w.make_model()
    # the whole batch: the same 4 micro-batches the two ranks saw, summed in one buffer
    w.run_scenario(model, scenario, w.global_batches(STEPS), 2 * w.MICRO)
    return model.state_dict()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_equal_one_process_across_resamples(runs: dict[str, Any], scenario: str) -> None:
    single = _one_process(scenario)
    start = w.make_model().state_dict()
    for key, value in single.items():
        got = [r[scenario][key] for r in runs["ranks"]]
        assert torch.equal(got[0], got[1]), (scenario, key)
        torch.testing.assert_close(got[0], value, rtol=1e-5, atol=1e-5)
        assert not torch.equal(value, start[key])  # it did train


def test_resume_from_a_sharded_checkpoint_is_bit_exact(runs: dict[str, Any]) -> None:
    assert [r["resume_bit_exact"] for r in runs["ranks"]] == [True, True]


def test_state_bytes_per_rank_are_the_formula_over_the_world_size(runs: dict[str, Any]) -> None:
    model = w.make_model("even")
    opt = w.make_flora(model, "flora")
    w.train(model, opt, w.global_batches(1))
    group = opt.param_groups[0]
    formula = sum(4 * torch.Size(shape).numel() for p in model.parameters()
                  for shape in state_shapes(layout_for(p.shape, group["rank"]), group).values())
    assert w.state_bytes(opt) == formula  # one process: the formula, measured
    assert [r["state_bytes"] for r in runs["ranks"]] == [formula // 2, formula // 2]


def test_bad_inputs_are_refused_by_name_and_leave_the_state(runs: dict[str, Any]) -> None:
    errors = runs["ranks"][0]["errors"]
    assert errors == runs["ranks"][1]["errors"]
    expect = {
        "mixed": ("'extra'", "plain tensor"),
        "shard1": ("'cols'", "Shard(dim=1)"),
        "replicate": ("'repl'", "Replicate()"),
        "accumulator_mixed": ("'extra'", "plain tensor"),
        "plain_into_sharded": ("'0.weight'", "plain Tensor"),
        "sharded_into_plain": ("'0.weight'", "saved sharded over 2 ranks"),
        "bad_update": ("update must be one of ('scaled', 'lift', 'paper')", "'unbiased'"),
    }
    for case, needles in expect.items():
        assert errors[case].startswith("OptimizerError"), (case, errors[case])
        for needle in needles:
            assert needle in errors[case], (case, errors[case])
    assert errors["untouched"] == "True"
    for rank in runs["ranks"]:  # each rank on a 1-rank mesh: another world size
        other = rank["other_world"]
        for case in ("dcp_world", "state_dict_world"):
            assert other[case].startswith("OptimizerError"), (case, other[case])
            assert "'0.weight'" in other[case] and "2" in other[case], other[case]
        assert other["untouched"] == "True"
