"""Worker of ``test_accumulate_orthogonal_distributed.py`` (its own module so ``torch.multiprocessing`` can import it).

On 2 gloo ranks, each with its half of every global batch: Flora steps on gradients summed by
``FloraAccumulator(projection="orthogonal")``, once on a ``fully_shard``-ed model (FSDP2: sharded
buffers and partial sums) and once on a plain model (the accumulator all-reduces and averages the
compressed sums). Saves the gathered parameters of both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flora_graph.flora import FloraAccumulator
from tests.training import _fsdp_worker as w
from tests.training._ranks import rank_group


def run(model: torch.nn.Module, batches, micro: int) -> None:
    """Flora (rank 4, resampled every 2 steps) on ``micro`` micro-batches per step, summed orthogonally."""
    acc = FloraAccumulator(model.named_parameters(), rank=4, seed=1, projection="orthogonal")
    w.train(model, w.make_flora(model, "accumulate"), batches, acc, micro)


def worker(rank: int, world: int, meet: str, out_dir: str, steps: int) -> None:
    """One rank: the sharded and the plain scenario on its half of every batch; saves both models' parameters."""
    with rank_group(rank, world, meet):
        shard = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in w.global_batches(steps)]
        sharded = w._sharded()
        run(sharded, shard, w.MICRO)
        plain = w.make_model()
        run(plain, shard, w.MICRO)
        results = {"fsdp": w._full(sharded), "plain": {k: v.detach().clone() for k, v in plain.state_dict().items()}}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
