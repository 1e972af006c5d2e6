"""``flora_graph.jit(model)``: capture, optimize and compile on the first call, reuse after.

:class:`JitModule` wraps a model. A call computes a cache key from its arguments (shapes,
with the dims that are dynamic replaced by their name, dtypes, devices) and runs the
executable cached under it, building one on a miss:

1. ``torch.export`` the model for that signature (dynamic dims as ``torch.export.Dim``),
   kept as a *program* that survives weight changes;
2. convert the program to the IR with the current weights (the capture table), run the
   ``preset`` pipeline, compile for ``backend``; counted in :attr:`JitModule.compile_count`.

Weights: every call first checks a :class:`~flora_graph.torch_jit.fingerprint.ModuleFingerprint`.
New values (``copy_``, in-place ops, ``p.data = t``, ``load_state_dict``) drop the compiled
executables and rebuild them from the kept programs; a new structure (``merge_all``,
``apply_lora``, replaced modules) drops the programs too. ``p.data`` edits in place are
only seen with ``check_weights="content"`` (see :mod:`~flora_graph.torch_jit.fingerprint`).

Eager calls, each announced by one warning per wrapper: a model in training mode, autograd
recording (grad enabled and a weight or input requiring grad: the compiled graph has no
backward), and, with ``fallback="eager"`` only, a model the compiler cannot capture.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from flora_graph.errors import FloraGraphError, GraphError, UnsupportedOpError
from flora_graph.frontend.capture import convert_fx_graph, trace_with_torch_export
from flora_graph.ir import Graph
from flora_graph.passes.optimize import optimize
from flora_graph.runtimes.executable import compile as compile_graph
from flora_graph.torch_jit.fingerprint import ModuleFingerprint, WeightCheck, check_mode
from flora_graph.torch_jit.presets import check_preset, resolve_preset
from flora_graph.torch_jit.runner import TorchRunner, make_torch_runner, picker

__all__ = ["JitFallbackWarning", "JitModule", "JitStats", "jit"]

FALLBACKS = (None, "eager")
_POLICY_NAMES = {2: "batch and sequence dims", 1: "batch dims", 0: "no dims"}


class JitFallbackWarning(UserWarning):
    """A jitted model ran eagerly instead of through its compiled graph (emitted once per reason)."""


@dataclass
class JitStats:
    """Counters of a :class:`JitModule`."""

    calls: int = 0
    captures: int = 0
    """``torch.export`` runs (one per new structure and signature)."""
    compiles: int = 0
    """IR conversions + optimizations + backend compilations."""
    eager_calls: int = 0
    invalidations: int = 0
    """Times a weight or structure change dropped the compiled executables."""


@dataclass
class _Input:
    """Where a graph input comes from in a call: ``args[index]`` or ``kwargs[name]``."""

    name: str
    index: int | None

    def get(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[self.index] if self.index is not None else kwargs[self.name]


@dataclass
class _Program:
    """One ``torch.export`` of the model for one signature, reusable while the structure holds."""

    ep: Any
    module: nn.Module  # the module exported (a PeftModel's base model)
    adapters: dict[str, Any]
    inputs: list[_Input]
    dynamic_dims: dict[str, dict[int, str]]
    out_spec: Any


class _Compiled:
    """An executable for one signature: torch in, torch out in the model's output structure."""

    def __init__(self, graph: Graph, runner: TorchRunner, inputs: list[_Input], out_spec: Any) -> None:
        self.graph, self.runner, self.inputs, self.out_spec = graph, runner, inputs, out_spec
        self.single = out_spec.is_leaf()
        positions = [i.index for i in inputs]
        # one signature (cache key) fixes which inputs come positionally: pick those in one C call
        self.pick = picker(positions) if None not in positions else None  # type: ignore[arg-type]

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        tensors = self.pick(args) if self.pick is not None else [i.get(args, kwargs) for i in self.inputs]
        outs = self.runner(tensors)
        return outs[0] if self.single else pytree.tree_unflatten(outs, self.out_spec)


_EAGER = object()  # a program slot for a model that runs eagerly (fallback="eager")


