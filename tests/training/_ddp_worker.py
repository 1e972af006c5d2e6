"""Worker of the DDP test (its own module so ``torch.multiprocessing.spawn`` can import it).

Every scenario is a pure function of ``(model, data)``, run both by each of the 2 ranks on
its half of the global batch and by a single process on the whole batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flora_graph.flora import Flora, FloraAccumulator
from tests.training._ranks import rank_group

STEPS = 4
MICRO = 2  # micro-batches per rank per step in the accumulation scenarios
SCENARIOS = ("flora", "accumulate", "accumulate_ddp_sync")


def make_model() -> nn.Module:
    """The model every process starts from."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One global batch of 16 samples per step."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        x = torch.randn(16, 12, generator=gen)
        out.append((x, x[:, :6].sin()))
    return out


def run_flora(model: nn.Module, wrapped: nn.Module, batches) -> None:
    """Plain data parallel training with the Flora optimizer (resampling every 2 steps)."""
    opt = Flora(model.named_parameters(), lr=1e-2, rank=4, kappa=2)
    for x, y in batches:
        opt.zero_grad()
        (wrapped(x) - y).square().mean().backward()
        opt.step()


def run_accumulate(model: nn.Module, wrapped: nn.Module, batches, micro: int, no_sync: bool = True) -> None:
    """Compressed accumulation over ``micro`` micro-batches, then torch.optim.Adam.

    ``no_sync=False`` lets DDP also all-reduce every micro-batch's full gradient: slower, same result.
    """
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = FloraAccumulator(model.named_parameters(), rank=4, seed=1)
    for x, y in batches:
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            with acc.no_sync(wrapped) if no_sync else contextlib.nullcontext():
                ((wrapped(xs) - ys).square().mean() / micro).backward()
            acc.accumulate()
        acc.finalize()
        opt.step()
        opt.zero_grad(set_to_none=True)


def worker(rank: int, world: int, meet: str, out_dir: str) -> None:
    """One DDP rank: both scenarios on its shard; saves its final parameters."""
    with rank_group(rank, world, meet):
        shard = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in global_batches()]
        results = {}
        for name in SCENARIOS:
            model = make_model()
            ddp = DistributedDataParallel(model)
            if name == "flora":
                run_flora(model, ddp, shard)
            else:
                run_accumulate(model, ddp, shard, MICRO, no_sync=name == "accumulate")
            results[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
