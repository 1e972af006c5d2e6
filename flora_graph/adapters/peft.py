"""PEFT interop: load and save Hugging Face PEFT LoRA adapter folders.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (adapter name removed).
:func:`load_peft_adapter` installs flora_graph adapters on a plain model from such a folder,
honouring ``r``, ``lora_alpha``, ``use_rslora`` (scale ``alpha / sqrt(r)``),
``rank_pattern``, ``alpha_pattern``, ``target_modules``, ``exclude_modules``,
``fan_in_fan_out``, ``modules_to_save`` and ``bias``; any option it cannot honour (DoRA,
layer selection, LoftQ, ...) is refused with :class:`AdapterError`, never dropped.
:func:`save_peft_adapter` writes the folder back for the adapters of a model.
Everything is validated before the model is touched; files are written atomically.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from flora_graph.adapters.apply import _set_submodule, adapters_of, match_target
from flora_graph.adapters.lora import LoRAAdapter, is_supported_base, unsupported_base_message
from flora_graph.errors import AdapterError
from flora_graph.ir.serialize import atomic_write_bytes

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "adapter_label",
    "load_peft_adapter",
    "peft_lora_layers",
    "read_peft_config",
    "save_peft_adapter",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Options that only steer how a *new* adapter is initialised: harmless when loading a trained one.
_INIT_ONLY = {"init_lora_weights", "eva_config", "corda_config", "lora_ga_config"}
# Options whose default values are all we support; anything else is refused by name.
_DEFAULTS: dict[str, Any] = {
    "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "megatron_config": None,
    "trainable_token_indices": None, "loftq_config": {}, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "monteclora_config": None, "layer_replication": None, "lora_bias": False,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}
_KNOWN = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "megatron_core",
    "qalora_group_size", "ensure_weight_tying",
} | _INIT_ONLY | set(_DEFAULTS)


def read_peft_config(folder: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``; refuse every option flora_graph cannot honour."""
    path = Path(folder) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: cannot read the PEFT config ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key, default in _DEFAULTS.items():
        value = cfg.get(key, default)
        if value not in (default, None, {}, [], False):
            raise AdapterError(f"{path}: option {key}={value!r} is not supported by flora_graph (refused, not ignored)")
    unknown = sorted(k for k in cfg if k not in _KNOWN and cfg[k] not in (None, False, {}, []))
    if unknown:
        raise AdapterError(f"{path}: unknown PEFT option(s) {unknown}; refusing rather than ignoring them")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise AdapterError(f"{path}: r must be a positive int, got {cfg.get('r')!r}")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{path}: bias={cfg.get('bias')!r} is not one of none/all/lora_only")
    if cfg.get("target_modules") is None:
        raise AdapterError(f"{path}: target_modules is missing (PEFT's per-architecture defaults are not guessed)")
    return cfg


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targets(model: nn.Module, cfg: dict[str, Any]) -> list[str]:
    targets = cfg["target_modules"]
    if targets == "all-linear":
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return [n for n in names if n != _output_head(model)]
    if isinstance(targets, list):
        targets = [str(t) for t in targets]
    exclude = cfg.get("exclude_modules")
    out = []
    for name, module in model.named_modules():
        if not name or not match_target(name, targets) or (exclude and match_target(name, exclude)):
            continue
        if not is_supported_base(module):
            if len(list(module.children())) == 0:
                raise AdapterError(f"module {name!r}: PEFT targets it, but {unsupported_base_message(module)}")
            continue
        out.append(name)
    return out


