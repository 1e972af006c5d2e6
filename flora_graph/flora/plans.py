"""What ``Flora.step`` keeps between steps besides the state: per-parameter plans, and a step's work buffer.

A :class:`Plan` holds what follows from a parameter's shape and its group's ``rank``, ``beta1 > 0``
and ``second_moment``: its layout, the 2-D view of this rank's part, and the state shapes it
needs. ``Flora`` keeps one per parameter name, rebuilds it when any of these change, and
remembers the state dict it last checked against it, so state shapes are validated when a
parameter is first stepped, after ``load_state_dict`` and after an option change, not on every
step. Nothing here is saved: plans are rebuilt from the parameters and the groups.

A :class:`Scratch` is one float32 buffer per device, as large as the largest 2-D work of a
step; each parameter in turn forms ``g^2`` and then its update in it, so a step allocates no
``n x m`` temporary per parameter (on the CPU, fresh allocations of that size cost page
faults). It lives for one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from flora_graph.flora.errors import OptimizerError
from flora_graph.flora.moments import COUNTERS, state_shapes
from flora_graph.flora.projection import Layout, layout_for
from flora_graph.flora.sharding import ShardSpec

__all__ = ["Plan", "Scratch", "Work", "plan_key"]


def plan_key(shape: torch.Size, group: dict[str, Any]) -> tuple[Any, ...]:
    """What a :class:`Plan` depends on: the parameter's shape and the group options that shape its state."""
    return (shape, group["rank"], group["beta1"] > 0, group["second_moment"])


@dataclass
class Plan:
    """One parameter's static facts under its group's options (see the module doc)."""

    key: tuple[Any, ...]
    layout: Layout
    matrix: tuple[int, int] | None  # the 2-D view of this rank's part (its rows when sharded)
    factored: bool  # second moment kept as row/column statistics
    shapes: dict[str, tuple[int, ...]]  # floating state keys and global shapes
    checked: dict[str, Any] | None = None  # the state dict last validated against ``shapes``

    @classmethod
    def build(cls, key: tuple[Any, ...], group: dict[str, Any], spec: ShardSpec | None) -> Plan:
        """The plan of a parameter of shape ``key[0]`` in ``group`` (``spec``: its shard, if any)."""
        layout = layout_for(key[0], group["rank"])
        matrix = layout.matrix
        if matrix is not None and spec is not None:
            matrix = (spec.stop - spec.start, matrix[1])
        factored = layout.matrix is not None and group["second_moment"] == "factored"
        return cls(key, layout, matrix, factored, state_shapes(layout, group))

    def check(self, name: str, state: dict[str, Any] | None) -> None:
        """Raise :class:`OptimizerError` when a non-empty ``state`` does not have this plan's shapes."""
        if not state or state is self.checked:
            return
        have = {k: tuple(v.shape) for k, v in state.items() if k not in COUNTERS}
        if have != self.shapes:
            raise OptimizerError(
                f"Flora: parameter {name!r}: its state {have} no longer fits the group's options "
                f"(expected {self.shapes}); rank, beta1 and second_moment cannot change mid-training"
            )
        self.checked = state


@dataclass(slots=True)
class Work:
    """One parameter's part of a step: who it is, its plan, and what the step has computed for it so far."""

    group: dict[str, Any]
    name: str
    p: torch.Tensor
    plan: Plan
    spec: ShardSpec | None
    means: tuple[torch.Tensor, torch.Tensor] | None = None  # factored: row/column sums of g^2 (sharded: means)
    state: dict[str, Any] | None = None
    t: int = 0  # the step count this step gives the parameter
    pre: Any = None  # its Preconditioner, when computed for many parameters at once

    @property
    def vector(self) -> bool:
        """Whether the whole step runs in :func:`.foreach.vector_step` (unsharded, below 2-D)."""
        return self.plan.matrix is None and self.spec is None


class Scratch:
    """One float32 buffer per device, viewed as each parameter's work tensor in turn (see the module doc)."""

    def __init__(self, sizes: dict[torch.device, int]) -> None:
        self._buffers = {d: torch.empty(n, dtype=torch.float32, device=d) for d, n in sizes.items()}
        self._views: dict[tuple[Any, ...], torch.Tensor] = {}

    def view(self, shape: tuple[int, ...] | torch.Size, device: torch.device) -> torch.Tensor:
        """A float32 tensor of ``shape`` on ``device`` over the buffer (its values are left over)."""
        key = (tuple(shape), device)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._buffers[device][: math.prod(shape)].view(shape)
        return view
