"""Workers of the FSDP2 tests (their own module so ``torch.multiprocessing`` can import them).

:func:`worker` runs on 2 gloo ranks: every scenario trains a ``fully_shard``-ed model on the
rank's half of each global batch and saves the gathered parameters; it also checks a
``torch.distributed.checkpoint`` resume bit for bit, measures the optimizer-state bytes per rank,
and records the errors of bad inputs, among them the 2-rank checkpoint loaded by each rank on a
1-rank mesh of its own (another world size). The one-process reference runs the same functions
on a plain model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flora_graph.flora import Flora, FloraAccumulator, OptimizerError
from flora_graph.flora.sharding import local
from tests.training._ranks import rank_group

MICRO = 2  # micro-batches per rank per step in the accumulation scenario
SPLIT = 2  # the resume scenario saves after this many steps


def make_model(kind: str = "uneven") -> nn.Module:
    """``uneven``: wide, tall, uneven and empty shards over 2 ranks; ``even``: every state splits in halves."""
    torch.manual_seed(0)
    if kind == "even":
        return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 15), nn.Tanh(), nn.Linear(15, 6), nn.Tanh(),
                         nn.Linear(6, 1))


def global_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One global batch of 16 samples per step."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 12, generator=gen)
        out.append((x, x[:, :1].sin() + 0.1 * x[:, 1:2]))
    return out


def make_flora(model: nn.Module, scenario: str) -> Flora:
    """The optimizer of ``scenario``: rank 4, resampling every 2 steps (so 4 steps cross two resamples).

    ``lift`` / ``paper``: that update rule instead of the default ``scaled``; ``options``: Adam's full
    second moment, relative steps and weight decay instead of the defaults.
    """
    if scenario == "options":
        return Flora(model.named_parameters(), rank=4, kappa=2, second_moment="adam", relative_step=True,
                     weight_decay=0.1)
    update = scenario if scenario in ("lift", "paper") else "scaled"  # "flora": the default rule
    return Flora(model.named_parameters(), lr=1e-2, rank=4, kappa=2, update=update)


def train(model: nn.Module, opt: Flora, batches, acc: FloraAccumulator | None = None, micro: int = 1) -> None:
    """Plain steps, or ``micro`` micro-batches per step summed by ``acc``."""
    for x, y in batches:
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            ((model(xs) - ys).square().mean() / micro).backward()
            if acc is not None:
                acc.accumulate()
        if acc is not None:
            acc.finalize()
        opt.step()
        opt.zero_grad(set_to_none=True)


def run_scenario(model: nn.Module, scenario: str, batches, micro_per_rank: int) -> Flora:
    """``flora`` / ``paper``: Flora steps; ``accumulate``: FloraAccumulator micro-batches, then Flora."""
    opt = make_flora(model, scenario)
    if scenario == "accumulate":
        train(model, opt, batches, FloraAccumulator(model.named_parameters(), rank=4, seed=1), micro_per_rank)
    else:
        train(model, opt, batches)
    return opt


def state_bytes(opt: Flora) -> int:
    """Bytes of this rank's floating optimizer state (the local shards of DTensors)."""
    return sum(local(t).numel() * local(t).element_size() for st in opt.state.values() for t in st.values()
               if t.is_floating_point())


def _sharded(kind: str = "uneven") -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(kind)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}