class JitModule(nn.Module):
    """A model compiled by flora_graph on first call; see :func:`jit`.

    Attributes:
        stats: :class:`JitStats` counters (``compile_count`` is ``stats.compiles``).
        graphs: the optimized IR graph of each cached signature.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        backend: str = "onnxruntime",
        preset: str = "fused",
        dynamic: bool = True,
        fallback: str | None = None,
        check_weights: WeightCheck = "version",
        **backend_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise FloraGraphError(f"flora_graph.jit wraps an nn.Module, got {type(model).__name__}")
        check_preset(preset, "flora_graph.jit")
        if fallback not in FALLBACKS:
            raise FloraGraphError(f"fallback={fallback!r} must be None (raise) or 'eager'")
        self._orig_mod = model
        object.__setattr__(self, "_model", model)  # the same module, read per call without nn.Module.__getattr__
        self.backend, self.preset, self.dynamic, self.fallback = backend, preset, bool(dynamic), fallback
        self.check_weights = check_mode(check_weights)
        self.backend_options = dict(backend_options)
        self.stats = JitStats()
        self._policy = 2 if self.dynamic else 0  # which dims are made dynamic: see _POLICY_NAMES
        self._programs: dict[tuple, _Program | object] = {}
        self._compiled: dict[tuple, _Compiled | object] = {}
        self._fingerprint = ModuleFingerprint(model, self.check_weights)
        self._warned: set[str] = set()
        signed = model.get_base_model() if _is_peft_model(model) else model  # trace_with_torch_export captures a PeftModel's base
        params = inspect.signature(signed.forward).parameters.values()
        self._params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        self._variadic = len(self._params) != len(params)

    # ------------------------------------------------------------------ public
    @property
    def module(self) -> nn.Module:
        """The wrapped model."""
        return self._orig_mod

    @property
    def compile_count(self) -> int:
        """How many times a graph was converted, optimized and compiled."""
        return self.stats.compiles

    @property
    def graphs(self) -> list[Graph]:
        """The optimized graphs currently cached, one per signature."""
        return [c.graph for c in self._compiled.values() if isinstance(c, _Compiled)]

    def invalidate(self) -> None:
        """Drop every cached program and executable (the next call captures again)."""
        self._programs.clear()
        self._compiled.clear()
        self._fingerprint = ModuleFingerprint(self._orig_mod, self.check_weights)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled graph for these arguments, compiling it first if needed."""
        self.stats.calls += 1
        model = self._model
        if model.training:
            return self._eager("training", "the model is in training mode; call .eval() to use the compiled graph",
                               args, kwargs)
        if torch.is_grad_enabled() and self._needs_grad(args, kwargs):
            return self._eager("grad", "autograd is recording (grad enabled and a weight or input requires grad) and "
                               "the compiled graph has no backward; run inference under torch.no_grad()", args, kwargs)
        self._refresh()
        key = self._key(args, kwargs)
        if key is None:
            exc = GraphError(f"flora_graph.jit compiles tensor arguments only; {type(model).__name__} got "
                             f"{[type(v).__name__ for v in (*args, *kwargs.values())]}")
            if self.fallback != "eager":
                raise exc
            return self._eager_fallback(args, kwargs, exc)
        entry = self._compiled.get(key)
        if entry is None:
            entry = self._compile(args, kwargs)
        if entry is _EAGER:
            return self._eager_fallback(args, kwargs, None)
        return entry(args, kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("_orig_mod")
            if inner is None:
                raise
            return getattr(inner, name)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, preset={self.preset!r}, dynamic={self.dynamic}, fallback={self.fallback!r}"

    # ------------------------------------------------------------------ checks
    def _needs_grad(self, args: tuple, kwargs: dict) -> bool:
        if self._fingerprint.requires_grad():
            return True
        leaves = [*args, *kwargs.values()]
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)

    def _refresh(self) -> None:
        """Drop what the weights or structure no longer match."""
        fp = self._fingerprint
        structure = fp.structure_changed()
        if not structure and not fp.tensors.changed():
            return
        self._drop(structure)

    def _drop(self, structure: bool) -> None:
        """Forget the executables (and, for a new ``structure``, the exported programs); snapshot anew."""
        if structure:
            self._programs.clear()
        self._compiled.clear()
        self.stats.invalidations += 1
        self._fingerprint = ModuleFingerprint(self._orig_mod, self.check_weights)

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"flora_graph.jit({type(self._orig_mod).__name__}): {message}", JitFallbackWarning,
                          stacklevel=_caller_level())

    def _eager(self, reason: str, message: str, args: tuple, kwargs: dict) -> Any:
        self._warn_once(reason, f"running eagerly: {message}")
        self.stats.eager_calls += 1
        return self._orig_mod(*args, **kwargs)

    def _eager_fallback(self, args: tuple, kwargs: dict, exc: FloraGraphError | None) -> Any:
        if exc is not None:
            self._eager_fallback_warning(exc)
        self.stats.eager_calls += 1
        return self._orig_mod(*args, **kwargs)

    # ------------------------------------------------------------------ keys
    def _key(self, args: tuple, kwargs: dict) -> tuple | None:
        """The cache key of a call; ``None`` when an argument is neither a tensor nor ``None``."""
        batch: dict[int, int] = {}
        seq: dict[int, int] = {}
        policy = self._policy
        parts: list[Any] = []
        for value in (*args, *kwargs.values()):
            if value is None:
                parts.append(None)
            elif isinstance(value, torch.Tensor):
                shape: list[Any] = list(value.shape)
                if policy >= 1 and shape and shape[0] >= 2:
                    shape[0] = ("batch", batch.setdefault(shape[0], len(batch)))
                if policy >= 2 and len(shape) >= 2 and shape[1] >= 2 and _has_sequence_axis(value):
                    shape[1] = ("seq", seq.setdefault(shape[1], len(seq)))
                parts.append((value.dtype, value.device, tuple(shape)))
            else:
                return None
        return (policy, tuple(kwargs), *parts)

    def _lower_policy(self, dynamic_dims: dict[str, dict[int, str]], exc: Exception) -> None:
        """Ask for fewer dynamic dims after ``exc``; re-raise it when there is nothing left to drop."""
        kinds = {name.split("_")[0] for axes in dynamic_dims.values() for name in axes.values()}
        if not kinds:
            raise exc
        self._policy = 1 if "seq" in kinds else 0

    # ------------------------------------------------------------------ compile
    def _compile(self, args: tuple, kwargs: dict) -> _Compiled | object:
        try:
            while True:
                key, program = self._program(args, kwargs)
                if program is _EAGER:
                    entry: _Compiled | object = _EAGER
                    break
                try:
                    entry = self._lower(program)  # type: ignore[arg-type]
                    break
                except GraphError as exc:  # e.g. a reshape the IR cannot express with symbolic dims
                    self._lower_policy(program.dynamic_dims, exc)  # type: ignore[union-attr]
                    self._programs.pop(key, None)
        except (UnsupportedOpError, GraphError) as exc:
            if self.fallback != "eager":
                raise
            key = self._key(args, kwargs)
            self._programs[key] = _EAGER
            self._eager_fallback_warning(exc)
            entry = _EAGER
        self._compiled[key] = entry
        return entry

    def _eager_fallback_warning(self, exc: FloraGraphError) -> None:
        ops = getattr(exc, "ops", None)
        what = f"unsupported op(s) {', '.join(sorted(ops))}" if ops else str(exc)
        self._warn_once("fallback", f"fallback='eager': running eagerly, the model cannot be compiled: {what}")

    def _program(self, args: tuple, kwargs: dict) -> tuple[tuple, _Program | object]:
        """The kept program for this call's signature, exporting one (lowering the dynamic policy on failure)."""
        while True:
            key = self._key(args, kwargs)
            found = self._programs.get(key)
            if found is not None:
                return key, found
            try:
                program = self._export(key, args, kwargs)
            except _ExportFailed as exc:
                self._lower_policy(exc.dynamic_dims, GraphError(str(exc)))
                continue
            self._programs[key] = program
            return key, program

    def _bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], list[_Input]]:
        if self._variadic:
            raise GraphError(f"flora_graph.jit cannot capture {type(self._orig_mod).__name__}.forward(*args/**kwargs)")
        names = [p.name for p in self._params]
        if len(args) > len(names):
            raise GraphError(f"{type(self._orig_mod).__name__}.forward takes {len(names)} arguments, got {len(args)}")
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        inputs, where = {}, []
        for name, value in bound.items():
            if value is None:
                continue
            inputs[name] = value
            where.append(_Input(name, names.index(name) if name not in kwargs else None))
        return inputs, where

    def _export(self, key: tuple, args: tuple, kwargs: dict) -> _Program:
        inputs, where = self._bind(args, kwargs)
        dynamic_dims: dict[str, dict[int, str]] = {}
        for name, dims in zip(inputs, [p for p in key[2:] if p is not None], strict=True):
            axes = {ax: (kind if g == 0 else f"{kind}_{g}") for ax, d in enumerate(dims[2]) if isinstance(d, tuple)
                    for kind, g in [d]}
            if axes:
                dynamic_dims[name] = axes
        try:
            ep, exported, adapters, *_ = trace_with_torch_export(self._orig_mod, inputs, dynamic_dims)
        except GraphError as exc:
            what = _POLICY_NAMES[self._policy] if dynamic_dims else "no dims"
            failed = _ExportFailed(f"{exc} (with {what} dynamic)")
            failed.dynamic_dims = dynamic_dims
            raise failed from exc
        self.stats.captures += 1
        return _Program(ep, exported, adapters, where, dynamic_dims, ep.call_spec.out_spec)

    def _lower(self, program: _Program) -> _Compiled:
        """Convert the program with the model's current weights, optimize, compile."""
        model, ep = program.module, program.ep
        sig = ep.graph_signature
        current = dict(model.named_parameters(remove_duplicate=False))
        current.update(model.named_buffers(remove_duplicate=False))
        saved = {**ep.state_dict, **ep.constants}
        fqns = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        weights = {n: (fqn, current.get(fqn, saved.get(fqn))) for n, fqn in fqns.items()}
        graph = convert_fx_graph(ep.graph, weights, program.adapters, program.dynamic_dims, type(model).__name__)
        graph = optimize(graph, resolve_preset(graph, self.preset), backend=self.backend)  # BACKEND_DEFAULTS, as flora_graph.model_export applies them
        exe = compile_graph(graph, self.backend, **self.backend_options)
        self.stats.compiles += 1
        return _Compiled(graph, make_torch_runner(exe), _order(graph, program.inputs), program.out_spec)


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside this package's jit and torch's module call machinery."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_HERE) or frame.f_code.co_filename == _MODULE_PY):
        frame, level = frame.f_back, level + 1
    return level


