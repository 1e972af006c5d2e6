"""Flora under FSDP2 (``fully_shard``, gloo, CPU): step time and state bytes per rank against one process.

The model is ``--layers`` MLP blocks (``Linear(h, 4h)``, GELU, ``Linear(4h, h)``: a tall and a wide
matrix each, both compressed). One process trains it on the whole batch; ``--nproc`` ranks
(``fully_shard`` per block and at the root) train it on their rows of the same batches. Each
process runs ``--threads`` torch threads. Reported: the median ``opt.step()`` time and the median
whole step (forward, backward, FSDP2's collectives, ``opt.step()``), the optimizer-state bytes of
rank 0 against the one-process bytes / ``nproc``, and the largest parameter difference after
``--steps`` steps (resampling every ``--kappa``).

Run: ``python benchmarks/flora_fsdp.py [--hidden 256 --layers 4 --batch 32 --steps 20 --nproc 2 --out bench-out]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flora_graph.flora import Flora
from flora_graph.flora.sharding import local
from flora_graph.ir.serialize import atomic_write_bytes


def make_model(hidden: int, layers: int) -> nn.Module:
    """``layers`` seeded MLP blocks of width ``hidden``."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
                           for _ in range(layers)))


def batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches, a pure function of the options."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(args.batch, args.hidden, generator=gen), torch.randn(args.batch, args.hidden, generator=gen))
            for _ in range(args.steps)]


def run(model: nn.Module, data, args: argparse.Namespace) -> dict[str, Any]:
    """Train with Flora; median step and ``opt.step()`` times (the first step, which allocates state, excluded)."""
    opt = Flora(model.named_parameters(), lr=1e-3, rank=args.rank, kappa=args.kappa)
    steps, opt_steps = [], []
    for x, y in data:
        t0 = time.perf_counter()
        (model(x) - y).square().mean().backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        steps.append(t2 - t0)
        opt_steps.append(t2 - t1)
    state = sum(local(t).numel() * local(t).element_size() for st in opt.state.values() for t in st.values()
                if t.is_floating_point())
    return {"step_s": statistics.median(steps[1:]), "opt_step_s": statistics.median(opt_steps[1:]),
            "state_bytes": state}


def worker(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    """One FSDP2 rank: its rows of every batch; rank 0 saves its timings and the gathered parameters."""
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        model = make_model(args.hidden, args.layers)
        for block in model:
            fully_shard(block)
        fully_shard(model)
        data = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches(args)]
        result = run(model, data, args)
        params = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save({**result, "params": params}, Path(out) / "rank0.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--kappa", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model(args.hidden, args.layers)
    single = run(model, batches(args), args)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.nproc, args, tmp), nprocs=args.nproc, start_method="spawn")
        sharded = torch.load(Path(tmp) / "rank0.pt", weights_only=True)
    ref = model.state_dict()
    params = sharded.pop("params")
    diff = max(float((params[k] - v).abs().max()) for k, v in ref.items())
    record = {"config": vars(args), "one_process": single, "fsdp_rank0": sharded, "max_abs_param_diff": diff,
              "state_bytes_vs_formula_over_world": sharded["state_bytes"] / (single["state_bytes"] / args.nproc),
              "step_time_ratio": sharded["step_s"] / single["step_s"],
              "opt_step_time_ratio": sharded["opt_step_s"] / single["opt_step_s"], "cpus": os.cpu_count(),
              "torch": torch.__version__}
    print(f"{args.layers} MLP blocks h={args.hidden}, batch {args.batch}, {args.steps} steps, rank {args.rank}, "
          f"kappa {args.kappa}, {args.threads} thread(s) per process")
    for name, r in (("one process", single), (f"FSDP2 x{args.nproc} rank 0", sharded)):
        print(f"  {name:<18} step {r['step_s'] * 1e3:8.2f} ms   opt.step {r['opt_step_s'] * 1e3:8.2f} ms   "
              f"state {r['state_bytes']:,} B")
    print(f"  step time ratio {record['step_time_ratio']:.2f}, opt.step ratio {record['opt_step_time_ratio']:.2f}, "
          f"state bytes / (one process / {args.nproc}) = {record['state_bytes_vs_formula_over_world']:.4f}, "
          f"max |param diff| {diff:.2e}")
    atomic_write_bytes(Path(args.out) / "flora_fsdp.json", json.dumps(record, indent=1).encode())
    print(f"wrote {Path(args.out) / 'flora_fsdp.json'}")


if __name__ == "__main__":
    main()
