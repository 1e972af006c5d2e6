"""How the 2-rank gloo tests start and end their ranks, as the trainer's launcher does (``flora_graph.training.parallel``).

:func:`spawn` (the test's side) runs ``fn(rank, world, meet, *args)`` on each rank; each rank's body runs inside
:func:`rank_group` (the rank's side). They meet through a file store in a fresh folder ``meet``: no port to race
another test for, no rank hosting a server the others outlive. Once every rank is past its last barrier, its results
written, rank 0 marks the run complete there (``DONE``); a rank killed by a signal after that, as gloo can abort one
while tearing the group down on a loaded machine, loses nothing. A rank that fails before it fails the test.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flora_graph.training.parallel import DONE


def spawn(fn, nprocs: int, args: tuple, limit: float = 120.0) -> None:
    """Run ``fn(rank, nprocs, meet, *args)`` on ``nprocs`` processes (see the module docstring); fails the test past
    ``limit`` seconds."""
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


@contextlib.contextmanager
def rank_group(rank: int, world: int, meet: str) -> Iterator[None]:
    """One thread, the gloo group of ``meet``'s store for the block; after a block that finished, a barrier (neither
    rank tears gloo down while the other still talks to it) and rank 0's ``DONE``; the group destroyed on leaving."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(meet) / 'store'}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
        if rank == 0:  # every rank is past its last collective and its results are whole
            (Path(meet) / DONE).touch()
    finally:
        dist.destroy_process_group()
