"""PEFT interop: load and save Hugging Face PEFT LoRA adapter folders.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (adapter name removed).
:func:`load_peft_adapter` installs flora_graph adapters on a plain model from such a folder,
honouring ``r``, ``lora_alpha``, ``use_rslora`` (scale ``alpha / sqrt(r)``),
``rank_pattern``, ``alpha_pattern``, ``target_modules``, ``exclude_modules``,
``layers_to_transform`` / ``layers_pattern`` (only the layers named), ``fan_in_fan_out``,
``modules_to_save`` and ``bias``; any option it cannot honour (DoRA, LoftQ, a LoRA bias,
...) is refused with :class:`AdapterError`, never dropped. AdaLoRA folders (:data:`ADALORA`) and PEFT's other adapter
types (:data:`THROUGH_PEFT`) are read through PEFT's own layers (:func:`peft_installed`), by the callers that can.
The config is input: every field is type-checked, and its regexes (``rank_pattern`` /
``alpha_pattern`` keys, ``layers_pattern``, a string ``target_modules`` / ``exclude_modules``) are compiled with
an ``AdapterError`` naming the key and matched within a time bound
(:mod:`flora_graph.adapters.patterns`), so no config raises a raw error or hangs the loader.
:func:`save_peft_adapter` writes the folder back for the adapters of a model.
Everything is validated before the model is touched; a folder is written atomically.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from flora_graph.adapters.apply import _set_submodule, adapters_of, match_target
from flora_graph.adapters.lora import LoRAAdapter, is_supported_base, unsupported_base_message
from flora_graph.adapters.patterns import BoundedPattern, compile_pattern
from flora_graph.errors import AdapterError
from flora_graph.storage import staged_folder, write_new

__all__ = [
    "ADALORA",
    "CONFIG_FILE",
    "THROUGH_PEFT",
    "WEIGHTS_FILE",
    "adapter_label",
    "fit_vocab",
    "load_peft_adapter",
    "merge_peft",
    "peft_installed",
    "peft_lora_layers",
    "read_peft_config",
    "save_peft_adapter",
    "saved_vocab",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Options that only steer how a *new* adapter is initialised: harmless when loading a trained one.
_INIT_ONLY = {"init_lora_weights", "eva_config", "corda_config", "lora_ga_config"}
# Options whose default values are all we support; anything else is refused by name.
_DEFAULTS: dict[str, Any] = {
    "use_dora": False, "megatron_config": None,
    "trainable_token_indices": None, "loftq_config": {}, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "monteclora_config": None, "layer_replication": None, "lora_bias": False,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}
_KNOWN = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "layers_to_transform", "layers_pattern",
} | _INIT_ONLY | set(_DEFAULTS)

_FIRST_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
"""PEFT's layer index of a module path without ``layers_pattern``: its first numbered segment."""


PEFT_LAYERS_ONLY = ("use_dora", "target_parameters", "trainable_token_indices", "lora_bias")
"""Options only PEFT's own layers run (:func:`load_peft_adapter` refuses them): DoRA's magnitude, LoRA on
parameters (``target_parameters``: a mixture of experts' 3-D expert tensors, which PEFT's ``all-linear`` adds
on models whose experts are fused, such as Qwen3-MoE and OLMoE in transformers 5), trainable tokens
(``trainable_token_indices``: new embedding rows for the tokens it names, beside the LoRA), and a bias on each
LoRA's up projection (``lora_bias``)."""


def merge_peft(adapted: nn.Module) -> nn.Module:
    """PEFT's ``merge_and_unload`` of the PEFT model ``adapted``: the plain model with its adapters in the weights.

    A layer without a bias of its own under a LoRA with a bias (``lora_bias``), which PEFT refuses to merge, first
    gets a bias of zeros (the same outputs), so that the merged layer holds the LoRA's scaled bias."""
    from peft.tuners import lora

    with torch.no_grad():
        for mod in adapted.modules():
            if isinstance(mod, lora.LoraLayer) and any(getattr(mod, "lora_bias", {}).values()):
                base = mod.get_base_layer()
                if isinstance(base, nn.Linear) and base.bias is None:
                    base.bias = nn.Parameter(torch.zeros(base.out_features, dtype=base.weight.dtype,
                                                         device=base.weight.device), requires_grad=False)
    return adapted.merge_and_unload()