def _output_head(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def load_peft_adapter(model: nn.Module, folder: str | Path, *, adapter_name: str = "default",
                      adapter_cls: type[LoRAAdapter] = LoRAAdapter) -> list[str]:
    """Install the LoRA adapters of a PEFT folder on ``model``; return the adapted module paths.

    Raises :class:`AdapterError` naming the key or option at fault (missing key, wrong shape,
    ``r`` that disagrees with the weights, unsupported option) and leaves ``model`` untouched.
    """
    folder = Path(folder)
    cfg = read_peft_config(folder)
    wpath = folder / WEIGHTS_FILE
    try:
        state = st_load(wpath.read_bytes())
    except (OSError, SafetensorError, ValueError) as exc:
        raise AdapterError(f"{wpath}: cannot read the adapter weights ({exc})") from None
    # PEFT names tensors through its wrappers: "<module>.base_layer.bias", "<module>.modules_to_save.weight"
    # a saved module's trained copy wins over the plain alias PEFT also writes; the untouched
    # original ("original_module") is the base model's own and is not loaded
    order = sorted(state, key=lambda k: ".modules_to_save." in k)
    state = {_plain_key(k): state[k] for k in order if ".original_module." not in k}
    if adapters_of(model):
        raise AdapterError("model already carries adapters; load a PEFT adapter onto a plain model")
    names = _targets(model, cfg)
    if not names:
        raise AdapterError(f"{folder}: target_modules={cfg['target_modules']!r} match no Linear/Conv2d of {type(model).__name__}")
    built: list[tuple[str, LoRAAdapter]] = []
    used: set[str] = set()
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name in names:
            r = int(_pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"]))
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8)))
            eff_alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha  # our scale is alpha / r
            adapter = adapter_cls(model.get_submodule(name), r, eff_alpha, module_name=name, adapter_name=adapter_name)
            for part, param in (("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B)):
                key = f"{name}.{part}.weight"
                if key not in state:
                    raise AdapterError(f"{wpath}: missing key {PREFIX}{key} for module {name!r} (r={r})")
                t = state[key]
                if tuple(t.shape) != tuple(param.shape):
                    raise AdapterError(f"{wpath}: key {PREFIX}{key} has shape {tuple(t.shape)}, module {name!r} with r={r} needs {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(t.to(param.dtype))
                used.add(key)
            built.append((name, adapter))
    except BaseException:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
    extra = _load_plain_tensors(model, cfg, state, used, names, wpath)
    leftover = sorted(k for k in state if k not in used and k not in extra)
    if leftover:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise AdapterError(f"{wpath}: key {PREFIX}{leftover[0]} matches no adapted module ({len(leftover)} unused key(s))")
    with torch.no_grad():
        for target, value in extra.values():
            target.copy_(value.to(target.dtype))
    for name, adapter in built:
        _set_submodule(model, name, adapter)
    return names


def _load_plain_tensors(model: nn.Module, cfg: dict[str, Any], state: dict[str, torch.Tensor], used: set[str],
                        adapted: list[str], wpath: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``modules_to_save`` weights and LoRA biases: checked now, copied once all checks pass."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    saved = cfg.get("modules_to_save") or []
    for key, value in state.items():
        if key in used:
            continue
        module = key.rsplit(".", 1)[0]
        wanted = any(_under(key, m) for m in saved)
        if cfg.get("bias", "none") == "all" and key.endswith(".bias"):
            wanted = True
        if cfg.get("bias") == "lora_only" and key.endswith(".bias") and module in adapted:
            wanted = True
        if not wanted:
            continue
        if key not in own:
            raise AdapterError(f"{wpath}: key {PREFIX}{key} names no parameter of {type(model).__name__}")
        if tuple(own[key].shape) != tuple(value.shape):
            raise AdapterError(f"{wpath}: key {PREFIX}{key} has shape {tuple(value.shape)}, the model's is {tuple(own[key].shape)}")
        plan[key] = (own[key].data, value)
    for m in saved:
        if not any(_under(k, m) for k in plan):
            raise AdapterError(f"{wpath}: modules_to_save names {m!r}, but no weights for it are in the file")
    return plan


def _plain_key(key: str) -> str:
    """A PEFT file key as the plain model names the tensor."""
    return key.removeprefix(PREFIX).replace(".base_layer.", ".").replace(".modules_to_save.", ".")


def _under(key: str, module: str) -> bool:
    """Whether tensor ``key`` belongs to ``module``, named by path or by path suffix (PEFT's rule)."""
    return key.startswith(module + ".") or f".{module}." in f".{key}"


def save_peft_adapter(model: nn.Module, folder: str | Path, *, base_model_name_or_path: str | None = None,
                      modules_to_save: list[str] | None = None) -> Path:
    """Write the adapters of ``model`` as a PEFT folder (``adapter_config.json`` + safetensors).

    Ranks and scales that differ between modules go to ``rank_pattern``/``alpha_pattern``
    (exact module paths, anchored). ``modules_to_save`` names plain modules whose weights are
    saved whole. Returns the folder.
    """
    found = adapters_of(model)
    if not found:
        raise AdapterError(f"{type(model).__name__} has no adapters to save")
    ranks = {n: a.rank for n, a in found.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha_of = {n: a.scaling * a.rank for n, a in found.items()}  # scale = alpha / r
    alpha = max(set(alpha_of.values()), key=list(alpha_of.values()).count)
    tensors: dict[str, torch.Tensor] = {}
    for name, a in found.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = a.lora_B.detach().cpu().contiguous()
    for m in modules_to_save or []:
        for pname, p in model.get_submodule(m).named_parameters():
            tensors[f"{PREFIX}{m}.modules_to_save.{pname}"] = p.detach().cpu().contiguous()
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": sorted(found), "modules_to_save": modules_to_save or None,
        "rank_pattern": {f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(n)}": v for n, v in alpha_of.items() if v != alpha},
    }
    folder = Path(folder)
    atomic_write_bytes(folder / WEIGHTS_FILE, st_save(tensors))
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps(cfg, indent=2).encode())
    return folder


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> PEFT LoRA layer (a ``base_layer`` beside ``lora_A``/``lora_B`` dicts), for capture.

    Recognised by structure, so PEFT is not imported here.
    """
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(m, "base_layer", None), nn.Module)
    }


def adapter_label(module: nn.Module) -> str:
    """The adapter name a capture tags nodes with: ours, or a PEFT layer's active adapter."""
    name = getattr(module, "adapter_name", None)
    if isinstance(name, str):
        return name
    active = getattr(module, "active_adapters", None) or ["default"]
    return active[0] if isinstance(active, list | tuple) and len(active) == 1 else ",".join(map(str, active))
