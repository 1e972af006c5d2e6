"""Generation runners over one GenAI package and eager PEFT, for ``step_timing.step_times`` (shared by ``dora.py`` and
``expert_lora.py``): each is ``run(adapter, new) -> (tokens, seconds)`` after a fixed prompt, greedy, no stop tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from step_timing import Runner


def one_thread(package: Path) -> None:
    """Set ``package``'s genai_config to 1 intra-op and 1 inter-op thread (no worker threads, so none spin)."""
    path = package / "genai_config.json"
    doc = json.loads(path.read_text())
    doc["model"]["decoder"]["session_options"].update({"intra_op_num_threads": 1, "inter_op_num_threads": 1})
    path.write_text(json.dumps(doc, indent=2))


def generator_runner(gen: Any, prompt: list[int]) -> Runner:
    """:class:`flora_graph.serving.generate.Generator` ``gen``, one row."""
    def run(adapter: str | None, new: int) -> tuple[list[int], float]:
        t = time.perf_counter()
        out = gen.generate([prompt], adapters=adapter, max_new_tokens=new, stop_tokens=[])[0]
        return out, time.perf_counter() - t
    return run


def genai_runner(package: Path, adapters: Sequence[str], prompt: list[int]) -> Runner:
    """onnxruntime-genai on ``package`` with its ``adapters`` files loaded, the one asked for active."""
    import onnxruntime_genai as og

    model = og.Model(str(package))
    loaded = og.Adapters(model)
    for name in adapters:
        loaded.load(str(package / "adapters" / f"{name}.onnx_adapter"), name)

    def run(adapter: str | None, new: int) -> tuple[list[int], float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
        t = time.perf_counter()
        g = og.Generator(model, params)
        if adapter:
            g.set_active_adapter(loaded, adapter)
        g.append_tokens(prompt)
        while not g.is_done():
            g.generate_next_token()
        return [int(x) for x in g.get_sequence(0)][len(prompt):], time.perf_counter() - t
    return run


def eager_runner(models: Mapping[str | None, Any], prompt: list[int]) -> Runner:
    """transformers ``generate`` with its cache on ``models[adapter]`` (a PEFT model per adapter)."""
    import torch

    def run(adapter: str | None, new: int) -> tuple[list[int], float]:
        with torch.no_grad():
            t = time.perf_counter()
            out = models[adapter].generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                                           do_sample=False)
            return out[0, len(prompt):].tolist(), time.perf_counter() - t
    return run


def mixed_vs_sequential(gen: Any, prompts: list[list[int]], adapters: list[str | None], new: int, rounds: int,
                        want: list[list[int]]) -> tuple[float, float, float, bool]:
    """The Generator ``gen`` on ``prompts`` (row ``i`` with ``adapters[i]``) decoded as one mixed batch and as the rows
    one after the other, interleaved for ``rounds`` rounds (each round runs them in an order and its reverse):
    ``(mixed tokens/s, sequential tokens/s, median of the rounds' mixed / sequential, every run gave want)``."""
    import statistics

    runners = {"mixed": lambda: gen.generate(prompts, adapters=adapters, max_new_tokens=new, stop_tokens=[]),
               "sequential": lambda: [gen.generate([q], adapters=a, max_new_tokens=new, stop_tokens=[])[0]
                                      for q, a in zip(prompts, adapters, strict=True)]}
    rates: dict[str, list[float]] = {k: [] for k in runners}
    same = True
    for _ in range(rounds):
        seconds: dict[str, list[float]] = {}
        for k in [*runners, *reversed(runners)]:
            t = time.perf_counter()
            same &= runners[k]() == want
            seconds.setdefault(k, []).append(time.perf_counter() - t)
        for k, pair in seconds.items():
            rates[k].append(len(prompts) * new / statistics.fmean(pair))
    ratio = statistics.median(m / s for m, s in zip(rates["mixed"], rates["sequential"], strict=True))
    return statistics.median(rates["mixed"]), statistics.median(rates["sequential"]), ratio, same
