"""``FloraAccumulator``: gradient accumulation in the compressed space, for any optimizer and under DDP.

Per optimizer step ``s`` each compressible matrix ``n x m`` gets a projection ``P_s`` (seed
hashed from ``(seed, name, s)``). After each micro-batch's backward, :meth:`accumulate` adds
``compress(grad, P_s)`` (``r x max(n, m)``) to a buffer and drops ``.grad``; other tensors
(1-D, embeddings, matrices thinner than ``rank``) are summed in full. :meth:`finalize`
decompresses once, writes ``.grad`` and moves to ``P_{s+1}``; then any ``torch.optim``
optimizer steps as usual::

    acc = FloraAccumulator(model.named_parameters(), rank=8)
    for x, y in micro_batches:
        with acc.no_sync(ddp_model):            # no DDP all-reduce of full gradients
            (loss_fn(ddp_model(x), y) / len(micro_batches)).backward()
        acc.accumulate()
    acc.finalize()                              # all-reduce r x max(n, m), decompress into .grad
    opt.step(); opt.zero_grad()

Under ``torch.distributed`` (initialised, world size > 1) :meth:`finalize` all-reduces the
compressed buffers (one flat float32 tensor, plus a has-gradient flag per parameter) and
divides by the world size, DDP's averaging. Every rank draws the same ``P_s`` (CPU
generator, name-based seed) and decompression is linear, so every rank gets the same
``.grad``, equal to a single process accumulating the combined batch. The all-reduce is also
correct when DDP already averaged a micro-batch (averaging identical values changes
nothing): ``no_sync`` only saves the full-size traffic. Pass the un-wrapped module's
``named_parameters()`` (``ddp.module``) so names match a single-process run.

What the optimizer gets with ``projection="gaussian"``: ``.grad = P_s^T P_s G``, unbiased (``E[P^T P] = I``, so plain SGD
stays unbiased too) but only ``r`` of ``min(n, m)`` directions of the step's gradient survive,
amplified ``min(n, m) / r`` times. After a second-moment normalisation (Adam, Adafactor,
``Flora``) the signal is about ``sqrt(r / min(n, m))`` of a full sum's and the rest is noise that
changes every step, so compressed accumulation wants a larger learning rate than full buffers
and loses quality when ``r << min(n, m)`` (see ``benchmarks/flora_quality.py``). Scale aside,
the least-squares decompression (:func:`.projection.lift`) carries the same information; it
measured no better in ``benchmarks/flora_quality.py`` (r=8 of 128), but better when ``r`` is a
large fraction of ``min(n, m)`` (``projection="orthogonal"`` below). The projections are deliberately not ``Flora``'s: ``Flora`` uses the
decompressed gradient in full (it is not compressed again, so nothing compounds), and sharing its
projection would confine every update to one ``r``-dimensional subspace for ``kappa`` steps;
a fresh projection per step spreads the surviving directions over the whole matrix.

``projection="orthogonal"`` (the default) keeps the same buffers (the same Gaussian sketch ``C = P G``, so
accumulation, all-reduce and FSDP2 work as above) and only changes the decompression: the
least-squares ``P^T (P P^T)^{-1} C`` (:func:`.projection.lift`) scaled by ``k / r``, i.e.
``.grad = (k / r) Q Q^T G`` with ``Q`` an orthonormal basis of ``P``'s row space. Still
unbiased (``E[Q Q^T] = (r / k) I``), but every direction of the subspace is amplified by exactly
``k / r`` instead of by the uneven squared singular values of ``P`` (which spread over
``(1 +- sqrt(r / k))^2 k / r``, widest when ``r`` nears ``k``), and a matrix with ``r = k`` comes
out exact. Cost: one ``r x r`` solve per matrix and step, in :meth:`finalize`. It is the default
because it measured closer to full buffers on the fine-tuning benchmark at r=32 of 64 (+1.5-1.7%
against +2.9-3.1% for ``gaussian``, better on every seed) and the same at r=8.

The trade-off, measured (``orthogonal`` versus ``gaussian`` and full buffers, and the
alternatives that measured no better: a projection fixed for the run, the dominant subspace of
the step's first micro-batch), is in ``docs/FLORA_ACCUMULATION.md``.

Under FSDP2 (``fully_shard``; parameters are ``Shard(0)`` DTensors, see :mod:`.sharding`) leave
gradient sync on: FSDP2 reduce-scatters (averages) every micro-batch's gradient, and each rank
compresses its rows. When ``n > m`` its rows give its own columns of ``C = P G^T`` (local); when
``n <= m`` it adds the partial product ``P[:, rows] G_rows`` (``r x m``), and :meth:`finalize`
all-reduces (sums) these partials once, then every rank decompresses its rows into a sharded
``.grad``. The result equals one process accumulating the combined batch, as under DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from flora_graph.flora.errors import NonFiniteGradientError, OptimizerError
from flora_graph.flora.options import non_finite, split_named
from flora_graph.flora.projection import (
    Layout,
    compress,
    decompress,
    gaussian_projection,
    layout_for,
    lift_coefficients,
    stable_seed,
)
from flora_graph.flora.sharding import ShardSpec, check_uniform, is_dtensor, local, non_finite_sharded, shard_spec

__all__ = ["PROJECTIONS", "FloraAccumulator"]

PROJECTIONS = ("orthogonal", "gaussian")  # FloraAccumulator(projection=...), the default first: see the module doc


class FloraAccumulator:
    """Sums micro-batch gradients compressed to ``r x max(n, m)`` and decompresses them once per step.

    Args:
        params: ``model.named_parameters()`` or bare tensors (named ``"param_groups.0.<i>"``).
        rank: rows of the projections.
        seed: base seed hashed with each parameter's name and the step count.
        process_group: group to all-reduce over (default: the world) when distributed.
        projection: ``"orthogonal"`` (default: a fresh seeded Gaussian sketch per step,
            least-squares decompression scaled by ``k / r``: ``(k / r) Q Q^T G``) or ``"gaussian"``
            (the same sketch decompressed as ``P^T P G``); see the module doc.

    Raises:
        OptimizerError: bad rank/seed/projection, duplicate names, or non-finite gradients in :meth:`accumulate`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        rank: int = 8,
        seed: int = 0,
        *,
        process_group: Any = None,
        projection: str = "orthogonal",
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise OptimizerError(f"FloraAccumulator: rank must be an int >= 1, got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise OptimizerError(f"FloraAccumulator: seed must be an int, got {seed!r}")
        names, tensors = split_named(params, 0, "FloraAccumulator")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise OptimizerError(f"FloraAccumulator: parameter name {dup!r} appears twice")
        self.rank = rank
        self.seed = seed
        self.process_group = process_group
        self.names = names
        self._index = {n: i for i, n in enumerate(names)}
        self.params = tensors
        check_uniform(list(zip(names, tensors, strict=True)), "FloraAccumulator")
        self.specs: list[ShardSpec | None] = [
            shard_spec(n, p, "FloraAccumulator") for n, p in zip(names, tensors, strict=True)
        ]
        if projection not in PROJECTIONS:
            raise OptimizerError(f"FloraAccumulator: projection must be one of {PROJECTIONS}, got {projection!r}")
        self.projection = projection
        self.layouts: list[Layout] = [layout_for(p.shape, rank) for p in tensors]
        self.buffers: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.micro_batches = 0

    # ------------------------------------------------------------------ helpers
    def _projection(self, name: str, layout: Layout, device: torch.device) -> torch.Tensor:
        seed = stable_seed("flora.accumulate", self.seed, name, self.steps)
        return gaussian_projection(seed, self.rank, layout.small, device=device)

    def _coefficients(self, c: torch.Tensor, proj: torch.Tensor, layout: Layout) -> torch.Tensor:
        """What :meth:`finalize` decompresses: the buffer, or for ``"orthogonal"`` ``(k / r) (P P^T)^{-1} C``.

        The solve acts column by column, so a sharded buffer (its columns) gives its part of the whole.
        """
        if self.projection != "orthogonal":
            return c
        return lift_coefficients(c, proj).mul_(layout.small / self.rank)

    def compressed_shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name``'s buffer: ``(rank, max(n, m))`` when compressed, else the parameter's."""
        layout = self.layouts[self._index[name]]
        return (self.rank, layout.large) if layout.compressed else layout.shape

    def _buffer_shape(self, name: str) -> tuple[int, ...]:
        """This rank's buffer of ``name``: :meth:`compressed_shape`, or its sharded part (see the module doc)."""
        i = self._index[name]
        spec, layout = self.specs[i], self.layouts[i]
        if spec is None:
            return self.compressed_shape(name)
        rows = spec.stop - spec.start
        if not layout.compressed:
            return (rows, *layout.shape[1:])
        assert layout.matrix is not None
        return (self.rank, layout.matrix[1]) if layout.matrix[0] <= layout.matrix[1] else (self.rank, rows)

    def _sharded_compress(self, g: torch.Tensor, proj: torch.Tensor, spec: ShardSpec, layout: Layout) -> torch.Tensor:
        """This rank's rows ``g`` compressed: its columns of ``P g^T`` (``n > m``) or ``P[:, rows] g`` (a partial sum)."""
        assert layout.matrix is not None
        g = g.reshape(spec.stop - spec.start, layout.matrix[1])
        return proj[:, spec.start : spec.stop] @ g if layout.matrix[0] <= layout.matrix[1] else proj @ g.T

    def _sharded_decompress(self, c: torch.Tensor, proj: torch.Tensor, spec: ShardSpec, layout: Layout) -> torch.Tensor:
        """This rank's rows of ``decompress(C)`` from its buffer (the summed ``r x m``, or its ``r x rows``)."""
        assert layout.matrix is not None
        return proj[:, spec.start : spec.stop].T @ c if layout.matrix[0] <= layout.matrix[1] else c.T @ proj

    @staticmethod
    def no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
        """``model.no_sync()`` for a DDP-wrapped model, else a no-op context."""
        fn = getattr(model, "no_sync", None)
        return fn() if callable(fn) else contextlib.nullcontext()

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    # ------------------------------------------------------------------ accumulate / finalize
    @torch.no_grad()
    def accumulate(self) -> None:
        """Add every present ``.grad`` (compressed where possible) to the buffers and set ``.grad = None``."""
        for name, p, spec in zip(self.names, self.params, self.specs, strict=True):
            if p.grad is not None and spec is not None and (
                not is_dtensor(p.grad) or tuple(p.grad.placements) != tuple(p.placements)
            ):
                raise OptimizerError(f"FloraAccumulator: parameter {name!r} is sharded {tuple(p.placements)} but its "
                                     "gradient is not sharded alike (keep FSDP2's gradient sync on); buffers unchanged")
        probes = [(n, local(p.grad).sum(dtype=torch.float32)) for n, p in self if p.grad is not None]
        if any(s is not None for s in self.specs):  # every rank must agree before any buffer changes
            spec = next(s for s in self.specs if s is not None)
            bad = non_finite_sharded(probes, spec.group)
        else:
            bad = non_finite(probes)  # a sum is NaN/inf iff an entry is (barring a float32 overflow)
        if bad:
            raise NonFiniteGradientError(
                f"FloraAccumulator: non-finite gradient in parameter {bad[0]!r}; buffers unchanged", bad
            )
        for name, p, layout, spec in zip(self.names, self.params, self.layouts, self.specs, strict=True):
            if p.grad is None:
                continue
            g = local(p.grad).detach().to(torch.float32)
            if layout.compressed and spec is not None:
                g = self._sharded_compress(g, self._projection(name, layout, g.device), spec, layout)
            elif layout.compressed:
                g = compress(g.reshape(layout.matrix), self._projection(name, layout, g.device))
            buf = self.buffers.get(name)
            if buf is None:
                # a full gradient may share storage with .grad (a DDP bucket view): copy it
                self.buffers[name] = g if layout.compressed else g.clone()
            else:
                buf.add_(g)
            p.grad = None
        self.micro_batches += 1

    def _all_reduce(self) -> dict[str, torch.Tensor]:
        """Average the buffers over ranks; parameters without a gradient on any rank are dropped.

        Sharded (FSDP2): only the partial sums (compressed, ``n <= m``) are all-reduced, summed.
        """
        spec = next((s for s in self.specs if s is not None), None)
        if spec is not None:
            partial = [n for n, s, lay in zip(self.names, self.specs, self.layouts, strict=True)
                       if lay.compressed and lay.matrix is not None and lay.matrix[0] <= lay.matrix[1]]
            return {**self.buffers, **self._reduce(partial, spec.group, average=False)}
        world = self._world()
        if world == 1:
            return self.buffers
        return self._reduce(self.names, self.process_group, average=True)

    def _reduce(self, names: list[str], group: Any, average: bool) -> dict[str, torch.Tensor]:
        """All-reduce ``names``' buffers as one flat tensor (plus a has-gradient flag each)."""
        world = dist.get_world_size(group)
        if not names:
            return {}
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise OptimizerError(
                f"FloraAccumulator: distributed accumulation needs one device, got {sorted(map(str, devices))}"
            )
        (device,) = devices
        sizes = [torch.Size(self._buffer_shape(n)).numel() for n in names]
        total = sum(sizes)
        present = [1.0 if n in self.buffers else 0.0 for n in names]
        # one flat buffer: every compressed (or full) sum, then a has-gradient flag per parameter
        flat = torch.zeros(total + len(sizes), dtype=torch.float32, device=device)
        flat[total:].copy_(torch.tensor(present))
        off = 0
        for name, size in zip(names, sizes, strict=True):
            if name in self.buffers:
                flat[off : off + size].copy_(self.buffers[name].reshape(-1))
            off += size
        dist.all_reduce(flat, group=group)
        if average:
            flat[:total].div_(world)
        has_grad = flat[total:].cpu().tolist()  # one host sync
        out: dict[str, torch.Tensor] = {}
        off = 0
        for name, size, flag in zip(names, sizes, has_grad, strict=True):
            if flag > 0:
                out[name] = flat[off : off + size].view(self._buffer_shape(name))
            off += size
        return out

    @torch.no_grad()
    def finalize(self) -> None:
        """Write the (averaged over ranks) decompressed sum into ``.grad`` and move on to the next projections.

        A parameter that got no gradient in this step (on any rank) keeps ``.grad = None``.
        """
        if self.micro_batches == 0:
            raise OptimizerError("FloraAccumulator: finalize() before any accumulate()")
        reduced = self._all_reduce()
        for name, p, layout, spec in zip(self.names, self.params, self.layouts, self.specs, strict=True):
            buf = reduced.get(name)
            if buf is None:
                continue
            if spec is not None:
                if layout.compressed:
                    proj = self._projection(name, layout, buf.device)
                    buf = self._sharded_decompress(self._coefficients(buf, proj, layout), proj, spec, layout)
                part = buf.reshape(local(p).shape).to(p.dtype)
                p.grad = spec.dtensor(part, tuple(p.shape), 0)
                continue
            if layout.compressed:
                proj = self._projection(name, layout, buf.device)
                buf = decompress(self._coefficients(buf, proj, layout), proj, layout.matrix)
            p.grad = buf.reshape(p.shape).to(p.dtype)
        self.buffers = {}
        self.micro_batches = 0
        self.steps += 1

    def accumulation_bytes(self) -> int:
        """Bytes the buffers take once every parameter has a gradient (float32)."""
        return 4 * sum(torch.Size(self.compressed_shape(n)).numel() for n in self.names)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Seed, rank, step count, names, any pending buffers, and the projection kind."""
        state = {
            "seed": self.seed,
            "rank": self.rank,
            "steps": self.steps,
            "micro_batches": self.micro_batches,
            "names": list(self.names),
            "buffers": {k: v.detach().clone() for k, v in self.buffers.items()},
            "projection": self.projection,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; names and buffer shapes must match (else ``OptimizerError``).

        A state dict with pending buffers must be of this accumulator's projection kind (they would
        be decompressed another way); one saved between steps loads into either kind. A state dict
        without ``"projection"`` is ``"gaussian"`` (written when that was the only kind).
        """
        if sorted(state.get("names", [])) != sorted(self.names):
            unknown = sorted(set(state.get("names", [])) ^ set(self.names))
            raise OptimizerError(f"FloraAccumulator.load_state_dict: parameter names differ, e.g. {unknown[:3]}")
        if state["rank"] != self.rank:
            raise OptimizerError(f"FloraAccumulator.load_state_dict: saved rank {state['rank']} != {self.rank}")
        saved = state.get("projection", "gaussian")
        if saved != self.projection and state["buffers"]:
            raise OptimizerError(f"FloraAccumulator.load_state_dict: saved mid-step with projection {saved!r}, "
                                 f"this accumulator's is {self.projection!r} (build it with projection={saved!r} to "
                                 "resume this step)")
        buffers = {}
        for name, buf in state["buffers"].items():
            if tuple(buf.shape) != tuple(self._buffer_shape(name)):
                raise OptimizerError(
                    f"FloraAccumulator.load_state_dict: parameter {name!r}: buffer {tuple(buf.shape)}, "
                    f"expected {self._buffer_shape(name)}"
                )
            buffers[name] = buf.detach().to(self.params[self._index[name]].device, torch.float32, copy=True)
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
        self.micro_batches, self.buffers = int(state["micro_batches"]), buffers

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` pairs, in the order given."""
        return iter(zip(self.names, self.params, strict=True))
