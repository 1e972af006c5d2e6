"""Runners shared by the generation benchmarks: the Generator and eager PEFT as ``step_timing`` runners
(``run(adapter, new) -> (tokens, seconds)`` after a fixed prompt, greedy, no stop tokens; onnxruntime-genai's is
``generate._genai_runner``), and the interleaved tokens/s of whole-batch runners (:func:`interleaved_rates`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from step_timing import Runner


def generator_runner(gen: Any, prompt: list[int]) -> Runner:
    """:class:`flora_graph.serving.generate.Generator` ``gen``, one row."""
    def run(adapter: str | None, new: int) -> tuple[list[int], float]:
        t = time.perf_counter()
        out = gen.generate([prompt], adapters=adapter, max_new_tokens=new, stop_tokens=[])[0]
        return out, time.perf_counter() - t
    return run


def eager_runner(models: Mapping[str | None, Any], prompt: list[int]) -> Runner:
    """transformers ``generate`` with its cache on ``models[adapter]`` (a PEFT model per adapter, ``None``: the base)."""
    import torch

    def run(adapter: str | None, new: int) -> tuple[list[int], float]:
        with torch.no_grad():
            t = time.perf_counter()
            out = models[adapter].generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                                           do_sample=False)
            return out[0, len(prompt):].tolist(), time.perf_counter() - t
    return run


def interleaved_rates(runners: Mapping[str, Callable[[], Any]], rounds: int, tokens: int,
                      want: Any) -> tuple[dict[str, list[float]], bool]:
    """Tokens/s of each runner (each call generates ``tokens`` tokens), one entry per round; a round runs every runner
    in an order and then in its reverse and takes each one's mean, so load that drifts linearly over the round cancels
    in every ratio. Also whether every runner returned ``want`` (a runner returning ``None`` is not checked)."""
    rates: dict[str, list[float]] = {k: [] for k in runners}
    same = True
    for _ in range(rounds):
        seconds: dict[str, list[float]] = {}
        for k in [*runners, *reversed(runners)]:
            t = time.perf_counter()
            got = runners[k]()
            seconds.setdefault(k, []).append(time.perf_counter() - t)
            same &= got is None or got == want
        for k, pair in seconds.items():
            rates[k].append(tokens / statistics.fmean(pair))
    return rates, same


def mixed_vs_sequential(gen: Any, prompts: list[list[int]], adapters: list[str | None], new: int, rounds: int,
                        want: list[list[int]]) -> tuple[float, float, float, bool]:
    """The Generator ``gen`` on ``prompts`` (row ``i`` with ``adapters[i]``) decoded as one mixed batch and as the rows
    one after the other (:func:`interleaved_rates`): ``(mixed tokens/s, sequential tokens/s, median of the rounds'
    mixed / sequential, every run gave want)``."""
    runners = {"mixed": lambda: gen.generate(prompts, adapters=adapters, max_new_tokens=new, stop_tokens=[]),
               "sequential": lambda: [gen.generate([q], adapters=a, max_new_tokens=new, stop_tokens=[])[0]
                                      for q, a in zip(prompts, adapters, strict=True)]}
    rates, same = interleaved_rates(runners, rounds, len(prompts) * new, want)
    ratio = statistics.median(m / s for m, s in zip(rates["mixed"], rates["sequential"], strict=True))
    return statistics.median(rates["mixed"]), statistics.median(rates["sequential"]), ratio, same
