"""The ``torchscript`` and ``torch-export`` backends, over :func:`to_torch_module`.

* ``torchscript``: ``torch.jit.script`` of the generated module; ``save(path)`` writes a
  ``.pt`` archive that ``torch.jit.load`` runs in a process without flora_graph.
* ``torch-export``: ``torch.export.export`` of the generated module, one
  ``torch.export.Dim`` per named dim of the graph inputs, shared across inputs, with range
  ``[0, inf)`` (``[1, inf)`` or ``[2, inf)`` where a guard needs it), capped by the graph's
  ``dim_max`` where it bounds the dim (``Graph.dim_max``, set by ``capture``). A product dim
  ``"4*batch"`` becomes ``4 * Dim("batch")``; a product of several names gets a Dim of its
  own. ``save(path)`` writes a ``.pt2`` that ``torch.export.load(path).module()`` runs
  without flora_graph.

Both modules take the graph inputs positionally, in ``graph.inputs`` order, and return a
tuple in ``graph.outputs`` order, even for one output. The saved archives also carry
``flora_io.json`` (``{"inputs": [...], "outputs": [...]}``) as an extra file. Inputs are
validated by :class:`Executable` before torch sees them; any failure inside torch is
raised as :class:`FloraGraphError` naming the graph.
"""

from __future__ import annotations

import abc
import itertools
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from flora_graph.errors import FloraGraphError, GraphError, RuntimeInputError
from flora_graph.ir.graph import Graph
from flora_graph.ir.serialize import atomic_file
from flora_graph.ir.shapes import dim_names, dim_terms, is_dim_name
from flora_graph.ops.evaluate import eval_dim
from flora_graph.runtimes.executable import Executable, register_backend
from flora_graph.runtimes.torch_lowering import (
    example_shape,
    numpy_to_torch,
    output_needs_copy,
    to_torch_module,
)

__all__ = ["TorchExportExecutable", "TorchScriptExecutable", "atomic_torch_save"]

IO_FILE = "flora_io.json"
DIM_MINS = (0, 1, 2)  # torch-export tries each lower bound for the named dims in turn
MAX_LINES = 1000  # lines of one TorchScript function; 2,000-node chains ran, 20,000 overflowed the stack


