"""Train the built-in byte-level decoder from scratch with Flora, then export it to ONNX.

The corpus is the Python standard library's own sources (nothing is downloaded). About a
minute on two CPU cores::

    python examples/train_flora.py            # or: flora-graph train --steps 200 --out runs/flora

Then continue it for 200 more steps from its last checkpoint::

    python examples/train_flora.py --resume runs/flora --steps 400
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

from flora_graph.models.decoder import byte_tokenize
from flora_graph.training.trainer import TrainConfig, config_from_checkpoint, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="runs/flora")
    ap.add_argument("--resume", help="a checkpoint file or a run folder")
    args = ap.parse_args()

    if args.resume:  # the checkpoint's options, with more steps
        config = config_from_checkpoint(args.resume, steps=args.steps, out=args.out)
    else:
        config = TrainConfig(
            steps=args.steps,
            optimizer="flora",  # or "adam", "adafactor", "lora-adam", "flora-adapter"
            rank=8,  # momentum of an n x m weight kept as 8 x max(n, m)
            batch=16,
            seq=64,
            accum=1,  # > 1: micro-batches summed compressed (FloraAccumulator)
            eval_every=50,
            ckpt_every=100,
            out=args.out,  # checkpoints/step_*.pt and model.onnx go here
        )
    result = train(config)  # a rich progress bar; progress=None for none

    for step, loss in result.eval_losses:
        print(f"step {step:4d}  eval loss {loss:.4f} nats/byte")
    report = result.export
    print(f"exported {report.path}: max |onnxruntime - torch| = {report.max_abs_diff:.2e} "
          f"({'ok' if report.ok else 'MISMATCH'})")

    # greedy-continue a prompt with the exported model
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    ids = byte_tokenize("def __init__(self").numpy()
    for _ in range(40):
        logits = session.run(None, {"input_ids": ids})[0]
        ids = np.concatenate([ids, logits[:, -1:].argmax(-1)], axis=1)
    text = bytes(int(t) - 3 for t in ids[0, 1:] if 3 <= t < 259).decode("utf-8", "replace")
    print(f"sample: {text!r}")


if __name__ == "__main__":
    main()
