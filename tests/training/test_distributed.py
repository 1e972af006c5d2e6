"""Under DistributedDataParallel (gloo, 2 CPU processes): identical ranks, equal to one process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.training import _ddp_worker as w
from tests.training._ranks import spawn


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_ranks_are_identical_and_match_a_single_process(tmp_path: Path):
    spawn(w.worker, 2, (str(tmp_path),), limit=90)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = {}
    model = w.make_model()
    w.run_flora(model, model, w.global_batches())
    single["flora"] = model.state_dict()
    model = w.make_model()
    # one process, the whole batch: the same 4 micro-batches the two ranks saw, summed in one buffer
    w.run_accumulate(model, model, w.global_batches(), 2 * w.MICRO)
    single["accumulate"] = model.state_dict()

    single["accumulate_ddp_sync"] = single["accumulate"]
    for scenario in w.SCENARIOS:
        start = w.make_model().state_dict()
        for key, value in single[scenario].items():
            assert torch.equal(ranks[0][scenario][key], ranks[1][scenario][key]), (scenario, key)
            torch.testing.assert_close(ranks[0][scenario][key], value, rtol=1e-5, atol=1e-6)
            assert not torch.equal(value, start[key])  # it did train