_HERE = os.path.dirname(os.path.abspath(__file__))
_MODULE_PY = inspect.getsourcefile(nn.Module) or ""


class _ExportFailed(Exception):
    """torch.export refused the model with the dynamic dims asked for (``dynamic_dims``)."""

    dynamic_dims: dict[str, dict[int, str]]


def _is_peft_model(model: nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def _has_sequence_axis(t: torch.Tensor) -> bool:
    """Token ids (integer ``[batch, seq, ...]``) and float ``[batch, seq, features]`` inputs."""
    return (not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool) or t.dim() == 3


def _order(graph: Graph, inputs: list[_Input]) -> list[_Input]:
    """The call's inputs in ``graph.inputs`` order (by name; positionally when export renamed them)."""
    by_name = {i.name: i for i in inputs}
    names = [n.name for n in graph.inputs]
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    if len(names) != len(inputs):
        raise GraphError(f"graph inputs {names} do not match the call's tensors {list(by_name)}")
    return list(inputs)


def jit(
    model: nn.Module,
    backend: str = "onnxruntime",
    preset: str = "fused",
    dynamic: bool = True,
    fallback: str | None = None,
    *,
    check_weights: WeightCheck = "version",
    **backend_options: Any,
) -> JitModule:
    """Wrap ``model`` so that its first call captures and compiles it, and later calls reuse the result.

    Args:
        model: the model (``LoRAAdapter``s and all). Compiled in eval mode, for inference.
        backend: a flora_graph backend (``onnxruntime``, ``numpy``, ``torchscript``, ``torch-export``).
        preset: ``fused`` (adapters kept, low-rank products fused), ``merged``, ``unfused``, or
            ``auto`` (``merged`` unless a weight is float16/bfloat16, then ``fused``; see
            :mod:`flora_graph.torch_jit.presets`).
        dynamic: keep batch dims (axis 0, size >= 2; sizes shared across inputs are one dim) and
            sequence dims (axis 1 of integer token inputs and of 3-D float inputs) symbolic, so a
            new size reuses the compiled graph; where torch.export cannot keep the sequence (or
            batch) dims symbolic it retries with fewer. ``False``: each new shape compiles once.
        fallback: ``None`` raises :class:`UnsupportedOpError` (or ``GraphError``) for a model that
            cannot be compiled; ``"eager"`` warns once, naming the ops, and runs the model eagerly.
        check_weights: ``"version"`` (cheap; see :mod:`flora_graph.torch_jit.fingerprint`) or ``"content"``
            (also hashes the weights on every call, catching ``p.data`` edits in place).
        **backend_options: passed to :func:`flora_graph.runtimes.compile` (for onnxruntime:
            ``intra_op_threads``, ``inter_op_threads``, ``allow_spinning``, ``graph_optimization_level``).

    Returns:
        A :class:`JitModule`: call it like the model; outputs are torch tensors in the model's
        output structure, on the inputs' device.
    """
    return JitModule(model, backend=backend, preset=preset, dynamic=dynamic, fallback=fallback,
                     check_weights=check_weights, **backend_options)

