"""Interleaved timing: the variants being compared take turns, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["median_ms", "time_interleaved"]


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 50,
    warmup: int = 3,
    inner: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, over ``rounds`` rounds.

    Each round runs every variant ``inner`` times back to back (their mean is one sample);
    the order of the variants rotates from round to round, so no variant always runs
    first or right after the same neighbour. ``warmup`` untimed rounds come first.
    ``progress(done, total)`` is called after each round.
    """
    if rounds < 1 or inner < 1 or warmup < 0:
        raise ValueError("rounds and inner must be >= 1 and warmup >= 0")
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            fn = variants[n]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[n].append((time.perf_counter() - t0) / inner)
        if progress is not None:
            progress(r + 1, rounds)
    return samples


def median_ms(samples: list[float]) -> float:
    """Median of samples in seconds, as milliseconds."""
    return statistics.median(samples) * 1e3
