"""4-bit checkpoints (GPTQ, AWQ, compressed-tensors): read as float weights, their 4-bit blocks kept for 4-bit packages.

A GPTQ, AWQ or compressed-tensors checkpoint (``quantization_config.quant_method`` ``"gptq"``, ``"awq"`` or
``"compressed-tensors"``, 4-bit integer weights) stores each quantized ``Linear`` of ``[out, in]`` as integer codes
``q`` in ``[0, 15]``, a scale ``s`` and an integer zero point ``z`` per output column and group of input rows; the
layer's weight is ``W[o, i] = s[o, g(i)] * (q[o, i] - z[o, g(i)])``, ``g(i)`` the group of input row ``i`` (``i //
group_size``, or ``g_idx[i]`` where the checkpoint was quantized in activation order). The layouts, each
``int32`` holding eight 4-bit values, the first in the lowest bits:

- GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` ``gptq`` and ``gptq_v2``): ``qweight [in / 8, out]`` (packed
  along the input rows), ``qzeros [groups, out / 8]`` (packed along the columns; the ``gptq`` format stores ``z -
  1``, ``gptq_v2`` ``z``), ``scales [groups, out]``, ``g_idx [in]``;
- AWQ (AutoAWQ, ``version`` ``gemm``): ``qweight [in, out / 8]`` and ``qzeros [groups, out / 8]``, both packed
  along the columns in the order ``0, 2, 4, 6, 1, 3, 5, 7`` (the value of column ``8c + order[j]`` in the ``j``-th
  four bits), ``scales [groups, out]``;
- compressed-tensors (llm-compressor's ``pack-quantized`` format, ``W4A16`` schemes, ``group`` or ``channel``
  strategy): ``weight_packed [out, in / 8]`` (packed along the input rows, each code stored as the signed ``q - 8``
  plus 8, so as ``q``), ``weight_scale [out, groups]``, where asymmetric ``weight_zero_point [out / 8, groups]``
  (packed along the output rows, likewise ``z``; symmetric: ``z = 8``), ``weight_shape``, and ``weight_g_idx [in]``.

:func:`read_checkpoint` gives the float32 state dict of such a folder (each quantized layer's ``weight`` computed
as above in float32 from the float32 value of its scale, which is exact: a scale times an integer of at most
four bits), for transformers to build the model on, and the :class:`Int4Grid` of each quantized layer. A 4-bit
package (:mod:`flora_graph.serving.int4`) writes those layers' ``MatMulNBits`` from their grids: the checkpoint's
own codes, scales and zero points, where the float model would quantize the weights again (a layer quantized in
activation order reads its input's columns in its groups' order first).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flora_graph.errors import ModelFolderError

__all__ = ["METHODS", "Int4CheckpointError", "Int4Grid", "attach_grids", "check_config", "checkpoint_method",
           "model_grids", "read_checkpoint"]

METHODS = ("gptq", "awq", "compressed-tensors")
"""The ``quant_method``\\ s of the 4-bit checkpoints read here."""

_GRIDS = "_flora_int4_grids"  # the attribute of a model loaded from such a checkpoint that holds its grids
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column whose value the j-th four bits of an AWQ int32 hold (within 8)
# a quantized layer's tensors: its codes, scales, zero points, then the others (the codes' name tells a layer)
_PARTS = {"gptq": ("qweight", "scales", "qzeros", "g_idx"), "awq": ("qweight", "scales", "qzeros"),
          "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")}
_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors"}


@dataclass(frozen=True)
class _Scheme:
    """How a checkpoint's layers are stored: its method, GPTQ's zero points stored minus one, the group size (``-1``:
    one group over all input rows), compressed-tensors' symmetric codes (no zero points stored)."""

    method: str
    minus_one: bool = False
    group: int = -1
    symmetric: bool = False


class Int4CheckpointError(ModelFolderError):
    """A GPTQ, AWQ or compressed-tensors checkpoint that cannot be read: a setting it does not take, a layer's tensors
    missing or of the wrong shape (the message names the file, the setting or the layer)."""


