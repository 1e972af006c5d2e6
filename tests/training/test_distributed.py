"""Under DistributedDataParallel (gloo, 2 CPU processes): identical ranks, equal to one process on the whole batch."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.training import _ddp_worker as w


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_ranks_are_identical_and_match_a_single_process(tmp_path: Path):
    ctx = mp.start_processes(w.worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):  # raises if a rank fails
        if time.monotonic() > deadline:
            for proc in ctx.processes:  # only the two ranks this test started
                proc.terminate()
            pytest.fail("DDP ranks did not finish within 90 s")
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