ADALORA = "ADALORA"
"""The ``peft_type`` of an AdaLoRA folder: each LoRA ``x (A * E)^T B^T * lora_alpha / (ranknum + 1e-5)``, its ranks
pruned through the learned diagonal ``E`` (the ranks it kept are those its file holds, ``rank_pattern``). Only PEFT's
own layers (``SVDLinear``) read one: :func:`load_peft_adapter` refuses it."""

_ADALORA_SCHEDULE = frozenset({"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                              "total_step"})
"""AdaLoRA's options that steer its rank budget while it trains: nothing a trained adapter's outputs depend on."""


THROUGH_PEFT = frozenset({"IA3", "LOHA", "LOKR", "VERA", "OFT", "BOFT", "HRA", "FOURIERFT", "VBLORA", "RANDLORA",
                          "SHIRA", "C3A", "MISS", "LN_TUNING", "DELORA", "BEFT", "DEFT", "FROD", "GLORA", "GRALORA",
                          "HIRA", "OSF", "PACA", "PEANUT", "PSOFT", "PVERA", "ROAD", "SUPERTUNING", "TINYLORA",
                          "UNILORA", "WAVEFT"})
"""PEFT's weight-adapter types other than LoRA that flora_graph installs through PEFT itself (IA3's scaling vectors,
LoHa's Hadamard and LoKr's Kronecker products, VeRA's shared projections, OFT's and BOFT's rotations, HRA's
reflections, FourierFT, VB-LoRA, RandLoRA, SHiRA, C3A, MiSS, LayerNorm tuning, DeLoRA, and BEFT's biases, DeFT,
FRoD, GLoRA, GraLoRA, HiRA, OSF, PaCA, PEANuT, PSOFT, PVeRA, RoAd's rotations, SuperTuning, TinyLoRA, Uni-LoRA,
WaveFT): a capture runs the ops their layers run (or merges those it cannot trace,
:func:`flora_graph.frontend.traceable.merged_peft_layers`) and the ``merged`` preset takes PEFT's ``merge_and_unload``; a generation package merges one into its base
(``--merge-adapter``), and swaps one whose layers PEFT merges into a ``Linear``'s weight (every type but LN tuning,
which adapts a norm) as a slot of each module's change ``W' - W`` of the package's base weight
(:func:`flora_graph.serving.slots.params_through_peft`), refusing LN tuning by name. Each is checked against eager PEFT
(``tests/adapters/test_peft_types.py``); a type not named here is refused."""


def needs_peft_layers(cfg: Mapping[str, Any]) -> list[str]:
    """The :data:`PEFT_LAYERS_ONLY` options a checked config sets, and ``"peft_type"`` for an AdaLoRA one or one of
    :data:`THROUGH_PEFT`."""
    return [k for k in PEFT_LAYERS_ONLY if cfg.get(k) not in (None, False, [])] + (
        ["peft_type"] if cfg.get("peft_type") == ADALORA or _through_peft(cfg) else [])


def _through_peft(cfg: Mapping[str, Any]) -> bool:
    """Whether ``cfg`` is of an adapter type of :data:`THROUGH_PEFT`."""
    kind = cfg.get("peft_type")
    return isinstance(kind, str) and kind in THROUGH_PEFT


def read_peft_config(folder: str | Path, *, peft_layers: bool = False) -> dict[str, Any]:
    """Read and check ``adapter_config.json``; refuse every option flora_graph cannot honour.

    ``peft_layers``: accept the :data:`PEFT_LAYERS_ONLY` options, AdaLoRA folders (:data:`ADALORA`) and the other
    adapter types of :data:`THROUGH_PEFT` (for callers that install the folder through PEFT itself, as
    :func:`flora_graph.model_export.export_model` does; :func:`load_peft_adapter` cannot). A folder of one of
    :data:`THROUGH_PEFT` is returned as it is: PEFT checks its options as it loads it."""
    path = Path(folder) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{path}: cannot read the PEFT config ({str(exc)[:300] or type(exc).__name__})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind == ADALORA and not peft_layers:
        raise AdapterError(f"{path}: peft_type {ADALORA!r} (AdaLoRA: each rank scaled by a learned singular value) is "
                           "read through PEFT's own layers, not installed as flora_graph's LoRA adapters; capture the "
                           "PEFT model itself, export with `flora-graph export MODEL --adapter DIR`, which installs it "
                           "through PEFT, or serve it hot-swappable in a GenAI package (`--format genai --adapter "
                           "NAME=DIR`)")
    if _through_peft(cfg):
        if not peft_layers:
            raise AdapterError(f"{path}: peft_type {kind!r} is not a LoRA that flora_graph's adapters hold; capture the "
                               "PEFT model itself, or export with `flora-graph export MODEL --adapter DIR`, which "
                               "installs it through PEFT (or bake it into a GenAI package: --merge-adapter DIR)")
        return cfg
    if kind not in ("LORA", ADALORA):
        raise AdapterError(f"{path}: peft_type {kind!r} is not supported (LORA, ADALORA and "
                           f"{', '.join(sorted(THROUGH_PEFT))})"[:700])
    read = cfg
    if cfg.get("peft_type") == ADALORA:  # its rank_pattern: the ranks each module kept, not a rank per regex
        cfg = _adalora_checked(cfg, path)
    for key, default in _DEFAULTS.items():
        value = cfg.get(key, default)
        if key in PEFT_LAYERS_ONLY and peft_layers:
            continue
        if key == "use_dora" and value is True:
            raise AdapterError(f"{path}: option use_dora=True (DoRA) rescales each base weight row by a learned "
                               "magnitude over its norm, which flora_graph's LoRA adapters do not hold; capture the "
                               "PEFT model itself, export with `flora-graph export MODEL --adapter DIR`, which "
                               "installs a DoRA folder through PEFT, or serve it hot-swappable in a GenAI package "
                               "(`--format genai --adapter NAME=DIR`)")
        if key == "target_parameters" and value not in (None, []):
            raise AdapterError(f"{path}: option target_parameters={value!r} (LoRA on parameters, such as a mixture "
                               "of experts' expert tensors) is not held by flora_graph's LoRA adapters; capture the "
                               "PEFT model itself, export with `flora-graph export MODEL --adapter DIR`, which "
                               "installs such a folder through PEFT, or serve it hot-swappable in a GenAI package "
                               "(`--format genai --adapter NAME=DIR`), which reads it through PEFT"[:700])
        if key == "trainable_token_indices" and value not in (None, [], {}):
            raise AdapterError(f"{path}: option trainable_token_indices={value!r} (embedding rows of their own for the "
                               "tokens it names) is not held by flora_graph's LoRA adapters; capture the PEFT model "
                               "itself, export with `flora-graph export MODEL --adapter DIR`, which installs such a "
                               "folder through PEFT, or serve it hot-swappable in a GenAI package "
                               "(`--format genai --adapter NAME=DIR`)"[:700])
        if key == "lora_bias" and value is True:
            raise AdapterError(f"{path}: option lora_bias=True (a bias on each LoRA's up projection) is not held by "
                               "flora_graph's LoRA adapters; capture the PEFT model itself, export with `flora-graph "
                               "export MODEL --adapter DIR`, which installs such a folder through PEFT, or serve it "
                               "hot-swappable in a GenAI package (`--format genai --adapter NAME=DIR`)")
        if value not in (default, None, {}, [], False):
            raise AdapterError(f"{path}: option {key}={value!r} is not supported by flora_graph (refused, not ignored)")
    known = _KNOWN | (_ADALORA_SCHEDULE if cfg.get("peft_type") == ADALORA else frozenset())
    unknown = sorted(k for k in cfg if k not in known and cfg[k] not in (None, False, {}, []))
    if unknown:
        raise AdapterError(f"{path}: unknown PEFT option(s) {unknown}; refusing rather than ignoring them")
    if not _is_int(cfg.get("r")) or cfg["r"] <= 0:
        raise AdapterError(f"{path}: r must be a positive int, got {cfg.get('r')!r}")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{path}: bias={cfg.get('bias')!r} is not one of none/all/lora_only")
    if cfg.get("target_modules") is None:
        raise AdapterError(f"{path}: target_modules is missing (PEFT's per-architecture defaults are not guessed)")
    _check_fields(cfg, path)
    _patterns(cfg, path)  # an invalid regex is refused here, before any model is touched
    _layer_filter(cfg, path)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), str):
            _selector(cfg[key], f"{path}: {key}")
    return read


