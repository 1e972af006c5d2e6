"""Cheap checks that a compiled graph's baked-in weights are still the model's weights.

A compiled graph holds copies of the weights it was built from, so every call first asks
"have the weights changed since?". Two signals answer it without touching weight data:

* **structure**: a process-wide epoch that torch's global registration hooks bump whenever
  any module gets a submodule, parameter or buffer assigned (``merge_all``, ``apply_lora``,
  ``module.weight = nn.Parameter(...)``). Only when the epoch moved is the model walked
  again and its structure (module, parameter and buffer identities) compared.
* **values**: each tensor's autograd version counter (bumped by every in-place op:
  ``p.copy_()``, ``p.add_()`` under ``no_grad``, ``load_state_dict``, optimizer steps) and its
  ``data_ptr`` (changed by ``p.data = other``).

Edits through ``p.data`` in place (``p.data.add_(1)``) bypass the version counter: torch gives
``.data`` a fresh counter on purpose, so no cheap signal sees them. ``check="content"`` keeps
a copy of the weights and compares them bit for bit on every call: exact, for the memory of
the copy and a read of all weights per call.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from flora_graph.errors import FloraGraphError

__all__ = ["CHECKS", "ModuleFingerprint", "TensorFingerprint", "WeightCheck", "bit_view", "check_mode", "structure_epoch"]

WeightCheck = Literal["version", "content"]
CHECKS: tuple[str, ...] = ("version", "content")

_epoch = [0]
_installed = [False]


def _bump(*_: Any) -> None:
    """Registration hook: count the event, keep the registered value (returns ``None``)."""
    _epoch[0] += 1


def structure_epoch() -> int:
    """A counter that grows whenever any module in the process registers a submodule, parameter or buffer.

    The first call installs torch's global registration hooks (``_bump`` only counts).
    """
    if not _installed[0]:
        from torch.nn.modules import module as _module

        _module.register_module_module_registration_hook(_bump)
        _module.register_module_parameter_registration_hook(_bump)
        _module.register_module_buffer_registration_hook(_bump)
        _installed[0] = True
    return _epoch[0]


def check_mode(check: str) -> WeightCheck:
    """Validate a ``check`` option (``"version"`` or ``"content"``)."""
    if check not in CHECKS:
        raise FloraGraphError(f"check_weights={check!r} must be one of {list(CHECKS)}")
    return check  # type: ignore[return-value]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers (so NaNs compare equal to themselves)."""
    t = t.detach()
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.contiguous().view(_BITS[t.element_size()]) if not t.dtype.is_complex else torch.view_as_real(t)
    return t


class TensorFingerprint:
    """Identity, version counter and data pointer of a tensor list; with ``check="content"``, their bits too.

    The tensors are held, so their identities cannot be reused while the fingerprint lives.
    Content mode (and any inference tensor, which has no version counter) keeps a copy of
    the tensors and compares bit for bit on every check: exact, at the price of the memory
    of the copy and a read of every weight per call.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], check: WeightCheck = "version") -> None:
        self.content = check == "content"
        self.tensors = list(tensors)
        self.state = self.state_of(self.tensors)
        self.versions = [s[1] for s in self.state]
        self.pointers = [s[2] for s in self.state]
        compare = [i for i, t in enumerate(self.tensors) if self.content or t.is_inference()]
        with torch.inference_mode(False), torch.no_grad():
            self.copies = {i: bit_view(self.tensors[i]).clone() for i in compare}

    @staticmethod
    def state_of(tensors: Iterable[torch.Tensor]) -> list[tuple[int, ...]]:
        """Identity, version counter (-1 for inference tensors) and data pointer of each tensor."""
        tensors = list(tensors)
        try:
            return [(id(t), t._version, t.data_ptr()) for t in tensors]
        except RuntimeError:  # an inference tensor keeps no version counter
            return [(id(t), -1 if t.is_inference() else t._version, t.data_ptr()) for t in tensors]

    def moved(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` differ from the snapshot in identity, version counter or data pointer.

        The per-call check of the JIT: C-level ``map``s, no tuple per tensor (content is not compared).
        """
        mine = self.tensors
        if tensors is not mine and (len(tensors) != len(mine) or not all(map(operator.is_, tensors, mine))):
            return True
        try:
            return list(map(_VERSION, tensors)) != self.versions or list(map(_DATA_PTR, tensors)) != self.pointers
        except RuntimeError:  # an inference tensor keeps no version counter
            return self.state_of(tensors) != self.state

    def changed(self, tensors: Sequence[torch.Tensor] | None = None) -> bool:
        """Whether the tensors (or ``tensors``, in their place) differ from the snapshot."""
        tensors = self.tensors if tensors is None else tensors
        if self.moved(tensors):
            return True
        return any(not torch.equal(bit_view(tensors[i]), c) for i, c in self.copies.items())


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _walk(model: nn.Module) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """The model's structure (identities of modules, parameters, buffers) and its distinct tensors."""
    structure: list[Any] = []
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for m in model.modules():
        structure.append((id(m), type(m)))
        for group in (m._parameters, m._buffers):
            for name, t in group.items():
                structure.append((name, id(t)))
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    tensors.append(t)
    return tuple(structure), tensors


class ModuleFingerprint:
    """Snapshot of a module's structure and weights; :meth:`changed` is cheap when nothing moved."""

    def __init__(self, model: nn.Module, check: WeightCheck = "version") -> None:
        self.model = model
        self.check = check
        self.epoch = structure_epoch()
        self.structure, tensors = _walk(model)
        self.tensors = TensorFingerprint(tensors, check)

    def structure_changed(self) -> bool:
        """Whether a submodule, parameter or buffer was replaced, added or removed since the snapshot."""
        epoch = structure_epoch()
        if epoch == self.epoch:
            return False
        structure, _ = _walk(self.model)
        if structure != self.structure:
            return True
        self.epoch = epoch  # something elsewhere in the process registered a module: not ours
        return False

    def changed(self) -> bool:
        """Whether anything a compiled graph baked in may differ from the model now."""
        return self.structure_changed() or self.tensors.changed()

    def requires_grad(self) -> bool:
        """Whether any weight requires grad (autograd would record through the model)."""
        return any(t.requires_grad for t in self.tensors.tensors)

