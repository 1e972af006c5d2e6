"""The hot path: torch tensors in, a compiled :class:`Executable` run, torch tensors out.

:meth:`Executable.__call__` validates every input against the graph (names, ranks, named
dims, dtypes). The JIT has already matched the inputs to the graph through its cache key,
so :func:`make_runner` skips that and, for onnxruntime, calls the session directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from flora_graph.runtimes.executable import Executable

__all__ = ["Runner", "from_numpy", "make_runner", "to_numpy"]

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
"""Positional arrays in ``graph.inputs`` order -> arrays in ``graph.outputs`` order."""


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


def make_runner(exe: Executable) -> Runner:
    """A function running ``exe`` on positional arrays already matched to its inputs."""
    names, outs = list(exe.input_names), list(exe.output_names)
    session = getattr(exe, "session", None)
    plain = all(n.dtype != "bfloat16" for n in exe.graph.inputs) and all(
        n.dtype != "bfloat16" for n in exe.graph.outputs.values()
    )
    if exe.backend == "onnxruntime" and session is not None and plain:
        run = session.run

        def run_session(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
            try:
                return run(outs, dict(zip(names, arrays, strict=True)))
            except Exception:  # rerun through the checked path: its errors name the input or the graph
                result = exe(dict(zip(names, arrays, strict=True)))
                return [result[o] for o in outs]

        return run_session

    def run_checked(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = exe(dict(zip(names, arrays, strict=True)))
        return [result[o] for o in outs]

    return run_checked
