"""Seeded random projections: stable seeds, which tensors compress, compress/decompress/transfer.

A gradient or momentum ``G`` of a 2-D weight ``n x m`` (a convolution's weight is viewed as
``out x (in * kh * kw)``) is compressed on its smaller side ``k = min(n, m)`` by a projection
``P`` of shape ``r x k`` with entries ``N(0, 1/r)``, so ``E[P^T P] = I`` and decompression is
unbiased. The compressed tensor is always ``r x max(n, m)``:

- ``n <= m``: ``C = P @ G`` and ``G ~ P^T @ C``;
- ``n > m``:  ``C = P @ G^T`` and ``G ~ C^T @ P``.

In both cases moving ``C`` from projection ``P_old`` to ``P_new`` (decompress with the old,
compress with the new) is ``(P_new @ P_old^T) @ C``.

Unbiased is not precise: ``P^T P`` is ``k/r`` times an orthogonal projection onto a random
``r``-dimensional subspace (up to ``O(sqrt(r/k))`` fluctuations), so ``decompress(compress(G))``
is ``G``'s component in that subspace amplified ``k/r`` times, norm about ``sqrt(k/r) ||G||``.
:func:`lift` is the other decompression, the least-squares one: ``P^T (P P^T)^{-1} C``, the
minimum-norm matrix whose compression is ``C`` (for ``C = compress(G)``: the exact orthogonal
projection of ``G`` onto the subspace, never longer than ``G``). ``Flora`` decompresses its
momentum with it (see :mod:`.optimizer`).

``P`` is drawn from a CPU ``torch.Generator`` seeded with a 63-bit seed and then moved to the
tensor's device, so one seed gives the same matrix on every device. Seeds come from
:func:`stable_seed` (``hashlib.blake2b``), never from Python's salted ``hash``. A
:class:`ProjectionCache` keeps each parameter's current ``P`` and its dual (:class:`Basis`)
between optimizer steps, so a projection is drawn once per seed, not once per step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_ASPECT_RATIO",
    "Basis",
    "Layout",
    "ProjectionCache",
    "add_decompressed_",
    "compress",
    "compress_scaled",
    "decompress",
    "decompressed_sq_norm",
    "gaussian_projection",
    "layout_for",
    "lift",
    "lift_coefficients",
    "param_seed",
    "stable_seed",
    "transfer",
]

MAX_ASPECT_RATIO = 4.0  # matrices more elongated than this (embeddings, heads) keep full state


def stable_seed(*parts: object) -> int:
    """A 63-bit seed hashed from ``parts`` (their ``str``), the same in every process and run."""
    text = "\x1f".join(str(p) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def param_seed(base_seed: int, name: str, epoch: int) -> int:
    """Seed of parameter ``name``'s projection after ``epoch`` resamples (depends on the name, not the order)."""
    return stable_seed("flora.optimizer", base_seed, name, epoch)


