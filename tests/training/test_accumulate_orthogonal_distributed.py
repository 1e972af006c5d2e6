"""``FloraAccumulator(projection="orthogonal")`` on 2 gloo ranks equals one process on the combined batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.training import _accum_orthogonal_worker as ow
from tests.training import _fsdp_worker as w
from tests.training._ranks import spawn

STEPS = 4

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("orthogonal")
    spawn(ow.worker, 2, (str(out), STEPS))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("scenario", ["fsdp", "plain"])
def test_two_ranks_equal_one_process(ranks: list[dict[str, Any]], scenario: str) -> None:
    model = w.make_model()
    ow.run(model, w.global_batches(STEPS), 2 * w.MICRO)  # the same 4 micro-batches per step, in one process
    start = w.make_model().state_dict()
    for key, value in model.state_dict().items():
        got = [r[scenario][key] for r in ranks]
        assert torch.equal(got[0], got[1]), (scenario, key)
        torch.testing.assert_close(got[0], value, rtol=1e-5, atol=1e-5)
        assert not torch.equal(value, start[key])  # it did train