def atomic_torch_save(path: str | Path, write: Callable[[IO[bytes]], None], what: str) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it into place.

    Any failure (the parent is a regular file, the disk is full, torch refuses) raises
    :class:`FloraGraphError` naming ``path`` and leaves no temporary file behind.
    """
    path = Path(path)
    try:
        with atomic_file(path) as f:
            write(f)
    except Exception as exc:
        raise FloraGraphError(f"cannot write {what} to {str(path)!r}: {exc}") from exc
    return path


def _check_threads(num_threads: int | None) -> int | None:
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
        raise FloraGraphError(f"num_threads must be a positive int, got {num_threads!r}")
    return num_threads


def _to_numpy(t: torch.Tensor, copy: bool) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        arr = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        arr = t.numpy()
    return arr.copy() if copy else arr


class _TorchExecutable(Executable):
    """Shared run path: numpy -> torch, inference mode, torch -> numpy without aliasing."""

    max_lines: int | None = None  # cut a longer generated forward into forked parts (torch_lowering)

    def __init__(self, graph: Graph, *, num_threads: int | None = None) -> None:
        super().__init__(graph)
        self.num_threads = _check_threads(num_threads)
        self.module = to_torch_module(graph, max_lines=self.max_lines)
        self._copy_out = output_needs_copy(graph)
        self._io = json.dumps({"inputs": self.input_names, "outputs": self.output_names})

    def _check_sizes(self, args: list[torch.Tensor]) -> None:
        """Refuse, with ``RuntimeInputError``, sizes the compiled program does not cover."""

    @abc.abstractmethod
    def _call(self, args: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Run the compiled program on positional tensors, returning the output tuple."""

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on validated inputs; return ``{output name: array}`` owned by the caller."""
        if self.num_threads is not None and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)  # process-wide, as torch's setting is
        args = [numpy_to_torch(inputs[name]) for name in self.input_names]
        self._check_sizes(args)
        try:
            with torch.inference_mode():
                outs = self._call(args)
        except Exception as exc:
            raise FloraGraphError(f"{self.backend} backend failed running graph {self.graph.name!r}: {exc}") from exc
        # hand back arrays the caller owns: never a view of an input, a weight or another output
        seen = {a.untyped_storage().data_ptr() for a in args if a.numel()}
        result: dict[str, np.ndarray] = {}
        for name, t, weight_only in zip(self.output_names, outs, self._copy_out, strict=True):
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            result[name] = _to_numpy(t, copy=weight_only or ptr in seen)
            if ptr is not None:
                seen.add(ptr)
        return result


@register_backend("torchscript")
class TorchScriptExecutable(_TorchExecutable):
    """``torch.jit.script`` of the generated module.

    Options: ``num_threads`` (``torch.set_num_threads`` when given); ``optimize`` applies
    ``torch.jit.freeze`` + ``optimize_for_inference`` (off by default: on the demo model,
    CPU, one thread, it measured slower than the plain scripted module; results agree to
    ~1e-7). The saved archive is the scripted (or frozen) module. A graph of more than
    :data:`MAX_LINES` computed nodes is scripted as forked parts of that many lines
    (:mod:`~flora_graph.runtimes.torch_lowering`): TorchScript's interpreter recurses once
    per node of a chain and overflowed the C++ stack (SIGSEGV) on a 20,000-node chain.
    """

    backend = "torchscript"
    max_lines = MAX_LINES

    def __init__(self, graph: Graph, *, num_threads: int | None = None, optimize: bool = False) -> None:
        super().__init__(graph, num_threads=num_threads)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* is deprecated in favour of export
                scripted = torch.jit.script(self.module)
                if optimize:
                    scripted = torch.jit.optimize_for_inference(torch.jit.freeze(scripted))
        except Exception as exc:
            raise GraphError(f"torch.jit.script failed on graph {self.graph.name!r}: {exc}") from exc
        self.scripted = scripted

    def _call(self, args: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        return self.scripted(*args)

    def save(self, path: str | Path) -> Path:
        """Write the scripted module with ``torch.jit.save`` (atomically) and return ``path``."""

        def write(f: IO[bytes]) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(self.scripted, f, _extra_files={IO_FILE: self._io})

        return atomic_torch_save(path, write, f"TorchScript module of graph {self.graph.name!r}")


def _dynamic_shapes(graph: Graph, dim_min: int) -> tuple[list[torch.Tensor], list[dict[int, Any] | None]]:
    """Example inputs (named dims sized 2..8, distinct per name, or 4..10 above a ``graph.dim_min``
    so that strided windows over them keep more than one position; within ``graph.dim_max``) and
    the ``dynamic_shapes`` spec (each dim's minimum at least ``dim_min``)."""
    names = sorted({p for n in graph.inputs for d in n.shape for p in dim_names(d)})
    bounds, lows = graph.dim_max, graph.dim_min

    def example(k: int, name: str) -> int:
        lo = lows.get(name, 0)
        if not lo:
            return min(2 + k % 7, bounds.get(name, 8))
        return max(lo, min(lo + 4 + k % 7, bounds.get(name, lo + 4 + k % 7)))

    sizes = {name: example(k, name) for k, name in enumerate(names)}
    dims: dict[str, Any] = {}
    used: set[str] = set()

    def dim(name: str) -> Any:
        if name not in dims:
            base = label = "".join(c if c.isalnum() else "_" for c in name)
            for k in itertools.count(1):  # "a.b" and "a_b" stay two Dims
                if label not in used:
                    break
                label = f"{base}_{k}"
            used.add(label)
            hi = bounds.get(name)
            if hi is None and not is_dim_name(name) and dim_names(name) <= set(bounds):
                hi = eval_dim(name, bounds)
            dims[name] = torch.export.Dim(label, min=max(dim_min, lows.get(name, 0)), max=hi)
        return dims[name]

    examples, specs = [], []
    for node in graph.inputs:
        spec: dict[int, Any] = {}
        for axis, d in enumerate(node.shape):
            if isinstance(d, int):
                continue
            terms = dim_terms(d)
            if len(terms) > 1:  # a sum (past_seq+seq): torch.export relates it to the other dims itself
                spec[axis] = torch.export.Dim.AUTO
                continue
            (coef, named), = terms
            spec[axis] = (dim(named[0]) * coef if coef != 1 else dim(named[0])) if len(named) == 1 else dim(d)
        shape = example_shape(node.shape, sizes)
        dtype = getattr(torch, node.dtype)
        examples.append(torch.ones(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
        specs.append(spec or None)
    return examples, specs


@register_backend("torch-export")
class TorchExportExecutable(_TorchExecutable):
    """``torch.export.export`` of the generated module, run through ``ep.module()``.

    Named dims are dynamic with range ``[dim_min, graph.dim_max or inf)``: export is tried with ``dim_min``
    0, then 1, then 2, keeping the first that succeeds (``self.dim_min``). Some ops add
    guards that fail at size 0 (a reshape's view check divides by the batch) or at 1; the
    demo model exports with 0. :meth:`__call__` refuses sizes outside the program's ranges
    with :class:`RuntimeInputError` rather than running them unchecked.
    """

    backend = "torch-export"

    def __init__(self, graph: Graph, *, num_threads: int | None = None) -> None:
        super().__init__(graph, num_threads=num_threads)
        dynamic = any(isinstance(d, str) for n in graph.inputs for d in n.shape)
        for dim_min in DIM_MINS if dynamic else DIM_MINS[:1]:
            examples, specs = _dynamic_shapes(graph, dim_min)
            try:
                with torch.no_grad():
                    self.exported = torch.export.export(self.module, tuple(examples), dynamic_shapes=tuple(specs), strict=False)
                break
            except Exception as exc:  # a guard (such as a view's stride check at size 0) that this range violates
                error = exc
        else:
            raise GraphError(f"torch.export failed on graph {self.graph.name!r}: {error}") from error
        self.dim_min = dim_min
        self.runner = self.exported.module()
        self._ranges = self._input_ranges()

    def _input_ranges(self) -> list[tuple[str, int, int, int | None]]:
        """``(input, axis, min, max or None)`` for each input dim that is a plain symbol of the program."""
        ep = self.exported
        user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in set(ep.graph_signature.user_inputs)]
        out = []
        for name, node in zip(self.input_names, user, strict=True):
            for axis, size in enumerate(node.meta["val"].shape):
                if not isinstance(size, torch.SymInt) or size.node.expr not in ep.range_constraints:
                    continue
                vr = ep.range_constraints[size.node.expr]
                hi = int(vr.upper) if vr.upper.is_Integer else None
                out.append((name, axis, int(vr.lower), hi))
        return out

    def _check_sizes(self, args: list[torch.Tensor]) -> None:
        by_name = dict(zip(self.input_names, args, strict=True))
        for name, axis, lo, hi in self._ranges:
            size = by_name[name].shape[axis]
            if size < lo or (hi is not None and size > hi):
                raise RuntimeInputError(
                    f"input {name!r} dim {axis} has size {size}; graph {self.graph.name!r} was exported for "
                    f"sizes {lo}..{'inf' if hi is None else hi}"
                )

    def _call(self, args: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        return self.runner(*args)

    def save(self, path: str | Path) -> Path:
        """Write the exported program with ``torch.export.save`` (atomically) and return ``path``."""

        def write(f: IO[bytes]) -> None:
            torch.export.save(self.exported, f, extra_files={IO_FILE: self._io})

        return atomic_torch_save(path, write, f"exported program of graph {self.graph.name!r}")
