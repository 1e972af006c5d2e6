"""Seeded projections: stable seeds, the compression rule, unbiased compress/decompress, lift, transfer."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from flora_graph.flora import (
    compress,
    decompress,
    gaussian_projection,
    layout_for,
    lift,
    param_seed,
    stable_seed,
    transfer,
)


def test_stable_seed_is_blake2b_and_independent_of_python_hash_salt():
    want = int.from_bytes(hashlib.blake2b(b"a\x1f1\x1fw", digest_size=8).digest(), "little") & (2**63 - 1)
    assert stable_seed("a", 1, "w") == want  # a pure function of the text: no per-process hash salt


def test_param_seed_depends_on_name_base_and_epoch():
    seeds = {param_seed(b, n, e) for b in (0, 1) for n in ("a.weight", "b.weight") for e in (0, 1)}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_projection_comes_from_a_cpu_generator_not_the_global_rng():
    torch.manual_seed(0)
    a = gaussian_projection(123, 4, 10)
    torch.manual_seed(1)
    b = gaussian_projection(123, 4, 10)
    gen = torch.Generator(device="cpu").manual_seed(123)
    torch.testing.assert_close(a, torch.randn(4, 10, generator=gen) / 2.0, rtol=0, atol=0)
    assert torch.equal(a, b)
    assert gaussian_projection(123, 4, 10, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    ("shape", "rank", "compressed", "matrix"),
    [
        ((64, 32), 8, True, (64, 32)),
        ((32, 128), 8, True, (32, 128)),  # aspect ratio exactly 4
        ((32, 129), 8, False, (32, 129)),  # an embedding-like matrix
        ((1000, 16), 8, False, (1000, 16)),
        ((6, 10), 8, False, (6, 10)),  # thinner than the rank
        ((16, 4, 3, 3), 8, True, (16, 36)),  # conv weight as out x (in * kh * kw)
        ((64,), 8, False, None),
        ((), 8, False, None),
    ],
)
def test_layout_rule(shape, rank, compressed, matrix):
    lay = layout_for(shape, rank)
    assert (lay.compressed, lay.matrix) == (compressed, matrix)


def test_projection_is_unbiased_mean_of_pt_p_is_identity():
    r, k, seeds = 4, 8, 4000
    acc = torch.zeros(k, k, dtype=torch.float64)
    for s in range(seeds):
        p = gaussian_projection(s, r, k, dtype=torch.float64)
        acc += p.T @ p
    mean = acc / seeds
    # each entry of P^T P has variance <= 2/r; the mean of `seeds` draws has std <= sqrt(2 / (r * seeds))
    bound = 6 * math.sqrt(2 / (r * seeds))
    assert (mean - torch.eye(k, dtype=torch.float64)).abs().max().item() < bound


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
def test_compress_decompress_is_unbiased_on_both_sides(shape):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    r, seeds = 3, 3000
    acc = torch.zeros_like(g)
    for s in range(seeds):
        p = gaussian_projection(s, r, min(shape), dtype=torch.float64)
        c = compress(g, p)
        assert c.shape == (r, max(shape))
        acc += decompress(c, p, shape)
    err = (acc / seeds - g).abs().max().item()
    # per entry variance of one draw is <= (|g|^2 of its row/col + g_ij^2) / r
    bound = 6 * math.sqrt(2 * (g.square().sum(dim=0).max() + g.square().sum(dim=1).max()).item() / (r * seeds))
    assert err < bound


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (9, 9)])
def test_transfer_is_decompress_old_then_compress_new(shape):
    gen = torch.Generator().manual_seed(1)
    old, new = gaussian_projection(1, 4, min(shape)), gaussian_projection(2, 4, min(shape))
    c = torch.randn(4, max(shape), generator=gen)
    want = compress(decompress(c, old, shape), new)
    torch.testing.assert_close(transfer(c, old, new), want, rtol=1e-5, atol=1e-5)
    # not the transposed matrix (the reference design's defect)
    assert not torch.allclose(transfer(c, new, old), want, atol=1e-3)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (9, 9)])
def test_lift_is_the_orthogonal_projection_onto_the_sketched_subspace(shape):
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    p = gaussian_projection(7, 4, min(shape), dtype=torch.float64)
    lifted = lift(compress(g, p), p, shape)
    torch.testing.assert_close(compress(lifted, p), compress(g, p))  # consistent with the sketch
    torch.testing.assert_close(lift(compress(lifted, p), p, shape), lifted)  # idempotent
    torch.testing.assert_close(((g - lifted) * lifted).sum(), torch.zeros((), dtype=torch.float64), atol=1e-10, rtol=0)
    assert lifted.norm() < g.norm()  # a contraction, unlike decompress: P^T P is about k / r times longer
    unbiased = decompress(compress(g, p), p, shape)
    assert unbiased.norm() > lifted.norm()


def test_lift_of_a_square_projection_is_exact():
    """At ``min(n, m) == rank`` (the smallest compressed matrix) ``P`` is invertible: lift recovers ``G``."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(8, 30, generator=gen)
    p = gaussian_projection(11, 8, 8)
    torch.testing.assert_close(lift(compress(g, p), p, (8, 30)), g, rtol=1e-4, atol=1e-4)
