"""``apply_lora`` and ``merge_all``: wrap and unwrap a model's layers by name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from flora_graph.adapters.lora import LoRAAdapter, is_supported_base, unsupported_base_message
from flora_graph.errors import AdapterError

__all__ = ["adapters_of", "apply_lora", "match_target", "merge_all", "unload_all"]

Target = str | re.Pattern[str]


def match_target(name: str, targets: str | Sequence[Target]) -> bool:
    """Whether module path ``name`` is selected.

    A single string is a regular expression matched against the whole path (PEFT's
    convention). In a sequence, a string selects a module by exact path or by suffix
    (``"q_proj"`` selects ``"layers.0.attn.q_proj"``), and a compiled pattern by full match.
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    for t in targets:
        if isinstance(t, re.Pattern):
            if t.fullmatch(name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _per_module(value: Any, name: str, what: str) -> Any:
    if not isinstance(value, dict):
        return value
    if name not in value:
        raise AdapterError(f"module {name!r}: the {what} dict has no entry for it (keys: {sorted(value)})")
    return value[name]


def adapters_of(model: nn.Module) -> dict[str, LoRAAdapter]:
    """Module path -> adapter, for every ``LoRAAdapter`` (or subclass) in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAAdapter)}


def apply_lora(
    model: nn.Module,
    target_modules: str | Sequence[Target],
    rank: int = 8,
    alpha: float = -1,
    adapter_cls: type[LoRAAdapter] = LoRAAdapter,
    **adapter_kwargs: Any,
) -> list[str]:
    """Wrap every matching ``nn.Linear``/``nn.Conv2d``/``nn.Conv1d``/``nn.Embedding`` in ``adapter_cls``; return the wrapped
    paths.

    All adapters are built before any is installed, so a bad rank or an unsupported
    matching module raises :class:`AdapterError` and leaves ``model`` untouched.
    ``rank`` and ``alpha`` may also be dicts from module path to value (per-module ranks).
    """
    if not isinstance(target_modules, str) and not isinstance(target_modules, Sequence):
        raise AdapterError(f"target_modules must be a regex string or a sequence of names, got {target_modules!r}")
    inside = {f"{n}." for n, _ in adapters_of(model).items()}
    chosen: list[tuple[str, nn.Module]] = []
    already_adapted = False
    for name, module in model.named_modules():
        if not name or not match_target(name, target_modules):
            continue
        if isinstance(module, LoRAAdapter) or any(name.startswith(p) for p in inside):
            already_adapted = True
            continue
        if not is_supported_base(module):
            # a container whose name matches a regex is not an error; a leaf layer is
            if len(list(module.children())) == 0:
                raise AdapterError(f"module {name!r}: {unsupported_base_message(module)}")
            continue
        chosen.append((name, module))
    if not chosen:
        if already_adapted:  # every match is adapted already: nothing to do, nothing wrapped twice
            return []
        raise AdapterError(f"no nn.Linear/nn.Conv2d/nn.Conv1d/nn.Embedding module of {type(model).__name__} matches target_modules={target_modules!r}")
    # building an adapter freezes its base layer's parameters: undo that if a later one fails
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    built = []
    try:
        for name, module in chosen:
            r = _per_module(rank, name, "rank")
            a = _per_module(alpha, name, "alpha")
            built.append((name, adapter_cls(module, r, a, module_name=name, **adapter_kwargs)))
    except BaseException:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
    for name, adapter in built:
        _set_submodule(model, name, adapter)
    return [n for n, _ in built]


def merge_all(model: nn.Module) -> list[str]:
    """Replace every adapter in ``model`` by its merged plain layer; return the merged paths.

    Every merge is computed before any module is replaced, so a non-finite merge raises
    :class:`AdapterError` and leaves ``model`` untouched.
    """
    merged = [(name, a.merge_to_original_layer()) for name, a in adapters_of(model).items()]
    for name, layer in merged:
        _set_submodule(model, name, layer)
    return [n for n, _ in merged]


def unload_all(model: nn.Module) -> list[str]:
    """Replace every adapter in ``model`` by its base layer, discarding the LoRA weights.

    The result is the model as it was before :func:`apply_lora` (the base layers' own
    ``requires_grad`` flags restored); returns the unloaded paths.
    """
    found = adapters_of(model)
    for name, adapter in found.items():
        base = adapter.base_layer
        for pname, p in base.named_parameters():
            p.requires_grad_(adapter._base_requires_grad.get(pname, True))
        _set_submodule(model, name, base)
    return list(found)
