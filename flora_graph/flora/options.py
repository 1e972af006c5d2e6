"""Validation of ``Flora`` hyperparameters and naming of the parameters it optimizes.

Parameters are known by NAME: seeds are hashed from the name, and a state dict is matched
back to parameters by name. ``model.named_parameters()`` (or param groups whose ``"params"``
are ``(name, tensor)`` pairs) gives the names; a group of bare tensors gets the documented
order-based names ``"param_groups.<g>.<i>"`` (``g``: the group's index when it was added,
``i``: the tensor's index in it), so a group added later never renames an earlier one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from flora_graph.flora.errors import OptimizerError

__all__ = ["NAN_POLICIES", "SECOND_MOMENTS", "UPDATES", "check_group", "fallback_name", "non_finite", "split_named"]

SECOND_MOMENTS = ("factored", "adam")
NAN_POLICIES = ("raise", "skip")
UPDATES = ("scaled", "lift", "paper")  # the compressed-momentum update rules (see flora_graph.flora.momentum)


def fallback_name(group_index: int, index: int) -> str:
    """The name given to an unnamed parameter: ``"param_groups.<group_index>.<index>"``."""
    return f"param_groups.{group_index}.{index}"


def split_named(params: Any, group_index: int, where: str) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of one group's ``params``: ``(name, tensor)`` pairs or bare tensors."""
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise OptimizerError(f"{where}: parameters in a set have no stable order; pass a list or named_parameters()")
    items = list(params) if isinstance(params, Iterable) else [params]
    pairs = [isinstance(x, tuple) for x in items]
    if any(pairs) and not all(pairs):
        raise OptimizerError(f"{where}: a group mixes (name, tensor) pairs and bare tensors")
    if all(pairs) and items:
        names = [x[0] for x in items]
        tensors = [x[1] for x in items]
    else:
        names = [fallback_name(group_index, i) for i in range(len(items))]
        tensors = items
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(name, str):
            raise OptimizerError(f"{where}: parameter name must be a str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise OptimizerError(f"{where}: parameter {name!r} is a {type(t).__name__}, not a tensor")
    return names, tensors


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_group(group: Mapping[str, Any], where: str) -> None:
    """Raise :class:`OptimizerError` naming the option when a hyperparameter is out of range."""
    lr, rel = group["lr"], group["relative_step"]
    if not isinstance(rel, bool):
        raise OptimizerError(f"{where}: relative_step must be a bool, got {rel!r}")
    if lr is None:
        if not rel:
            raise OptimizerError(f"{where}: lr is required unless relative_step=True")
    elif not _real(lr) or lr < 0:
        raise OptimizerError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    elif rel:
        raise OptimizerError(f"{where}: lr={lr!r} conflicts with relative_step=True (the step size is computed)")
    if not _int(group["rank"]) or group["rank"] <= 0:
        raise OptimizerError(f"{where}: rank must be an int >= 1, got {group['rank']!r}")
    if not _int(group["kappa"]) or group["kappa"] < 1:
        raise OptimizerError(f"{where}: kappa (steps between resamples) must be an int >= 1, got {group['kappa']!r}")
    b1 = group["beta1"]
    if not _real(b1) or not 0.0 <= b1 < 1.0:
        raise OptimizerError(f"{where}: beta1 must be in [0, 1) (0 disables momentum), got {b1!r}")
    b2 = group["beta2"]
    if b2 is not None and (not _real(b2) or not 0.0 <= b2 < 1.0):
        raise OptimizerError(f"{where}: beta2 must be None (Adafactor schedule) or in [0, 1), got {b2!r}")
    dr = group["decay_rate"]
    if not _real(dr) or not -1.0 <= dr < 0.0:
        raise OptimizerError(f"{where}: decay_rate must be in [-1, 0), got {dr!r}")
    eps = group["eps"]
    if not (isinstance(eps, tuple | list) and len(eps) == 2 and all(_real(e) and e >= 0 for e in eps)):
        raise OptimizerError(f"{where}: eps must be a pair of finite numbers >= 0, got {eps!r}")
    ct = group["clip_threshold"]
    if ct is not None and (not _real(ct) or ct <= 0):
        raise OptimizerError(f"{where}: clip_threshold must be None or a number > 0, got {ct!r}")
    wd = group["weight_decay"]
    if not _real(wd) or wd < 0:
        raise OptimizerError(f"{where}: weight_decay must be a finite number >= 0, got {wd!r}")
    if group["second_moment"] not in SECOND_MOMENTS:
        raise OptimizerError(f"{where}: second_moment must be one of {SECOND_MOMENTS}, got {group['second_moment']!r}")
    if group.get("update", UPDATES[0]) not in UPDATES:
        raise OptimizerError(f"{where}: update must be one of {UPDATES}, got {group['update']!r}")
    if not _int(group["seed"]):
        raise OptimizerError(f"{where}: seed must be an int, got {group['seed']!r}")


def non_finite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names whose tensor holds NaN/inf; one host sync per device when all are finite.

    Callers pass cheap probes (a gradient's sum or row means) rather than whole tensors; the
    probes of a device are checked as one concatenated tensor.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in named:
        by_device.setdefault(t.device, []).append(t.reshape(-1))
    if all(bool(torch.isfinite(torch.cat(flat)).all()) for flat in by_device.values()):
        return []
    return [name for name, t in named if not bool(torch.isfinite(t).all())]