def gaussian_projection(
    seed: int,
    rank: int,
    dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``rank x dim`` projection with entries ``N(0, 1/rank)`` for ``seed`` (CPU generator, then ``device``).

    The values are ``torch.randn(rank, dim, generator=cpu_generator(seed)) / sqrt(rank)``
    whatever ``device`` is. For a CUDA device they are drawn into pinned memory and copied
    without blocking the host, so regenerating a projection each step does not synchronise.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    pin = target.type == "cuda" and torch.cuda.is_available()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    host = torch.empty(rank, dim, dtype=torch.float32, pin_memory=pin)
    host.normal_(generator=gen).div_(math.sqrt(rank))
    return host.to(device=target, dtype=dtype, non_blocking=pin)


@dataclass(frozen=True)
class Layout:
    """How a parameter of ``shape`` is treated.

    ``matrix`` is its 2-D view ``(shape[0], prod(shape[1:]))`` (``None`` below 2-D) and
    ``compressed`` whether its momentum/gradient lives in ``r x max(n, m)``.
    """

    shape: tuple[int, ...]
    matrix: tuple[int, int] | None
    compressed: bool

    @property
    def small(self) -> int:
        """The projected side ``min(n, m)``."""
        assert self.matrix is not None
        return min(self.matrix)

    @property
    def large(self) -> int:
        """The kept side ``max(n, m)``."""
        assert self.matrix is not None
        return max(self.matrix)


def layout_for(shape: torch.Size | tuple[int, ...], rank: int) -> Layout:
    """Compress iff the tensor is >= 2-D, ``min(n, m) >= rank`` and ``max/min <= MAX_ASPECT_RATIO``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return Layout(shape, None, False)
    n, m = shape[0], math.prod(shape[1:])
    lo, hi = min(n, m), max(n, m)
    compressed = lo >= rank and lo > 0 and hi / lo <= MAX_ASPECT_RATIO
    return Layout(shape, (n, m), compressed)


def compress(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``r x max(n, m)`` compression of the 2-D ``x`` by ``proj`` (``r x min(n, m)``)."""
    n, m = x.shape
    return proj @ x if n <= m else proj @ x.T


def decompress(c: torch.Tensor, proj: torch.Tensor, matrix: tuple[int, int]) -> torch.Tensor:
    """The ``n x m`` estimate ``P^T C`` (or ``C^T P``) of the tensor :func:`compress` compressed."""
    n, m = matrix
    return proj.T @ c if n <= m else c.T @ proj


def compress_scaled(x: torch.Tensor, proj: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``compress(diag(row) @ x @ diag(col), proj)`` without forming the scaled ``n x m`` tensor."""
    n, m = x.shape
    if n <= m:
        return ((proj * row) @ x).mul_(col)
    return ((proj * col) @ x.T).mul_(row)


def decompressed_sq_norm(c: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``||decompress(c, proj)||_F^2`` from ``r x r`` Gram matrices: ``sum((P P^T) * (C C^T))``."""
    return ((proj @ proj.T) * (c @ c.T)).sum().clamp_(min=0.0)


def add_decompressed_(out: torch.Tensor, c: torch.Tensor, proj: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * decompress(c, proj)`` in place on the 2-D ``out``: one GEMM, no ``n x m`` temporary."""
    n, m = out.shape
    c, proj = c.to(out.dtype), proj.to(out.dtype)
    if n <= m:
        return out.addmm_(proj.T, c, alpha=alpha)
    return out.addmm_(c.T, proj, alpha=alpha)


def lift_coefficients(c: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``(P P^T)^{-1} C`` (``r x max(n, m)``, ``c``'s dtype), solved in float64: ``decompress`` of it is :func:`lift`.

    ``P P^T`` is ``r x r`` and about ``(k / r) I``; even at ``k = r`` (a square Gaussian, condition
    number about ``k^2``) float64 keeps the solve accurate.
    """
    where = c.device if c.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    p64 = proj.to(where, torch.float64)
    return torch.linalg.solve(p64 @ p64.T, c.to(where, torch.float64)).to(c.device, c.dtype)


class Basis:
    """What a projection's seed alone determines: ``P`` and, once asked for, its dual ``(P P^T)^{-1} P``.

    Decompressing ``C`` with the dual instead of ``P`` is :func:`lift`:
    ``P^T (P P^T)^{-1} C = dual^T C``. The dual is computed in float64 (``r x r`` Gram inverse,
    as :func:`lift_coefficients` solves) and stored as float32, like ``P``.
    """

    def __init__(self, seed: int, proj: torch.Tensor) -> None:
        self.seed = seed
        self.proj = proj
        self.proj_t = proj.t()  # views kept: they are used every step
        self.key = (seed, *proj.shape, proj.device)
        self._dual: torch.Tensor | None = None
        self.dual_t: torch.Tensor | None = None

    @property
    def dual(self) -> torch.Tensor:
        """``(P P^T)^{-1} P`` (``r x k``, ``P``'s dtype and device), computed on first use (then also ``dual_t``)."""
        if self._dual is None:
            self._dual = lift_coefficients(self.proj, self.proj)  # (P P^T)^{-1} P, solved in float64
            self.dual_t = self._dual.t()
        return self._dual


class ProjectionCache:
    """The :class:`Basis` of each key's (a parameter name's) current seed: regenerated only when the seed changes.

    Nothing here is state to save: a basis is a pure function of ``(seed, rank, dim, device)`` and
    is looked up by all four, so a resample or a loaded state dict (another seed) simply misses.
    One basis per key is kept: ``P`` and its dual, each ``r x min(n, m)``, together at most twice
    the size of the compressed momentum they serve (``r x max(n, m)``).
    """

    def __init__(self) -> None:
        self._bases: dict[str, Basis] = {}

    def get(self, key: str, seed: int, rank: int, dim: int, device: torch.device) -> Basis:
        """The basis of ``gaussian_projection(seed, rank, dim, device)`` (from the cache when it matches)."""
        basis = self._bases.get(key)
        if basis is None or basis.key != (seed, rank, dim, device):
            basis = self._bases[key] = Basis(seed, gaussian_projection(seed, rank, dim, device=device))
        return basis

    def clear(self) -> None:
        """Forget every basis (they are rebuilt on use)."""
        self._bases.clear()


def lift(c: torch.Tensor, proj: torch.Tensor, matrix: tuple[int, int]) -> torch.Tensor:
    """Least-squares decompression ``P^T (P P^T)^{-1} C``: the minimum-norm ``n x m`` ``X`` with ``compress(X) = C``.

    ``lift(compress(G, P), P, G.shape)`` is the orthogonal projection of ``G`` onto the
    ``r``-dimensional subspace ``P`` spans (a contraction), whereas :func:`decompress` gives
    ``P^T P G``, unbiased over draws of ``P`` but about ``k / r`` times longer inside the subspace.
    """
    return decompress(lift_coefficients(c, proj), proj, matrix)


def transfer(c: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``compress(decompress(c, old), new)`` computed as ``(new @ old^T) @ c`` (never forms ``n x m``)."""
    return (new @ old.T) @ c
