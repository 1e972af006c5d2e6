"""Hugging Face Optimum on the decode benchmarks: the Optimum column of ``benchmarks/generate.py`` (a causal LM,
``--task text-generation-with-past``) and ``benchmarks/seq2seq.py`` (an encoder-decoder model,
``--task text2text-generation-with-past``).

Runs under the Python of a virtualenv that holds ``optimum-onnx`` (it needs ``transformers<4.58``,
so it cannot share flora_graph's environment). Install it with::

    python3 -m venv optimum-venv
    optimum-venv/bin/pip install -c constraints.txt torch==2.13.0 "transformers<4.58" \\
        "optimum-onnx[onnxruntime]==0.1.0" peft

``benchmarks/generate.py --optimum-python optimum-venv/bin/python`` (or ``benchmarks/seq2seq.py``) starts this
script once as a worker (``benchmarks/optimum_worker.py``). It does what an Optimum user does to serve a base
model and a PEFT adapter: exports the base folder with ``optimum.exporters.onnx.main_export(..., task=TASK)`` and,
per adapter, ``merge_and_unload()`` of the PEFT model, saved and exported the same way (Optimum has no
swappable adapters: one model per adapter). It prints one JSON line ``{"export_s": {...}}`` with the
seconds of each export (the merge included), loads every model in ``ORTModelForCausalLM`` or
``ORTModelForSeq2SeqLM`` (one intra-op thread, no spinning) and then answers requests, one JSON line each on
stdin (``{"adapter": NAME or null, "new": N}``, and ``"num_beams": K`` for beam search), with one JSON line on
stdout: the greedy (or beam search) tokens of ``model.generate`` (``N`` new tokens, the end-of-text token held back
until then) and the seconds it took
(measured here, so the pipe does not count). The prompt (``--prompt``) is a JSON list of token ids (one row), or
``{"input_ids": [[...]], "attention_mask": [[...]]}`` (a padded batch); the tokens come back as a list, or a
list per row for a batch. An empty line or end of input stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="the base model folder (transformers format)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter folder (repeat)")
    p.add_argument("--work", required=True, type=Path, help="a folder for the merged models and the exports")
    p.add_argument("--prompt", required=True, help="JSON list of the prompt's token ids, or {input_ids, attention_mask}")
    p.add_argument("--task", choices=["text-generation-with-past", "text2text-generation-with-past"],
                   default="text-generation-with-past", help="the model's task, as Optimum names it")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import onnxruntime as ort
    import peft
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    seq2seq = args.task == "text2text-generation-with-past"
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    ort_class = ORTModelForSeq2SeqLM if seq2seq else ORTModelForCausalLM
    adapters = dict(a.split("=", 1) for a in args.adapter)
    seconds, folders = {}, {}
    for name in [None, *adapters]:
        out = args.work / f"optimum_{name or 'base'}"
        t = time.perf_counter()
        source = args.base
        if name is not None:  # Optimum serves one merged model per adapter
            model = peft.PeftModel.from_pretrained(auto.from_pretrained(args.base), adapters[name]).merge_and_unload()
            source = args.work / f"merged_{name}"
            model.save_pretrained(source)
        main_export(str(source), output=out, task=args.task, device="cpu", no_post_process=False)
        seconds[name or "base"] = time.perf_counter() - t
        folders[name] = out
    print(json.dumps({"export_s": seconds}), flush=True)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    models = {name: ort_class.from_pretrained(folder, session_options=options, provider="CPUExecutionProvider",
                                              use_io_binding=False)
              for name, folder in folders.items()}
    given = json.loads(args.prompt)
    batch = isinstance(given, dict)
    prompt = torch.tensor(given["input_ids"] if batch else [given])
    mask = torch.tensor(given["attention_mask"]) if batch else torch.ones_like(prompt)
    skip = 1 if seq2seq else prompt.shape[1]  # the decoder's start token, or the prompt
    for line in sys.stdin:
        if not line.strip():
            break
        request = json.loads(line)
        model, new = models[request["adapter"]], int(request["new"])
        t = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             num_beams=int(request.get("num_beams", 1)))
        dt = time.perf_counter() - t
        rows = out[:, skip:].tolist()
        print(json.dumps({"tokens": rows if batch else rows[0], "seconds": dt}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
