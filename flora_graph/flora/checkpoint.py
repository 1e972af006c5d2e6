"""Saving and loading ``Flora`` state by parameter name, validated before anything is changed.

torch's ``Optimizer.load_state_dict`` pairs saved state with parameters by position, so a
reordered model or a group added later silently receives another parameter's momentum. Here
each saved entry is matched by the name in its group's ``param_names``; every name must be
found on both sides, and every state tensor must have the shape the parameter needs. Only
then are the groups' options and the state replaced (floating state moved to the
parameter's device, counters kept as CPU int64 tensors).

Under FSDP2 the floating state is sharded (DTensors, see :mod:`.sharding`). ``opt.state_dict()``
then holds this rank's shards (``torch.save`` per rank), and :func:`sharded_state_dict` gives the
name-keyed form that ``torch.distributed.checkpoint`` (DCP) saves shard by shard::

    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model.state_dict(), "optim": opt.sharded_state_dict()}, checkpoint_id=path)
    ...
    sd = {"model": model.state_dict(), "optim": opt.sharded_state_dict(template=True)}
    dcp.load(sd, checkpoint_id=path)                  # the model in place; the optimizer into fresh tensors
    opt.load_sharded_state_dict(sd["optim"])          # validated by name, then installed: bit-exact resume

A sharded state loads only into the world size and mesh it was saved on: another world size, a
sharded state for a plain parameter or the reverse raise :class:`OptimizerError` naming the
parameter (DCP could reshard the tensors, but the resumed run would no longer be bit-exact, so
it is refused rather than silently approximated).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from flora_graph.flora.errors import OptimizerError
from flora_graph.flora.moments import COUNTERS, init_state, shard_dim, state_shapes
from flora_graph.flora.options import check_group
from flora_graph.flora.projection import layout_for
from flora_graph.flora.sharding import ShardSpec, is_dtensor, local

if TYPE_CHECKING:
    from flora_graph.flora.optimizer import Flora

__all__ = ["load_flora_state", "load_sharded_state", "sharded_state"]

_WHERE = "Flora.load_state_dict"


def _few(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def _index_saved(groups: list[Mapping[str, Any]]) -> dict[str, tuple[int, Any]]:
    where: dict[str, tuple[int, Any]] = {}
    for gi, g in enumerate(groups):
        names = g.get("param_names") if isinstance(g, Mapping) else None
        if names is None:
            raise OptimizerError(
                f"{_WHERE}: saved param group {gi} has no 'param_names' "
                "(not saved by Flora or by an optimizer built from named parameters)"
            )
        if len(names) != len(g["params"]):
            raise OptimizerError(f"{_WHERE}: saved param group {gi} has {len(names)} names for {len(g['params'])} ids")
        for name, pid in zip(names, g["params"], strict=True):
            where[name] = (gi, pid)
    return where


def _floating(name: str, key: str, t: torch.Tensor, shape: tuple[int, ...], spec: ShardSpec | None,
              device: torch.device) -> torch.Tensor:
    """A float32 copy of saved state ``key`` on ``device``, re-wrapped on this mesh when sharded."""
    if spec is None:
        if is_dtensor(t):
            raise OptimizerError(f"{_WHERE}: parameter {name!r}: state {key!r} was saved sharded over "
                                 f"{t.device_mesh.size()} ranks, but the parameter is a plain (unsharded) tensor")
        return t.detach().to(device=device, dtype=torch.float32, copy=True)
    dim = shard_dim(key)
    why = spec.placement_of(t, dim, shape)
    if why is None and tuple(local(t).shape) != spec.local_shape(shape, dim):
        why = f"a shard of shape {tuple(local(t).shape)}, rank {spec.rank} holds {spec.local_shape(shape, dim)}"
    if why is not None:
        raise OptimizerError(f"{_WHERE}: parameter {name!r} is sharded over {spec.world} ranks but its state "
                             f"{key!r} is {why}; resume on the world size and mesh it was saved on")
    part = local(t).detach().to(device=device, dtype=torch.float32, copy=True)
    return spec.dtensor(part, shape, dim)


def _check_state(name: str, p: torch.Tensor, saved: Any, options: dict[str, Any],
                 spec: ShardSpec | None = None) -> dict[str, Any]:
    """The loaded state of parameter ``name``, or an :class:`OptimizerError` naming it."""
    if not isinstance(saved, Mapping):
        raise OptimizerError(f"{_WHERE}: parameter {name!r}: saved state is a {type(saved).__name__}, not a dict")
    want = state_shapes(layout_for(p.shape, options["rank"]), options)
    counters = {"step"} | ({"seed", "resamples"} if "exp_avg_c" in want else set())
    if set(saved) != set(want) | counters:
        raise OptimizerError(
            f"{_WHERE}: parameter {name!r} of shape {tuple(p.shape)}: saved state has keys {sorted(saved)}, "
            f"expected {sorted(set(want) | counters)} (state dict of another model or other options?)"
        )
    out: dict[str, torch.Tensor] = {}
    for key in COUNTERS:
        if key in saved:
            value = saved[key]
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise OptimizerError(f"{_WHERE}: parameter {name!r}: counter {key!r} must be a scalar")
            out[key] = torch.as_tensor(value).detach().to("cpu", torch.int64).clone().reshape(())
    for key, shape in want.items():
        t = saved[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise OptimizerError(
                f"{_WHERE}: parameter {name!r} of shape {tuple(p.shape)}: state {key!r} is {got}, expected {shape} "
                "(state dict of another model?)"
            )
        out[key] = _floating(name, key, t, shape, spec, p.device)
    return out


def load_flora_state(opt: Flora, state_dict: Mapping[str, Any]) -> None:
    """Replace ``opt``'s options and state with ``state_dict``'s, matched by parameter name.

    Raises:
        OptimizerError: not a state dict, a name on one side only, a parameter whose group
            differs, or a state tensor whose shape does not fit its parameter.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise OptimizerError(f"{_WHERE}: not an optimizer state dict (needs 'state' and 'param_groups')")
    saved_groups = list(state_dict["param_groups"])
    saved_state = state_dict["state"]
    where = _index_saved(saved_groups)
    current = [n for g in opt.param_groups for n in g["param_names"]]
    missing = [n for n in current if n not in where]
    if missing:
        raise OptimizerError(f"{_WHERE}: parameter {missing[0]!r} is not in the state dict (missing: {_few(missing)})")
    extra = [n for n in where if n not in set(current)]
    if extra:
        raise OptimizerError(f"{_WHERE}: the state dict has parameter {extra[0]!r}, unknown here ({_few(extra)})")
    new_options: list[dict[str, Any]] = []
    new_state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for ci, group in enumerate(opt.param_groups):
        names = group["param_names"]
        gi = where[names[0]][0]
        for name in names:
            if where[name][0] != gi or set(saved_groups[gi]["param_names"]) != set(names):
                raise OptimizerError(
                    f"{_WHERE}: parameter {name!r} is in param group {ci} here but its saved group holds "
                    "other parameters; build the groups as when saving"
                )
        options = {k: v for k, v in saved_groups[gi].items() if k not in ("params", "param_names")}
        if isinstance(options.get("eps"), list):
            options["eps"] = tuple(options["eps"])
        merged = {**group, **options}
        check_group(merged, f"{_WHERE} (group {ci})")
        new_options.append(options)
        for name, p in zip(names, group["params"], strict=True):
            pid = where[name][1]
            if pid in saved_state:
                new_state[p] = _check_state(name, p, saved_state[pid], merged, opt._specs.get(name))
    for group, options in zip(opt.param_groups, new_options, strict=True):
        group.update(options)
    opt.state = defaultdict(dict, new_state)
    extra_info = state_dict.get("flora", {})
    opt.skipped_steps = int(extra_info.get("skipped_steps", 0)) if isinstance(extra_info, Mapping) else 0


