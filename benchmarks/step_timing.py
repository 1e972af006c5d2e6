"""Per-decode-step times of generation runners, interleaved (shared by ``generate.py`` and ``seq2seq.py``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Runner = Callable[[Any, int], tuple[Any, float]]
"""``runner(adapter, new) -> (tokens, seconds)``: one generation of ``new`` tokens with ``adapter`` (or ``None``)."""


def step_times(runs: Mapping[str, Runner], adapters: Sequence[Any], rounds: int, new: int
               ) -> tuple[dict[tuple[str, Any], list[float]], list[dict[str, Any]], bool]:
    """Seconds per decode step of each runner with each adapter, one entry per round; the tokens of every runner in
    each (round, adapter), in that order; whether every runner gave the same tokens on each of its runs.

    A step is ``(t(new) - t(1)) / (new - 1)``: the prefill and the first token cancel. Each round runs every runner
    twice, in an order and then in its reverse, so a load that drifts linearly over the round weighs the same on
    every runner's mean and cancels in every ratio; before each timed pair a runner generates one untimed token (the
    runner before it evicted its weights from the CPU caches)."""
    times: dict[tuple[str, Any], list[float]] = {}
    tokens: list[dict[str, Any]] = []
    stable = True
    for _ in range(rounds):
        for adapter in adapters:
            toks: dict[str, Any] = {}
            step: dict[str, list[float]] = {}
            for name in [*runs, *reversed(runs)]:
                fn = runs[name]
                fn(adapter, 1)
                full, t_full = fn(adapter, new)
                _, t_one = fn(adapter, 1)
                step.setdefault(name, []).append((t_full - t_one) / (new - 1))
                stable &= toks.setdefault(name, full) == full
            for name, pair in step.items():
                times.setdefault((name, adapter), []).append(statistics.fmean(pair))
            tokens.append(toks)
    return times, tokens, stable


def paired_ratio(times: Mapping[tuple[str, Any], list[float]], a: str, b: str, adapter: Any) -> float:
    """Median over the rounds of ``a``'s time over ``b``'s in the same round (with ``adapter``; NaN where either did
    not run)."""
    if (a, adapter) not in times or (b, adapter) not in times:
        return float("nan")
    return statistics.median(x / y for x, y in zip(times[(a, adapter)], times[(b, adapter)], strict=True))
