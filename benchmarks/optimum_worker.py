"""The client side of ``benchmarks/optimum_decode.py``: Hugging Face Optimum's column in the decode benchmarks,
run in a virtualenv of its own and kept running, so its runs interleave with the others."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_optimum_python(parser: argparse.ArgumentParser) -> None:
    """The ``--optimum-python`` flag of a benchmark with an Optimum column (:class:`OptimumWorker` reads it)."""
    parser.add_argument("--optimum-python", default=os.environ.get("FLORA_OPTIMUM_PYTHON"), metavar="PATH",
                        help="Python of a virtualenv with optimum-onnx for the Optimum column (default: "
                             "$FLORA_OPTIMUM_PYTHON; none: the column is skipped, saying why)")


class OptimumWorker:
    """``benchmarks/optimum_decode.py`` under ``--optimum-python``, kept running: it exports the base and the
    adapter the Optimum way, then generates on request, so its runs interleave with the others."""

    def __init__(self, proc, log: Path, export_s: dict[str, float]):
        self.proc, self.log, self.export_s = proc, log, export_s

    @classmethod
    def start(cls, python: str | None, root: Path, adapter: str, prompt: list[int] | dict[str, list[list[int]]], *,
              task: str = "text-generation-with-past") -> OptimumWorker | None:
        """The running worker for the base folder ``root/base`` and the PEFT folder ``root/adapter``, or ``None``
        (saying why) where it cannot run. ``prompt``: one row's token ids, or a padded batch (``input_ids``,
        ``attention_mask``); ``task``: Optimum's name of the model's task."""
        import subprocess

        if not python:
            print("Optimum column skipped: no --optimum-python (or $FLORA_OPTIMUM_PYTHON); benchmarks/optimum_decode.py "
                  "says how to install optimum-onnx in a virtualenv of its own")
            return None
        log = root / "optimum.log"
        cmd = [python, str(Path(__file__).with_name("optimum_decode.py")), "--base", str(root / "base"), "--adapter",
               f"{adapter}={root / adapter}", "--work", str(root), "--prompt", json.dumps(prompt), "--task", task]
        try:
            with log.open("w") as err:  # its warnings go to a file: a pipe nobody reads could fill and block it
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        except OSError as exc:
            print(f"Optimum column skipped: {python} could not run benchmarks/optimum_decode.py ({exc})")
            return None
        worker = cls(proc, log, {})
        first = worker._reply('{"export_s"')
        if first is None:
            return None
        worker.export_s = first["export_s"]
        return worker

    def _reply(self, start: str) -> dict | None:
        """The next line of the worker's that starts with ``start``, parsed; ``None`` (saying why) at its end."""
        for line in self.proc.stdout:
            if line.startswith(start):
                return json.loads(line)
        self.proc.wait()
        print(f"Optimum column skipped: benchmarks/optimum_decode.py stopped (exit {self.proc.returncode}):\n"
              f"{self.log.read_text()[-3000:]}")
        return None

    def run(self, adapter: str | None, new: int, num_beams: int = 1) -> tuple[list, float]:
        """Greedy tokens (beam search's, with ``num_beams`` above 1) of ``new`` steps with ``adapter`` (merged) or the
        base (a list per row for a batch), and the seconds the worker measured."""
        self.proc.stdin.write(json.dumps({"adapter": adapter, "new": new, "num_beams": num_beams}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply('{"tokens"')
        if reply is None:
            raise RuntimeError("the Optimum worker stopped; see its log above")
        return reply["tokens"], reply["seconds"]

    def close(self) -> None:
        """Stop the worker (an empty request)."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