def _world(opt: Flora) -> tuple[int, str | None]:
    """``(world size, first sharded parameter)`` of ``opt`` (``(1, None)`` when nothing is sharded)."""
    for name, spec in opt._specs.items():
        if spec is not None:
            return spec.world, name
    return 1, None


def sharded_state(opt: Flora, template: bool = False) -> dict[str, Any]:
    """Name-keyed state for ``torch.distributed.checkpoint``: ``{"state": {name: {...}}, "param_groups", "flora"}``.

    Every parameter gets an entry (a parameter never stepped: fresh state with ``step`` 0), so
    a save and a load template have the same keys. ``template=False`` returns the live tensors
    (to save); ``template=True`` fresh ones (to load into: a failed load changes nothing).
    """
    state: dict[str, dict[str, Any]] = {}
    for group in opt.param_groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            live = opt.state.get(p)
            state[name] = dict(live) if live and not template else init_state(p, name, group, opt._specs.get(name))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    world, _ = _world(opt)
    return {"state": state, "param_groups": groups,
            "flora": {"format": 1, "skipped_steps": int(opt.skipped_steps), "world_size": world}}


def load_sharded_state(opt: Flora, state_dict: Mapping[str, Any]) -> None:
    """Install :func:`sharded_state`'s output (as ``dcp.load`` filled it), validated by name like :func:`load_flora_state`.

    Raises:
        OptimizerError: saved on another world size, or any check of :func:`load_flora_state`.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups", "flora"} <= set(state_dict):
        raise OptimizerError(f"{_WHERE}: not a Flora sharded state dict (needs 'state', 'param_groups', 'flora')")
    world, first = _world(opt)
    saved_world = int(state_dict["flora"].get("world_size", 1))
    if saved_world != world:
        who = f"parameter {first!r}" if first is not None else "every parameter"
        raise OptimizerError(f"{_WHERE}: the state was saved sharded over {saved_world} rank(s) but {who} is "
                             f"sharded over {world} here; resume on the world size and mesh it was saved on")
    groups, flat = [], {}
    for g in state_dict["param_groups"]:
        names = list(g["param_names"])
        ids = list(range(len(flat), len(flat) + len(names)))
        flat.update(zip(ids, names, strict=True))
        groups.append({**g, "param_names": names, "params": ids})
    saved = state_dict["state"]
    state = {i: saved[n] for i, n in flat.items() if n in saved and int(saved[n].get("step", 0)) > 0}
    load_flora_state(opt, {"state": state, "param_groups": groups, "flora": state_dict["flora"]})
