"""Under FSDP2 (``fully_shard``, gloo, 2 CPU processes): Flora equals one process on the whole batch.

One run of the 2-rank worker (module fixture) covers both update rules, ``FloraAccumulator`` and
the other options (full second moment, relative step, weight decay) across resamples (``kappa=2``, 4 steps), a bit-exact ``torch.distributed.checkpoint`` resume, the
optimizer-state bytes per rank (the one-process formula / 2), and the refusals: mixed plain and
sharded parameters, layouts Flora cannot compress, state from another sharding, and the 2-rank
checkpoint loaded on a 1-rank mesh (another world size), refused with the state unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from flora_graph.flora.moments import state_shapes
from flora_graph.flora.projection import layout_for
from tests.training import _fsdp_worker as w
from tests.training._ranks import spawn

STEPS = 4
SCENARIOS = ("flora", "lift", "paper", "accumulate", "options")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    spawn(w.worker, 2, (str(out), STEPS, SCENARIOS))
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
