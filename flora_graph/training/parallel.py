"""Multi-process training (``TrainConfig.nproc > 1``): gloo ranks, the decoder sharded with FSDP2.

``train(config)`` with ``nproc = N`` starts ``N`` processes (``torch.multiprocessing``, spawn,
gloo with a file store in a temporary folder; CPU threads split between them) and each runs the ordinary training loop
with a :class:`Ranks` context:

- the model is ``fully_shard``-ed (each decoder block, then the root): every parameter is a
  ``Shard(0)`` DTensor, and so is the optimizer state (``Flora`` keeps its compressed momentum
  and factored second moment sharded, see :mod:`flora_graph.flora.sharding`; AdamW natively);
- each rank takes its ``batch / N`` rows of every micro-batch; FSDP2 averages the gradients, so
  a step equals one process on the whole micro-batch (up to float rounding) and the reported
  loss is the mean over ranks; every rank evaluates the same eval batches;
- checkpoints: the model and optimizer shards go to ``step_NNNNNN.dcp/`` through
  ``torch.distributed.checkpoint``, then rank 0 writes ``step_NNNNNN.pt`` (config, history,
  accumulator) naming that folder; resuming needs the same ``nproc``;
- at the end the full weights are gathered on rank 0 and handed back to the calling process,
  which exports them (``TrainResult.optimizer`` is then ``None``: its state lived in the ranks).

Equivalent launch by hand: ``flora-graph train --nproc 2`` (see the README).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from flora_graph.errors import FloraGraphError
from flora_graph.flora import Flora
from flora_graph.training.config import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from flora_graph.training.trainer import TrainResult

__all__ = ["Ranks", "in_rank", "launch"]


def in_rank(config: TrainConfig) -> bool:
    """Whether this process is one of ``config.nproc`` initialised ranks (rather than the launcher)."""
    return config.nproc > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == config.nproc


class Ranks:
    """This rank's part of a multi-process run: sharding, its slice of a batch, sharded checkpoints."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def shard(self, model: nn.Module) -> nn.Module:
        """``fully_shard`` every decoder block, then the root (in place); returns ``model``."""
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model

    @staticmethod
    def reshard(model: nn.Module) -> None:
        """Free the unsharded weights a forward without backward (evaluation) leaves on the FSDP2 root."""
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch."""
        return t.chunk(self.world)[self.rank]

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks."""
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    @staticmethod
    def _states(model: nn.Module, opt: torch.optim.Optimizer, template: bool) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        if isinstance(opt, Flora):
            optim = opt.sharded_state_dict(template=template)
        else:
            optim = get_optimizer_state_dict(model, opt)
        return {"model": get_model_state_dict(model), "optimizer": optim}

    def save(self, folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Write the model and optimizer shards of every rank to ``folder`` (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(model, opt, template=False), checkpoint_id=str(folder))

    def load(self, folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Load :meth:`save`'s shards into ``model`` and ``opt`` (collective; Flora validates by name)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if not folder.is_dir():
            raise TrainConfigError(f"resume: the sharded checkpoint folder {folder} is missing")
        states = self._states(model, opt, template=True)
        dcp.load(states, checkpoint_id=str(folder))
        set_model_state_dict(model, states["model"])
        if isinstance(opt, Flora):
            opt.load_sharded_state_dict(states["optimizer"])
        else:
            set_optimizer_state_dict(model, opt, states["optimizer"])

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def shared_token(self) -> str:
        """A random hex token drawn on rank 0 and the same on every rank (collective)."""
        box = [secrets.token_hex(4) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    @staticmethod
    def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0, on the CPU (collective; other ranks get ``{}``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _write_error(path: Path, exc: FloraGraphError) -> None:
    """A rank's typed error as JSON (its class and message), for the launcher to raise again."""
    doc = {"module": type(exc).__module__, "type": type(exc).__qualname__, "message": str(exc)}
    path.write_text(json.dumps(doc))


def _read_error(path: Path) -> FloraGraphError:
    """The error :func:`_write_error` recorded: the same flora_graph class where it takes a message alone,
    else a :class:`FloraGraphError` with the same message."""
    doc = json.loads(path.read_text())
    message = str(doc.get("message", ""))
    try:
        cls = getattr(import_module(str(doc["module"])), str(doc["type"]))
        if isinstance(cls, type) and issubclass(cls, FloraGraphError) and str(doc["module"]).startswith("flora_graph."):
            return cls(message)
    except (ImportError, AttributeError, KeyError, TypeError):
        pass
    return FloraGraphError(message)


def _rank_main(rank: int, world: int, config: TrainConfig, progress: str | None, out: str) -> None:
    """Entry of one rank: gloo, :func:`~flora_graph.training.trainer.train`, rank 0 saves what the launcher needs."""
    from flora_graph.training.trainer import train

    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    # a file store, not TCP: no rank hosts a server that the others could outlive at teardown
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'store'}", rank=rank, world_size=world)
    try:
        try:
            r = train(config, progress if rank == 0 else None)
        except FloraGraphError as exc:  # a typed error (bad resume, ...): the launcher raises it again
            if rank == 0:
                _write_error(Path(out) / "error.json", exc)
            raise
        weights = Ranks.full_state(r.model)
        if rank == 0:
            torch.save({"train_losses": r.train_losses, "eval_losses": r.eval_losses, "seconds": r.seconds,
                        "checkpoints": [str(p) for p in r.checkpoints], "start_step": r.start_step,
                        "model": weights}, Path(out) / "result.pt")
        dist.barrier()
        if rank == 0:  # every rank is past its last collective and result.pt is whole: the run is complete
            (Path(out) / DONE).touch()
    finally:
        dist.destroy_process_group()


DONE = "done"
"""The file rank 0 creates in the run's folder once every rank has passed the last barrier (after ``result.pt``)."""


def join_ranks(ctx: Any, out: Path) -> None:
    """Wait for the ranks of ``ctx`` (``torch.multiprocessing``'s context); a rank's typed error is raised again here.

    A rank that dies by a signal *after* the run is complete (``out/done`` exists: every rank passed the last barrier
    and ``result.pt`` is whole), as gloo can abort a process while tearing its process group down on a loaded
    machine, loses nothing: the run counts as finished. Any other death raises as ``torch.multiprocessing`` reports
    it."""
    import torch.multiprocessing as mp

    try:
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the rank's traceback
            time.sleep(0.05)
    except mp.ProcessRaisedException:
        error = out / "error.json"
        if error.is_file():
            raise _read_error(error) from None
        raise
    except mp.ProcessExitedException:
        if not (out / DONE).is_file():
            raise


def launch(config: TrainConfig, progress: Any, optimizer_factory: Any) -> TrainResult:
    """Run ``config`` on ``config.nproc`` processes; the trained model comes back unsharded and is exported here."""
    import torch.multiprocessing as mp

    from flora_graph.training.trainer import TrainResult, build_model, export_decoder, training_corpus

    if optimizer_factory is not None:
        raise TrainConfigError("train: optimizer_factory runs in one process only (nproc=1)")
    if progress is not None and not isinstance(progress, str):
        raise TrainConfigError("train: with nproc > 1, progress must be 'rich', 'tqdm' or None (not a callable)")
    with tempfile.TemporaryDirectory(prefix="flora-train-") as out:
        ctx = mp.start_processes(_rank_main, args=(config.nproc, config, progress, out),
                                 nprocs=config.nproc, join=False, start_method="spawn")
        join_ranks(ctx, Path(out))
        result = torch.load(Path(out) / "result.pt", weights_only=True)
    model = build_model(config)
    model.load_state_dict(result["model"])
    report = None
    if config.export and config.out is not None:
        report = export_decoder(model, training_corpus(config), Path(config.out) / "model.onnx")
    return TrainResult(config, model.train(), None, [tuple(t) for t in result["train_losses"]],
                       [tuple(t) for t in result["eval_losses"]], [Path(p) for p in result["checkpoints"]], report,
                       result["seconds"], result["start_step"])
