"""FSDP2 support: parameters that are ``DTensor`` shards of dim 0 (``Shard(0)`` on a 1-D mesh).

``torch.distributed.fsdp.fully_shard`` turns each parameter into a ``DTensor`` whose rank ``k``
holds rows ``[start, stop)`` of dim 0 (``torch.chunk`` sizes: ``ceil(n / world)`` each, the last
ranks fewer, possibly none); its gradient is sharded alike, already averaged over ranks. Flora
reproduces the one-process math on these shards (see :mod:`.optimizer`): every rank draws the
whole ``r x min(n, m)`` projection from the name-keyed seed and uses the columns of its rows;
sums over the sharded rows (column statistics of ``g^2``, ``P u`` when ``n <= m``, norms) are
all-reduced, and the rest is local. State is sharded too, as DTensors on the parameter's
mesh, so ``torch.distributed.checkpoint`` saves and loads it shard by shard:

==================================  ============================  ================================
state (global shape)                placement                     local part of rank ``k``
==================================  ============================  ================================
``exp_avg_c`` ``r x m`` (n <= m)    ``Shard(1)``                  ``r x chunk_k(m)``
``exp_avg_c`` ``r x n`` (n > m)     ``Shard(1)``                  ``r x chunk_k(n)`` = its rows
``exp_avg``, ``exp_avg_sq``         ``Shard(0)`` (as the param)   its rows
``exp_avg_sq_row`` ``n``            ``Shard(0)``                  its rows
``exp_avg_sq_col`` ``m``            ``Shard(0)``                  ``chunk_k(m)``
==================================  ============================  ================================

so each rank holds ``1/world`` of the one-process state (up to ``torch.chunk`` rounding).
Counters (``step``, ``seed``, ``resamples``) stay plain CPU scalars, equal on every rank.

Communication per step (gloo/NCCL, on the mesh's group): one all-reduce for the whole step (every
column sum of ``g^2`` and a finite flag per parameter); per factored matrix an all-gather of its
column statistics (``m`` floats); per parameter an all-reduce of the direction's squared norm
(one float, for RMS clipping); per compressed matrix with ``n <= m`` an all-reduce and an
all-gather of ``r x m`` (``P u``, and what is decompressed; one more all-reduce at a
``lift`` resample); ``n > m`` needs nothing more. These are latency-bound small collectives: on a
2-core CPU with gloo (about 0.85 ms each) ``opt.step()`` took about 3x the one-process time
(``benchmarks/flora_fsdp.py``), and about 7x once the one-process step got its multi-tensor
fast path (:mod:`.foreach`), which shards do not take; batching them across parameters is left to do.

Other layouts (a 2-D mesh, ``Shard(1)``, ``Replicate``, ``Partial``, strided shards) are refused
by :func:`shard_spec` with the reason, and so is a mix of plain and sharded parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flora_graph.flora.errors import OptimizerError

__all__ = [
    "ShardSpec",
    "check_uniform",
    "chunk_range",
    "is_dtensor",
    "local",
    "non_finite_sharded",
    "reduce_probes",
    "shard_spec",
]


@functools.cache
def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it when unavailable)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (a view: in-place changes reach it), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def chunk_range(size: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s ``torch.chunk`` piece of ``size`` items over ``world`` ranks."""
    per = -(-size // world) if size else 0
    start = min(rank * per, size)
    return start, min(start + per, size)


@dataclass(frozen=True)
class ShardSpec:
    """Where one ``Shard(0)`` parameter lives: its mesh, process group and this rank's rows ``[start, stop)``."""

    mesh: Any
    group: Any
    world: int
    rank: int
    shape: tuple[int, ...]
    start: int
    stop: int

    def chunk(self, size: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of a dimension of ``size`` sharded like dim 0."""
        return chunk_range(size, self.world, self.rank)

    def local_shape(self, shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
        """This rank's part of a tensor of global ``shape`` sharded along ``dim``."""
        start, stop = self.chunk(shape[dim])
        return (*shape[:dim], stop - start, *shape[dim + 1 :])

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``t`` in place over the mesh; returns it."""
        dist.all_reduce(t, group=self.group)
        return t

    def gather_last(self, part: torch.Tensor, size: int) -> torch.Tensor:
        """The whole ``(..., size)`` tensor from every rank's ``chunk(size)`` of the last dim (all-gather)."""
        per = -(-size // self.world)
        padded = part.new_zeros((*part.shape[:-1], per))
        padded[..., : part.shape[-1]].copy_(part)
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded.contiguous(), group=self.group)
        out = torch.cat(pieces, dim=-1)
        return out[..., :size].contiguous()

    def dtensor(self, part: torch.Tensor, shape: tuple[int, ...], dim: int) -> torch.Tensor:
        """``part`` (this rank's chunk along ``dim``) as a ``DTensor`` of global ``shape``, ``Shard(dim)``."""
        from torch.distributed.tensor import DTensor, Shard

        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(part, self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    def placement_of(self, t: Any, dim: int, shape: tuple[int, ...]) -> str | None:
        """Why ``t`` is not this spec's ``Shard(dim)`` ``DTensor`` of ``shape`` (``None``: it is)."""
        if not is_dtensor(t):
            return f"a plain {type(t).__name__} (unsharded), not a DTensor sharded over {self.world} ranks"
        from torch.distributed.tensor import Shard

        if t.device_mesh.ndim != 1 or t.device_mesh.size() != self.world:
            return f"sharded over a mesh of shape {tuple(t.device_mesh.shape)}, here {self.world} ranks"
        if tuple(t.placements) != (Shard(dim),):
            return f"placed {tuple(t.placements)}, expected (Shard(dim={dim}),)"
        if tuple(t.shape) != tuple(shape):
            return f"of global shape {tuple(t.shape)}, expected {tuple(shape)}"
        return None


def _refusal(p: Any) -> str | None:
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        return (f"it lives on a {mesh.ndim}-D device mesh {tuple(mesh.shape)} with placements {placements} "
                "(HSDP / tensor parallel); Flora supports a 1-D mesh with Shard(0), FSDP2's default")
    (pl,) = placements
    if type(pl) is not Shard or pl.dim != 0:
        return (f"its placement is {pl!r}; Flora compresses and factors the 2-D view (dim 0 x the rest) and supports "
                "only Shard(0) (FSDP2's default; pass no shard_placement_fn)")
    if p.dim() == 0:
        return "it is a 0-dim DTensor"
    start, stop = chunk_range(p.shape[0], mesh.size(), mesh.get_local_rank())
    if tuple(p.to_local().shape) != (stop - start, *p.shape[1:]):
        return f"its local shard {tuple(p.to_local().shape)} is not the torch.chunk piece of rows {start}:{stop}"
    return None


def shard_spec(name: str, p: torch.Tensor, where: str) -> ShardSpec | None:
    """``None`` for a plain tensor; the :class:`ShardSpec` of a supported ``DTensor``; else ``OptimizerError``."""
    if not is_dtensor(p):
        return None
    why = _refusal(p)
    if why is not None:
        raise OptimizerError(f"{where}: parameter {name!r} cannot be optimized sharded: {why}")
    mesh = p.device_mesh
    rank = mesh.get_local_rank()
    start, stop = chunk_range(p.shape[0], mesh.size(), rank)
    return ShardSpec(mesh, mesh.get_group(), mesh.size(), rank, tuple(p.shape), start, stop)


def check_uniform(named: list[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse a mix of plain and sharded parameters, or shards on different meshes (naming a parameter)."""
    sharded = [(n, p) for n, p in named if is_dtensor(p)]
    if not sharded:
        return
    plain = [n for n, p in named if not is_dtensor(p)]
    if plain:
        raise OptimizerError(
            f"{where}: parameter {plain[0]!r} is a plain tensor while {sharded[0][0]!r} is a sharded DTensor; "
            "shard every parameter (fully_shard the root module too) or none"
        )
    for n, p in sharded:
        shard_spec(n, p, where)
        if p.device_mesh != sharded[0][1].device_mesh:
            raise OptimizerError(f"{where}: parameter {n!r} lives on another device mesh than {sharded[0][0]!r}")


def reduce_probes(sums: list[torch.Tensor], named: list[tuple[str, torch.Tensor]], group: Any) -> list[str]:
    """One all-reduce: ``sums`` summed over ranks in place; returns the names whose probe is non-finite on ANY rank."""
    if not sums and not named:
        return []
    flags = [(~torch.isfinite(t)).any().to(torch.float32).reshape(1) for _, t in named]
    flat = torch.cat([*(t.reshape(-1).to(torch.float32) for t in sums), *flags])
    dist.all_reduce(flat, group=group)
    off = 0
    for t in sums:
        t.copy_(flat[off : off + t.numel()].view_as(t))
        off += t.numel()
    return [name for (name, _), f in zip(named, flat[off:].tolist(), strict=True) if f > 0]


def non_finite_sharded(named: list[tuple[str, torch.Tensor]], group: Any) -> list[str]:
    """Names whose probe is non-finite on ANY rank (one all-reduce of a flag per parameter)."""
    return reduce_probes([], named, group)
