"""``flora-graph train``: train the built-in decoder (Flora by default), checkpoint it, export it to ONNX.

``flora_graph.cli`` wires this in with ``add_cli(subparsers)``, which imports no torch (the trainer
is imported when the command runs, so ``flora-graph --help`` starts fast); the handler takes
``(args, console)`` and returns the exit status, as the others there do. With ``--resume`` the
checkpoint's own options are the defaults, so ``flora-graph train --resume runs/train --steps 400``
continues a run without repeating its options.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from flora_graph.cli_types import int_at_least
from flora_graph.training.choices import ACCUMULATORS, FLORA_UPDATES, OPTIMIZERS

if TYPE_CHECKING:
    from flora_graph.training.trainer import TrainConfig

__all__ = ["add_cli", "config_from_args"]

# option -> TrainConfig field, for the options that map one to one
_FIELDS = ("steps", "batch", "seq", "lr", "optimizer", "rank", "kappa", "accum", "accumulator", "eval_every",
           "ckpt_every", "out", "corpus_bytes", "export", "seed", "flora_update", "nproc")
DEFAULT_OUT = "runs/train"




def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed options describe (a checkpoint's options under ``--resume``)."""
    from flora_graph.training.trainer import TrainConfig, config_from_checkpoint  # torch: only when training

    given = {f: getattr(args, f) for f in _FIELDS if getattr(args, f, None) is not None}
    if args.resume is not None:
        return config_from_checkpoint(args.resume, **given)
    return TrainConfig(**{"out": DEFAULT_OUT, **given})


def _train(args: argparse.Namespace, console: Any) -> int:
    from flora_graph.training.trainer import train

    config = config_from_args(args)
    what = f"{config.optimizer}" + (f" r={config.rank}" if config.optimizer != "adam" else "")
    what += f" ({config.flora_update} update)" if config.optimizer == "flora" else ""
    what += f" on {config.nproc} processes (FSDP2)" if config.nproc > 1 else ""
    console.print(f"training the decoder with {what}: {config.steps} steps x {config.accum} x {config.batch} x "
                  f"{config.seq} tokens, lr {config.base_lr:g}" + (f", resuming {config.resume}" if config.resume else ""))
    result = train(config, progress=None if args.progress == "none" else args.progress)
    first = result.eval_losses[0]
    console.print(f"eval loss: {first[1]:.4f} at step {first[0]} -> {result.final_eval_loss:.4f} at step "
                  f"{result.eval_losses[-1][0]} ({result.seconds:.1f} s of training)")
    if result.checkpoints:
        console.print(f"checkpoints: {len(result.checkpoints)}, last {result.checkpoints[-1]}")
    if result.export is not None:
        rep = result.export
        mark = "[green]ok[/green]" if rep.ok else "[red]MISMATCH[/red]"
        console.print(f"exported to {rep.path}: max |onnxruntime - eager torch| = {rep.max_abs_diff:.3e} {mark}")
        return 0 if rep.ok else 1
    return 0


def add_cli(subparsers: Any) -> None:
    """Add the ``train`` subcommand to ``subparsers`` (the object ``add_subparsers()`` returned)."""
    p = subparsers.add_parser("train", help="train the built-in decoder with Flora (or Adam, ...) and export it",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int_at_least(1), help="optimizer steps (default 200)")
    p.add_argument("--batch", type=int_at_least(1), help="sequences per micro-batch (default 16)")
    p.add_argument("--seq", type=int_at_least(1), help="tokens (bytes) per sequence (default 64)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (default: per optimizer, 2.4e-2 for flora)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default flora)")
    p.add_argument("--rank", type=int_at_least(1), help="Flora / LoRA rank (default 8)")
    p.add_argument("--kappa", type=int_at_least(1), help="steps between Flora projection resamples (default 1000)")
    p.add_argument("--flora-update", choices=FLORA_UPDATES,
                   help="Flora's compressed-momentum rule: scaled (default; least-squares decompression around the "
                        "fresh update scaled to the momentum's norm), lift (around the fresh update in full) or paper "
                        "(the paper's unbiased P^T C with transfer)")
    p.add_argument("--nproc", type=int_at_least(1),
                   help="processes (gloo on this machine, model sharded with FSDP2; each takes batch/nproc rows "
                        "of every micro-batch; default 1)")
    p.add_argument("--accum", type=int_at_least(1), help="micro-batches per step (default 1)")
    p.add_argument("--accumulator", choices=ACCUMULATORS,
                   help="gradient accumulation buffers (default auto: compressed for flora)")
    p.add_argument("--eval-every", type=int_at_least(0), help="steps between eval losses (default 50; 0: end only)")
    p.add_argument("--ckpt-every", type=int_at_least(0), help="steps between checkpoints (default 0: end only)")
    p.add_argument("--out", metavar="DIR", help=f"checkpoints and model.onnx go here (default {DEFAULT_OUT})")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint file (or a run folder's latest)")
    p.add_argument("--corpus-bytes", type=int_at_least(64), help="stdlib source bytes to train on (default 1 MiB)")
    p.add_argument("--seed", type=int, help="seed of the model, batches and projections (default 0)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=None,
                   help="export the trained model to ONNX through the compiler (default on)")
    p.add_argument("--progress", choices=["rich", "tqdm", "none"], default="rich", help="progress bar (default rich)")
    p.set_defaults(func=_train)
