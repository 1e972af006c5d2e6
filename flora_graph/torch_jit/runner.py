"""The hot path: torch tensors in, a compiled :class:`Executable` run, torch tensors out.

:meth:`Executable.__call__` validates every input against the graph (names, ranks, named
dims, dtypes). The JIT has already matched the inputs to the graph through its cache key,
so :func:`make_runner` skips that and, for onnxruntime, calls the session directly.
:func:`make_torch_runner` does the same on torch tensors: for an onnxruntime graph without
bfloat16 inputs or outputs, one function converts (zero-copy on CPU), calls the session's
C ``run`` (the Python ``InferenceSession.run`` re-checks the feed names on every call) and
wraps the results; anything unusual (an error, another device, a tensor ``numpy()`` refuses,
a named dim past its ``graph.dim_max`` bound) takes the checked path, whose errors name the
input or the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from flora_graph.runtimes.executable import Executable

__all__ = ["Runner", "TorchRunner", "from_numpy", "make_runner", "make_torch_runner", "picker", "to_numpy"]

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
"""Positional arrays in ``graph.inputs`` order -> arrays in ``graph.outputs`` order."""

TorchRunner = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
"""Positional tensors in ``graph.inputs`` order -> tensors in ``graph.outputs`` order, on the inputs' device."""


def picker(positions: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """``args -> (args[i] for i in positions)`` as a tuple, in one C call where possible."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        only = positions[0]
        return lambda args: (args[only],)
    return lambda args: ()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU numpy view of ``t`` (a copy only where needed: other device, strides, bfloat16)."""
    try:
        a = t.numpy()  # the common case: a CPU tensor that needs no grad
    except (RuntimeError, TypeError):  # requires grad, another device, bfloat16, a conjugate/negative view
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return np.ascontiguousarray(t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16))
        a = t.resolve_conj().resolve_neg().numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


_PLAIN_KINDS = frozenset("biuf")


def from_numpy(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` as a torch tensor on ``device`` (zero-copy on CPU; ``a`` is owned by the caller)."""
    if a.dtype.kind in _PLAIN_KINDS and a.flags.writeable:
        t = torch.from_numpy(a)
    elif a.dtype.kind in _PLAIN_KINDS:
        t = torch.from_numpy(a.copy())
    else:  # ml_dtypes.bfloat16
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return t if device.type == "cpu" else t.to(device)


def _session_run(exe: Executable) -> Callable[[list[str], dict[str, np.ndarray], Any], list[np.ndarray]] | None:
    """``run(output_names, feeds, run_options)`` of ``exe``'s onnxruntime session, when its inputs and outputs are
    plain numpy: the pybind session's C ``run`` where there is one (called directly, no Python frame in between)."""
    session = getattr(exe, "session", None)
    plain = all(n.dtype != "bfloat16" for n in exe.graph.inputs) and all(
        n.dtype != "bfloat16" for n in exe.graph.outputs.values()
    )
    if exe.backend != "onnxruntime" or session is None or not plain:
        return None
    c_session = getattr(session, "_sess", None)  # the pybind session under InferenceSession
    if c_session is None or not callable(getattr(c_session, "run", None)):
        return session.run
    return c_session.run


def _bounds(exe: Executable) -> list[tuple[int, int, int]]:
    """``(input position, axis, maximum)`` of each named input dim that ``graph.dim_max`` bounds."""
    dim_max = getattr(exe.graph, "dim_max", None) or {}
    index = {n: i for i, n in enumerate(exe.input_names)}
    return [(index[n.name], axis, dim_max[d]) for n in exe.graph.inputs if n.name in index
            for axis, d in enumerate(n.shape) if isinstance(d, str) and d in dim_max]


def _within(bounds: list[tuple[int, int, int]], values: Sequence[Any]) -> bool:
    """Whether every bounded dim of ``values`` (arrays or tensors, in input order) is within its maximum."""
    return all(values[i].shape[axis] <= hi for i, axis, hi in bounds)


def make_runner(exe: Executable) -> Runner:
    """A function running ``exe`` on positional arrays already matched to its inputs."""
    names, outs = list(exe.input_names), list(exe.output_names)
    run = _session_run(exe)
    bounds = _bounds(exe)
    if run is not None:

        def run_session(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
            try:
                if bounds and not _within(bounds, arrays):
                    raise ValueError("past graph.dim_max")  # the checked path names the input and the dim
                return run(outs, dict(zip(names, arrays, strict=True)), None)
            except Exception:  # rerun through the checked path: its errors name the input or the graph
                result = exe(dict(zip(names, arrays, strict=True)))
                return [result[o] for o in outs]

        return run_session

    def run_checked(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = exe(dict(zip(names, arrays, strict=True)))
        return [result[o] for o in outs]

    return run_checked


def make_torch_runner(exe: Executable) -> TorchRunner:
    """A function running ``exe`` on positional torch tensors already matched to its inputs."""
    runner = make_runner(exe)
    cpu = torch.device("cpu")

    def run_arrays(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        device = tensors[0].device if tensors else cpu
        return [from_numpy(a, device) for a in runner([to_numpy(t) for t in tensors])]

    names, outs = list(exe.input_names), list(exe.output_names)
    run = _session_run(exe)
    if run is None:
        return run_arrays
    tensor_from_numpy = torch.from_numpy
    bounds = _bounds(exe)

    def run_session(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if bounds and not _within(bounds, tensors):
            return run_arrays(tensors)  # the checked path names the input and the dim
        try:  # numpy() refuses tensors that need grad, live off the CPU or are conjugate/negative views
            feeds = {n: t.numpy() for n, t in zip(names, tensors, strict=True) if t.is_contiguous()}
        except (RuntimeError, TypeError):
            return run_arrays(tensors)
        if len(feeds) != len(names):  # a non-contiguous input: to_numpy copies it
            return run_arrays(tensors)
        try:
            arrays = run(outs, feeds, None)
        except Exception:  # rerun through the checked path: its errors name the input or the graph
            return run_arrays(tensors)
        return list(map(tensor_from_numpy, arrays))  # onnxruntime's results are fresh, writeable arrays

    return run_session