def _adalora_checked(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """An AdaLoRA config without its ``rank_pattern`` (``{module: [kept, ...]}``, which PEFT applies as it loads the
    folder, its tensors already cut to the ranks kept), checked to be that; the rest is checked as a LoRA config's."""
    pattern = cfg.get("rank_pattern")
    if pattern is not None and not (isinstance(pattern, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(b, bool) for b in v) for k, v in pattern.items())):
        raise AdapterError(f"{path}: an AdaLoRA rank_pattern must be an object {{module: [true/false per rank]}}, got "
                           f"{pattern!r}"[:500])
    if not _is_int(cfg.get("init_r")) or cfg["init_r"] <= 0:
        raise AdapterError(f"{path}: init_r (AdaLoRA's rank before pruning) must be a positive int, got "
                           f"{cfg.get('init_r')!r}"[:500])
    return {k: v for k, v in cfg.items() if k != "rank_pattern"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_fields(cfg: dict[str, Any], path: Path) -> None:
    """The types of the fields that are honoured; ``AdapterError`` naming the field."""
    def strings(key: str, value: Any, *, single: bool) -> None:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok and not (single and isinstance(value, str)):
            want = "a string (regex) or a list of module names" if single else "a list of module names"
            raise AdapterError(f"{path}: {key} must be {want}, got {value!r}"[:500])

    strings("target_modules", cfg["target_modules"], single=True)
    if cfg.get("exclude_modules") is not None:
        strings("exclude_modules", cfg["exclude_modules"], single=True)
    if cfg.get("modules_to_save") is not None:
        strings("modules_to_save", cfg["modules_to_save"], single=False)
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise AdapterError(f"{path}: lora_alpha must be a finite number, got {cfg['lora_alpha']!r}"[:500])
    for key in ("use_rslora", "fan_in_fan_out", "inference_mode"):
        if cfg.get(key) not in (None, True, False):
            raise AdapterError(f"{path}: {key} must be true or false, got {cfg[key]!r}"[:500])
    for key, ok, want in (("rank_pattern", lambda v: _is_int(v) and v > 0, "a positive int"),
                          ("alpha_pattern", _is_number, "a finite number")):
        patterns = cfg.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterError(f"{path}: {key} must be an object {{regex: value}}, got {patterns!r}"[:500])
        for k, v in patterns.items():
            if not ok(v):
                raise AdapterError(f"{path}: {key}[{k!r}] must be {want}, got {v!r}"[:500])


def _patterns(cfg: dict[str, Any], path: Path) -> dict[str, list[tuple[BoundedPattern, Any]]]:
    """The config's ``rank_pattern``/``alpha_pattern`` keys compiled with PEFT's wrapping, in order, with their values."""
    return {
        field: [(compile_pattern(k, f"{path}: {field} key {k!r}", wrap=r"(.*\.)?({})$"), v)
                for k, v in (cfg.get(field) or {}).items()]
        for field in ("rank_pattern", "alpha_pattern")
    }


def _layer_filter(cfg: dict[str, Any], path: Path) -> Callable[[str], bool] | None:
    """PEFT's ``layers_to_transform`` (with ``layers_pattern``): whether a module path is in one of the
    layers it names, or ``None`` where it names none. As in PEFT, the layer is the first numbered
    segment of the path (after one of ``layers_pattern``, where given); a path without one is out.
    Both options need a list ``target_modules`` (PEFT refuses a string), and a module named by its
    exact path in ``target_modules`` is kept whatever its layer (PEFT's rule)."""
    indexes, names = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if indexes in (None, []):
        if names not in (None, [], ""):
            raise AdapterError(f"{path}: layers_pattern={names!r} needs layers_to_transform (PEFT refuses it alone)"[:500])
        return None
    ok = (_is_int(indexes) and indexes >= 0) or (isinstance(indexes, list) and all(_is_int(i) and i >= 0 for i in indexes))
    if not ok:
        raise AdapterError(f"{path}: layers_to_transform must be a layer index or a list of them, got {indexes!r}"[:500])
    if isinstance(cfg.get("target_modules"), str):
        raise AdapterError(f"{path}: layers_to_transform needs target_modules as a list of module names, got the "
                           f"string {cfg['target_modules']!r} (PEFT refuses the two together)"[:500])
    wanted = {indexes} if _is_int(indexes) else set(indexes)
    if names in (None, [], ""):
        def index(name: str) -> str | None:
            found = _FIRST_INDEX.match(name)
            return None if found is None else found.group("idx")
    else:
        if isinstance(names, str):
            names = [names]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise AdapterError(f"{path}: layers_pattern must be a string or a list of strings, got {names!r}"[:500])
        patterns = [compile_pattern(n, f"{path}: layers_pattern {n!r}", wrap=r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
                    for n in names]

        def index(name: str) -> str | None:
            return next((i for i in (p.match_group(name, "idx") for p in patterns) if i is not None), None)

    exact = set(cfg["target_modules"])

    def keep(name: str) -> bool:
        if name in exact:
            return True
        i = index(name)
        return i is not None and int(i) in wanted

    return keep


def _pattern_value(patterns: list[tuple[BoundedPattern, Any]], name: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` gives the value (bounded in time)."""
    for pattern, value in patterns:
        if pattern.match(name):
            return value
    return default


def _selector(value: Any, where: str) -> BoundedPattern | list[str]:
    """A ``target_modules``/``exclude_modules`` value: a string is a regex matched against the
    whole path (PEFT's rule), within a time bound; a list selects by exact path or suffix."""
    return compile_pattern(value, where) if isinstance(value, str) else [str(t) for t in value]


def _selects(name: str, selector: BoundedPattern | list[str]) -> bool:
    """:func:`~flora_graph.adapters.apply.match_target` with a bounded regex."""
    return selector.fullmatch(name) if isinstance(selector, BoundedPattern) else match_target(name, selector)


def _targets(model: nn.Module, cfg: dict[str, Any], path: Path) -> list[str]:
    targets = cfg["target_modules"]
    if targets == "all-linear":
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return [n for n in names if n != _output_head(model)]
    layers = _layer_filter(cfg, path)
    targets = _selector(targets, f"{path}: target_modules")
    exclude = cfg.get("exclude_modules")
    if exclude:
        exclude = _selector(exclude, f"{path}: exclude_modules")
    out = []
    for name, module in model.named_modules():
        if not name or not _selects(name, targets) or (exclude and _selects(name, exclude)):
            continue
        if layers is not None and not layers(name):
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
                      adapter_cls: type[LoRAAdapter] = LoRAAdapter, keep_base: bool = False) -> list[str]:
    """Install the LoRA adapters of a PEFT folder on ``model``; return the adapted module paths.

    Whole weights the folder holds are loaded into ``model`` as PEFT loads them: ``modules_to_save``, LoRA biases
    (``bias``), and the embedding layers PEFT saves beside an adapter that targets one (``embed_tokens`` /
    ``lm_head``: the model's input and output embeddings, as they were when it saved). With ``keep_base`` a whole
    weight that differs from the model's is refused instead (an adapter that must leave the base model as it is:
    a hot-swappable one); one equal to it changes nothing.

    Raises :class:`AdapterError` naming the key or option at fault (missing key, wrong shape,
    ``r`` that disagrees with the weights, unsupported option, a base weight changed under ``keep_base``) and
    leaves ``model`` untouched.
    """
    folder = Path(folder)
    cfg = read_peft_config(folder)
    cpath = folder / CONFIG_FILE
    patterns = _patterns(cfg, cpath)
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
    names = _targets(model, cfg, cpath)
    if not names:
        raise AdapterError(f"{folder}: target_modules={cfg['target_modules']!r} match no Linear/Conv2d/Conv1d/Embedding of {type(model).__name__}")
    built: list[tuple[str, LoRAAdapter]] = []
    used: set[str] = set()
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:  # building an adapter freezes its base layer: every refusal below puts the flags back
        for name in names:
            r = int(_pattern_value(patterns["rank_pattern"], name, cfg["r"]))
            alpha = float(_pattern_value(patterns["alpha_pattern"], name, cfg.get("lora_alpha", 8)))
            eff_alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha  # our scale is alpha / r
            keys = _lora_keys(model.get_submodule(name), name)
            a_key = keys["lora_A"]  # checked before the adapter is built: r comes from the config
            if a_key not in state:
                raise AdapterError(f"{wpath}: missing key {PREFIX}{a_key} for module {name!r} (r={r})")
            if state[a_key].ndim == 0 or state[a_key].shape[0] != r:
                raise AdapterError(f"{wpath}: key {PREFIX}{a_key} has shape {tuple(state[a_key].shape)}, "
                                   f"module {name!r} with r={r} needs {r} rows")
            adapter = adapter_cls(model.get_submodule(name), r, eff_alpha, module_name=name, adapter_name=adapter_name)
            for part, param in (("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B)):
                key = keys[part]
                if key not in state:
                    raise AdapterError(f"{wpath}: missing key {PREFIX}{key} for module {name!r} (r={r})")
                t = state[key]
                if tuple(t.shape) != tuple(param.shape):
                    raise AdapterError(f"{wpath}: key {PREFIX}{key} has shape {tuple(t.shape)}, module {name!r} with r={r} needs {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(t.to(param.dtype))
                used.add(key)
            built.append((name, adapter))
        extra = _load_plain_tensors(model, cfg, state, used, names, wpath)
        changed = [k for k, (target, value) in extra.items()
                   if not torch.equal(target, value.to(target.dtype))] if keep_base else []
        if changed:
            raise AdapterError(f"{wpath}: key {PREFIX}{changed[0]} replaces the base model's weight with other values "
                               f"({len(changed)} such key(s)), which an adapter that leaves the base model as it is "
                               "cannot do; bake it into the base model instead (--merge-adapter DIR; "
                               "export_genai(merge=DIR))")
        leftover = sorted(k for k in state if k not in used and k not in extra)
        if leftover:
            raise AdapterError(f"{wpath}: key {PREFIX}{leftover[0]} matches no adapted module ({len(leftover)} unused "
                               "key(s))")
    except BaseException:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
    with torch.no_grad():
        for target, value in extra.values():
            target.copy_(value.to(target.dtype))
    for name, adapter in built:
        _set_submodule(model, name, adapter)
    return names


def _lora_keys(module: nn.Module, name: str) -> dict[str, str]:
    """The file keys (``base_model.model.`` dropped) of ``module``'s ``A`` and ``B`` as PEFT saves them: an embedding's
    are parameters of their own (``<name>.lora_embedding_A``), a Linear's or Conv2d's the weights of layers."""
    if isinstance(module, nn.Embedding):
        return {"lora_A": f"{name}.lora_embedding_A", "lora_B": f"{name}.lora_embedding_B"}
    return {"lora_A": f"{name}.lora_A.weight", "lora_B": f"{name}.lora_B.weight"}


def _load_plain_tensors(model: nn.Module, cfg: dict[str, Any], state: dict[str, torch.Tensor], used: set[str],
                        adapted: list[str], wpath: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``modules_to_save`` weights, LoRA biases and saved embedding layers (:func:`_embedding_layers`): checked now,
    copied once all checks pass."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    saved = cfg.get("modules_to_save") or []
    embeddings = _embedding_layers(model)
    for key, value in state.items():
        if key in used:
            continue
        module = key.rsplit(".", 1)[0]
        wanted = any(_under(key, m) for m in saved)
        if cfg.get("bias", "none") == "all" and key.endswith(".bias"):
            wanted = True
        if cfg.get("bias") == "lora_only" and key.endswith(".bias") and module in adapted:
            wanted = True
        if module in embeddings:
            wanted = True
        if not wanted:
            continue
        if key not in own:
            raise AdapterError(f"{wpath}: key {PREFIX}{key} names no parameter of {type(model).__name__}")
        if tuple(own[key].shape) != tuple(value.shape):
            raise AdapterError(f"{wpath}: key {PREFIX}{key} has shape {tuple(value.shape)}, the model's is {tuple(own[key].shape)}")
        plan[key] = (own[key].data, value)
    modules = {n for n, _ in model.named_modules() if n}
    for m in saved:  # a name no module of the model has saves nothing (PEFT's task defaults: SEQ_CLS's 'classifier'
        if not any(_under(k, m) for k in plan) and any(_under(f"{n}.", m) for n in modules):  # on BART)
            raise AdapterError(f"{wpath}: modules_to_save names {m!r}, but no weights for it are in the file")
    return plan


def _embedding_layers(model: nn.Module) -> set[str]:
    """The paths of ``model``'s input and output embedding modules (transformers' ``get_input_embeddings`` /
    ``get_output_embeddings``), whose whole weights PEFT saves beside an adapter that targets an embedding layer
    (``save_embedding_layers="auto"``), or one fine-tuned after the vocabulary was resized. A model whose class does
    not say which they are (transformers' ``NotImplementedError`` for DETR's, DINOv3 ConvNeXt's) has none."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        f = getattr(model, getter, None)
        try:
            layer = f() if callable(f) else None
        except (AttributeError, NotImplementedError):  # an image model without a token table
            continue
        if isinstance(layer, nn.Module):
            found.append(layer)
    return {n for n, m in model.named_modules() if any(m is f for f in found)}


def saved_vocab(model: nn.Module, folder: str | Path) -> int | None:
    """The vocabulary of the embedding layers the adapter folder ``folder`` saves whole (PEFT saves them when a
    fine-tune resized them: it added tokens) where it differs from ``model``'s, else ``None``. Reads the weights
    file's header only; :class:`AdapterError` for a file that is not safetensors, or saved layers of two sizes."""
    from safetensors import safe_open

    wpath = Path(folder) / WEIGHTS_FILE
    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without input embeddings
        return None
    if not isinstance(table, nn.Embedding):  # no token table to resize (an image model's patch embeddings)
        return None
    layers = _embedding_layers(model)
    sizes: set[int] = set()
    try:
        with safe_open(str(wpath), "pt") as f:
            for key in f.keys():
                module, _, name = _plain_key(key).rpartition(".")
                if module in layers and name == "weight" and ".original_module." not in key:
                    sizes.add(int(f.get_slice(key).get_shape()[0]))
    except (OSError, SafetensorError, ValueError) as exc:
        raise AdapterError(f"{wpath}: cannot read the adapter weights ({exc})") from None
    if len(sizes) > 1:
        raise AdapterError(f"{wpath}: its saved embedding layers have {sorted(sizes)} rows: no one vocabulary")
    vocab = int(table.weight.shape[0])
    return next((n for n in sizes if n != vocab), None)


def fit_vocab(model: nn.Module, folder: str | Path, say: Callable[[str], None] = lambda msg: None) -> int | None:
    """Resize ``model``'s token embeddings (in place) to the vocabulary of the adapter folder ``folder`` where it saves
    embedding layers of another size (:func:`saved_vocab`: a fine-tune that added tokens, whose saved layers then
    replace the new rows), telling ``say``; returns that size, ``None`` (nothing done) where it saves none."""
    n = saved_vocab(model, folder)
    if n is not None:
        say(f"{folder}: its embedding layers hold {n} tokens, the base model "
            f"{int(model.get_input_embeddings().weight.shape[0])}: the model takes its vocabulary")
        model.resize_token_embeddings(n, mean_resizing=False)
    return n


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
    saved whole. The folder is committed whole (:func:`flora_graph.storage.staged_folder`):
    other files in it are kept, a reader sees the old adapter or the new one, and a failed
    write raises :class:`~flora_graph.errors.ArtifactWriteError` and changes nothing. Returns
    the folder.
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
        keys = _lora_keys(a.base_layer, name)
        tensors[f"{PREFIX}{keys['lora_A']}"] = a.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{keys['lora_B']}"] = a.lora_B.detach().cpu().contiguous()
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
    weights, text = st_save(tensors), json.dumps(cfg, indent=2).encode()
    with staged_folder(folder, what="PEFT adapter", last=CONFIG_FILE) as tmp:  # weights and config commit together
        write_new(tmp / WEIGHTS_FILE, weights)
        write_new(tmp / CONFIG_FILE, text)
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


def peft_installed(model: Any, folder: str | Path, what: str) -> Any:
    """``model`` (changed in place) with the PEFT folder ``folder`` installed by PEFT itself, to ``what`` (``"merge"``,
    ``"load"``: how messages say it). Raises :class:`AdapterError` where PEFT refuses the folder, and where some of its
    tensors match nothing in the model (PEFT would drop them without a word: an adapter of another model)."""
    import warnings

    import peft
    from safetensors import safe_open

    folder = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # PEFT warns, and goes on, where a target matches nothing:
        # checked below; an AdaLoRA module pruned to no rank saves empty tensors, which PEFT takes for unsharded
        # ones; and PEFT asks transformers a deprecated question: none is the user's to act on
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing", category=FutureWarning)
        try:
            adapted = peft.PeftModel.from_pretrained(model, folder)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # what PEFT raises on another model's folder
            raise AdapterError(f"{folder}: PEFT could not {what} it into {type(model).__name__} "
                               f"({str(exc)[:300] or type(exc).__name__})") from None
        with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
            saved = set(f.keys())
        unheld = sorted(saved - set(peft.get_peft_model_state_dict(adapted)))
    if unheld:
        raise AdapterError(f"{folder}: PEFT could not {what} it into {type(model).__name__}: {len(unheld)} of its "
                           f"tensors match nothing there ({', '.join(unheld[:3])}{', ...' if len(unheld) > 3 else ''});"
                           " is it an adapter of another model?")
    return adapted