@dataclass(frozen=True)
class Int4Grid:
    """One quantized layer of a checkpoint: ``codes`` uint8 ``[out, in]`` in ``[0, 15]``, ``scales`` float32
    ``[out, groups]``, ``zeros`` uint8 ``[out, groups]``, ``groups`` int64 ``[in]`` (the group of each input row),
    ``group_size`` the rows of a group (the config's; all of them for ``-1``). ``weight()`` is its float32 ``[out, in]``
    weight."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    groups: np.ndarray
    group_size: int

    @property
    def in_order(self) -> bool:
        """Whether the groups are runs of ``group_size`` consecutive rows (not GPTQ's activation order)."""
        return np.array_equal(self.groups, np.arange(len(self.groups)) // self.group_size)

    def weight(self) -> np.ndarray:
        """``s * (q - z)`` per row and column, float32 ``[out, in]``."""
        cols = self.groups
        return self.scales[:, cols] * (self.codes.astype(np.float32) - self.zeros[:, cols].astype(np.float32))


def checkpoint_method(config: Mapping[str, Any]) -> str | None:
    """``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` for a ``config.json`` (read) of such a checkpoint, else
    ``None``."""
    q = config.get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else None
    return method if method in METHODS else None


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Check a GPTQ, AWQ or compressed-tensors checkpoint's ``config`` (its ``config.json``, read; ``where``: its
    path, for messages) before anything loads: :class:`Int4CheckpointError` naming a setting this reader does not
    take."""
    _scheme(config, where)


def _group(value: Any, where: str, key: str) -> int:
    """A group size setting: a positive number of input rows, or ``-1`` (one group)."""
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or value > 0):
        raise Int4CheckpointError(f"{where}: {key} {value!r}: expected a positive number of input rows (or -1, one "
                                  "group)")
    return value


def _compressed_tensors(q: Mapping[str, Any], where: str) -> _Scheme:
    """The scheme of a compressed-tensors ``quantization_config``: one 4-bit integer weight scheme over every
    group, weights only, packed."""
    fmt = q.get("format")
    if fmt != "pack-quantized":
        raise Int4CheckpointError(f"{where}: a compressed-tensors checkpoint of format {fmt!r} (quantization_config."
                                  "format); flora_graph reads 'pack-quantized' (4-bit integer weights)")
    if q.get("sparsity_config"):
        raise Int4CheckpointError(f"{where}: a compressed-tensors checkpoint with sparse weights (quantization_config."
                                  "sparsity_config); flora_graph reads dense ones")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise Int4CheckpointError(f"{where}: a compressed-tensors checkpoint without quantization_config.config_groups")
    schemes = set()
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise Int4CheckpointError(f"{where}: config_groups.{name} quantizes no weights")
        if g.get("input_activations"):
            raise Int4CheckpointError(f"{where}: config_groups.{name} quantizes the activations too "
                                      "(input_activations); flora_graph reads weight-only schemes (W4A16)")
        if w.get("num_bits") != 4 or w.get("type", "int") != "int":
            raise Int4CheckpointError(f"{where}: config_groups.{name}.weights: {w.get('num_bits')}-bit "
                                      f"{w.get('type')} weights; flora_graph reads 4-bit int ones")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise Int4CheckpointError(f"{where}: config_groups.{name}.weights.strategy {strategy!r}; flora_graph reads "
                                      "'group' and 'channel'")
        size = _group(w.get("group_size"), where, f"config_groups.{name}.weights.group_size") if strategy == "group" \
            else -1
        schemes.add((size, bool(w.get("symmetric", True))))
    if len(schemes) != 1:
        raise Int4CheckpointError(f"{where}: compressed-tensors config_groups of {len(schemes)} different schemes "
                                  "(group size, symmetry); flora_graph reads one scheme for every layer")
    size, symmetric = schemes.pop()
    return _Scheme("compressed-tensors", group=size, symmetric=symmetric)


def _scheme(config: Mapping[str, Any], where: str) -> _Scheme:
    """The :class:`_Scheme` of ``config``'s quantization; :class:`Int4CheckpointError` for a setting this reader
    does not take."""
    q = config["quantization_config"]
    method = q["quant_method"]
    if method == "compressed-tensors":
        return _compressed_tensors(q, where)
    group = _group(q.get("group_size", -1 if method == "gptq" else None), where, "quantization_config.group_size")
    if q.get("bits", 4) != 4:
        raise Int4CheckpointError(f"{where}: a {q.get('bits')}-bit {method} checkpoint (quantization_config.bits); "
                                  "flora_graph reads 4-bit ones")
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise Int4CheckpointError(f"{where}: an AWQ checkpoint of version {version!r} "
                                      "(quantization_config.version); flora_graph reads the 'gemm' layout")
        if q.get("zero_point", True) is not True:
            raise Int4CheckpointError(f"{where}: an AWQ checkpoint without zero points (quantization_config."
                                      "zero_point); flora_graph reads AWQ checkpoints with them")
        return _Scheme(method, group=group)
    if q.get("dynamic"):
        raise Int4CheckpointError(f"{where}: a GPTQ checkpoint with per-layer settings (quantization_config."
                                  f"dynamic: {sorted(q['dynamic'])}); flora_graph reads one setting for every layer")
    fmt = str(q.get("checkpoint_format", q.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise Int4CheckpointError(f"{where}: a GPTQ checkpoint of format {fmt!r} (quantization_config."
                                  "checkpoint_format); flora_graph reads 'gptq' and 'gptq_v2'")
    return _Scheme(method, minus_one=fmt == "gptq", group=group)


def _unpack(packed: np.ndarray, axis: int) -> np.ndarray:
    """The 4-bit values of int32 ``packed``, eight per value along ``axis`` (the lowest bits first), as uint8."""
    u = packed.astype(np.int64) & 0xFFFFFFFF
    nibbles = np.stack([(u >> (4 * j)) & 0xF for j in range(8)], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 8
    return nibbles.reshape(shape).astype(np.uint8)


def _codes(name: str, parts: dict[str, np.ndarray], scheme: _Scheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes [out, in], scales [out, groups], zeros [out, groups])`` of layer ``name`` from its tensors ``parts``."""
    packed, scale, zero = _PARTS[scheme.method][:3]
    for p in (packed, scale) + (() if scheme.symmetric else (zero,)):
        if p not in parts:
            raise Int4CheckpointError(f"quantized layer {name!r} has no {name}.{p} in the checkpoint")
    scales = parts[scale]
    if parts[packed].dtype != np.int32 or (not scheme.symmetric and parts[zero].dtype != np.int32) or scales.ndim != 2:
        raise Int4CheckpointError(f"quantized layer {name!r}: {packed} and {zero} must be int32 and {scale} 2-D, got "
                                  f"{parts[packed].dtype}, {parts.get(zero, parts[packed]).dtype}, {scales.ndim}-D")
    if scheme.method == "compressed-tensors":
        codes = _unpack(parts[packed], 1)
        if "weight_shape" in parts:
            codes = codes[:, :int(parts["weight_shape"].reshape(-1)[-1])]
        zeros = np.full(scales.shape, 8, np.uint8) if scheme.symmetric else _unpack(parts[zero], 0)[:len(scales)]
        return codes, scales, zeros
    out = scales.shape[1]
    if scheme.method == "gptq":
        codes, zeros = _unpack(parts[packed], 0), _unpack(parts[zero], 1)[:, :out]
        if scheme.minus_one:
            zeros = (zeros + 1) & 0xF
    else:
        order = np.argsort(_AWQ_ORDER)  # the place of column j's value among the eight
        cols = lambda t: _unpack(t, 1).reshape(t.shape[0], -1, 8)[:, :, order].reshape(t.shape[0], -1)  # noqa: E731
        codes, zeros = cols(parts[packed]), cols(parts[zero])[:, :out]
    return codes.T, scales.T, zeros.T


def _layer(name: str, parts: dict[str, np.ndarray], scheme: _Scheme) -> Int4Grid:
    """The grid of layer ``name`` from its checkpoint tensors ``parts``."""
    codes, scales, zeros = _codes(name, parts, scheme)
    out, k = codes.shape
    n_groups = scales.shape[1]
    size = k if scheme.group == -1 else scheme.group
    if scales.shape[0] != out or zeros.shape != (out, n_groups) or n_groups != -(-k // size):
        shapes = ", ".join(f"{p} {tuple(parts[p].shape)}" for p in _PARTS[scheme.method][:3] if p in parts)
        raise Int4CheckpointError(f"quantized layer {name!r}: {shapes} do not fit one [{out}, {k}] "
                                  f"{_NAMES[scheme.method]} layer in groups of {size} input rows")
    g_idx = next((parts[p] for p in ("g_idx", "weight_g_idx") if p in parts), None)
    groups = np.arange(k) // size if g_idx is None or scheme.method == "awq" else g_idx.astype(np.int64)
    if groups.shape != (k,) or groups.min(initial=0) < 0 or groups.max(initial=0) >= n_groups:
        raise Int4CheckpointError(f"quantized layer {name!r}: g_idx {tuple(groups.shape)} must give each of its "
                                  f"{k} input rows one of its {n_groups} groups")
    return Int4Grid(np.ascontiguousarray(codes), np.ascontiguousarray(scales, np.float32), np.ascontiguousarray(zeros),
                    groups, size)


def read_checkpoint(folder: str | Path, config: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Int4Grid]]:
    """``(state_dict, grids)`` of the GPTQ, AWQ or compressed-tensors checkpoint ``folder``: torch tensors for every
    entry of its safetensors files, each quantized layer's tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``;
    ``weight_packed``, ``weight_scale``, ...) replaced by its float32 ``weight`` (see the module docstring), and the
    :class:`Int4Grid` of each quantized layer by module path. ``config``: its ``config.json``, read (read here where
    not given). Raises :class:`Int4CheckpointError` for a setting it does not take or a layer it cannot read."""
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    if config is None:
        config = json.loads((folder / "config.json").read_text())
    scheme = _scheme(config, str(folder / "config.json"))
    names = _PARTS[scheme.method]
    state: dict[str, Any] = {}
    layers: dict[str, dict[str, Any]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if part in names and module:
                    layers.setdefault(module, {})[part] = f.get_tensor(key)
                else:
                    state[key] = f.get_tensor(key)
    grids: dict[str, Int4Grid] = {}
    for module, parts in layers.items():
        if names[0] not in parts:  # a g_idx alone, or scales of something else: not a quantized layer
            state.update({f"{module}.{p}": v for p, v in parts.items()})
            continue
        # numpy of every part, a bfloat16 scale (compressed-tensors') through float32, exactly
        arrays = {p: (v.float() if v.is_floating_point() else v).numpy() for p, v in parts.items()}
        grids[module] = _layer(module, arrays, scheme)
        state[f"{module}.weight"] = torch.from_numpy(grids[module].weight())
    if not grids:
        raise Int4CheckpointError(f"{folder}: a {_NAMES[scheme.method]} checkpoint (config.json) whose safetensors "
                                  f"hold no quantized layer (no *.{names[0]})")
    return state, grids


def attach_grids(model: Any, grids: Mapping[str, Int4Grid]) -> None:
    """Record ``grids`` (by module path) on ``model``, the model loaded from their checkpoint, for
    :func:`model_grids`."""
    object.__setattr__(model, _GRIDS, dict(grids))


def model_grids(model: Any) -> list[tuple[np.ndarray, Int4Grid]]:
    """``(weight, grid)`` of each layer of ``model`` (loaded from a 4-bit checkpoint read here; none for another model)
    that still holds its checkpoint's weight: ``weight`` a numpy view of the layer's ``[out, in]`` float32 weight,
    whose memory the model's exported initializers view. A layer whose weight changed since it loaded (an adapter
    merged into it) is left out."""
    import torch

    out = []
    for path, grid in getattr(model, _GRIDS, {}).items():
        try:
            weight = model.get_submodule(path).weight.detach()
        except AttributeError:
            continue
        if weight.dtype != torch.float32 or tuple(weight.shape) != grid.codes.shape:
            continue
        w = weight.numpy()
        if np.array_equal(w, grid.weight()):
            out.append((w, grid))
    return out