def _error(fn) -> str:
    try:
        fn()
    except OptimizerError as exc:
        return f"OptimizerError: {exc}"
    except Exception as exc:  # recorded, so the test shows which other error came
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _resume(steps: int, out_dir: str, shard) -> tuple[bool, dict[str, Any]]:
    """Train ``steps`` uninterrupted vs ``SPLIT`` + DCP save/load into fresh objects + the rest: equal bits?"""
    import torch.distributed.checkpoint as dcp

    model = _sharded()
    opt = make_flora(model, "flora")
    train(model, opt, shard[:SPLIT])
    path = str(Path(out_dir) / "dcp")
    dcp.save({"model": model.state_dict(), "optim": opt.sharded_state_dict()}, checkpoint_id=path)
    train(model, opt, shard[SPLIT:steps])
    model2 = _sharded()
    opt2 = make_flora(model2, "flora")
    sd = {"model": model2.state_dict(), "optim": opt2.sharded_state_dict(template=True)}
    dcp.load(sd, checkpoint_id=path)
    opt2.load_sharded_state_dict(sd["optim"])
    train(model2, opt2, shard[SPLIT:steps])
    same = all(torch.equal(local(a), local(b)) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    for p, q in zip(opt.state.values(), opt2.state.values(), strict=True):
        same = same and all(torch.equal(local(p[k]), local(q[k])) for k in p)
    return same, opt.state_dict()


def _bad_inputs() -> dict[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    model = _sharded()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    extra = nn.Parameter(torch.zeros(3))
    cols = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(1)]))
    repl = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Replicate()]))
    plain_model = make_model()
    plain_opt = make_flora(plain_model, "flora")
    train(plain_model, plain_opt, global_batches(1))
    sharded_opt = make_flora(model, "flora")
    train(model, sharded_opt, [(x.chunk(2)[dist.get_rank()], y.chunk(2)[dist.get_rank()])
                               for x, y in global_batches(1)])
    before = {k: local(v).clone() for st in sharded_opt.state.values() for k, v in st.items()}
    out = {
        "mixed": _error(lambda: Flora([*model.named_parameters(), ("extra", extra)], lr=1e-2)),
        "shard1": _error(lambda: Flora([("cols", cols)], lr=1e-2)),
        "replicate": _error(lambda: Flora([("repl", repl)], lr=1e-2)),
        "accumulator_mixed": _error(lambda: FloraAccumulator([*model.named_parameters(), ("extra", extra)])),
        "plain_into_sharded": _error(lambda: sharded_opt.load_state_dict(plain_opt.state_dict())),
        "sharded_into_plain": _error(lambda: plain_opt.load_state_dict(sharded_opt.state_dict())),
        "bad_update": _error(lambda: Flora(model.named_parameters(), lr=1e-2, update="unbiased")),
    }
    after = {k: local(v) for st in sharded_opt.state.values() for k, v in st.items()}
    out["untouched"] = str(all(torch.equal(before[k], after[k]) for k in before))
    return out


def worker(rank: int, world: int, meet: str, out_dir: str, steps: int, scenarios: tuple[str, ...]) -> None:
    """One FSDP2 rank: the scenarios on its half of every batch; saves gathered parameters and findings."""
    with rank_group(rank, world, meet):
        shard = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in global_batches(steps)]
        results: dict[str, Any] = {}
        for name in scenarios:
            model = _sharded()
            run_scenario(model, name, shard, MICRO)
            results[name] = _full(model)
        model = _sharded("even")
        opt = make_flora(model, "flora")
        train(model, opt, shard[:1])
        results["state_bytes"] = state_bytes(opt)
        results["resume_bit_exact"], saved = _resume(steps, out_dir, shard)
        results["errors"] = _bad_inputs()
        results["other_world"] = _other_world(out_dir, saved)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _other_world(out_dir: str, saved: dict[str, Any]) -> dict[str, str]:
    """On a 1-rank mesh of its own, each rank loads the 2-rank DCP checkpoint and a 2-rank state dict: refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: every rank makes each
    mine = groups[dist.get_rank()]
    mesh = DeviceMesh.from_group(mine, "cpu")
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_flora(model, "flora")
    train(model, opt, global_batches(1))
    before = {k: local(v).clone() for st in opt.state.values() for k, v in st.items()}
    sd = {"optim": opt.sharded_state_dict(template=True)}

    def load_dcp() -> None:
        dcp.load(sd, checkpoint_id=str(Path(out_dir) / "dcp"), process_group=mine)
        opt.load_sharded_state_dict(sd["optim"])

    out = {"dcp_world": _error(load_dcp), "state_dict_world": _error(lambda: opt.load_state_dict(saved))}
    after = {k: local(v) for st in opt.state.values() for k, v in st.items()}
    out["untouched"] = str(all(torch.equal(before[k], after[k]) for k in before))
    return out
