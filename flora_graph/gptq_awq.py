"""GPTQ and AWQ 4-bit checkpoints: read as float weights, their 4-bit blocks kept for 4-bit packages.

A GPTQ or AWQ checkpoint (``quantization_config.quant_method`` ``"gptq"`` or ``"awq"``, 4 bits) stores each
quantized ``Linear`` of ``[out, in]`` as integer codes ``q`` in ``[0, 15]``, a scale ``s`` and an integer zero
point ``z`` per output column and group of input rows; the layer's weight is ``W[o, i] = s[g(i), o] * (q[i, o] -
z[g(i), o])``, ``g(i)`` the group of input row ``i`` (``i // group_size``, or GPTQ's ``g_idx[i]`` where the
checkpoint was quantized in activation order). The layouts, as GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format``
``gptq`` and ``gptq_v2``) and AutoAWQ (``version`` ``gemm``) write them, each an ``int32`` holding eight 4-bit
values, the first in the lowest bits:

- GPTQ: ``qweight [in / 8, out]`` (packed along the input rows), ``qzeros [groups, out / 8]`` (packed along the
  columns; the ``gptq`` format stores ``z - 1``, ``gptq_v2`` ``z``), ``scales [groups, out]``, ``g_idx [in]``;
- AWQ: ``qweight [in, out / 8]`` and ``qzeros [groups, out / 8]``, both packed along the columns in the order
  ``0, 2, 4, 6, 1, 3, 5, 7`` (the value of column ``8c + order[j]`` in the ``j``-th four bits), ``scales [groups,
  out]``.

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

METHODS = ("gptq", "awq")
"""The ``quant_method``\\ s of the 4-bit checkpoints read here."""

_GRIDS = "_flora_int4_grids"  # the attribute of a model loaded from such a checkpoint that holds its grids
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column whose value the j-th four bits of an AWQ int32 hold (within 8)
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


class Int4CheckpointError(ModelFolderError):
    """A GPTQ or AWQ checkpoint that cannot be read: a setting it does not take, a layer's tensors missing or of
    the wrong shape (the message names the file, the setting or the layer)."""


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
    """``"gptq"`` or ``"awq"`` for a ``config.json`` (read) of such a checkpoint, else ``None``."""
    q = config.get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else None
    return method if method in METHODS else None


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Check a GPTQ or AWQ checkpoint's ``config`` (its ``config.json``, read; ``where``: its path, for messages)
    before anything loads: :class:`Int4CheckpointError` naming a setting this reader does not take."""
    _settings(config, where)


def _settings(config: Mapping[str, Any], where: str) -> tuple[str, bool, int]:
    """``(method, zeros stored minus one, group size)`` of ``config``'s quantization (group size ``-1``: one group
    over all input rows); :class:`Int4CheckpointError` for a setting this reader does not take."""
    q = config["quantization_config"]
    method = q["quant_method"]
    group = q.get("group_size", -1 if method == "gptq" else None)
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise Int4CheckpointError(f"{where}: quantization_config.group_size {group!r}: expected a positive number of "
                                  "input rows (or -1, one group)")
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
        return method, False, group
    if q.get("dynamic"):
        raise Int4CheckpointError(f"{where}: a GPTQ checkpoint with per-layer settings (quantization_config."
                                  f"dynamic: {sorted(q['dynamic'])}); flora_graph reads one setting for every layer")
    fmt = str(q.get("checkpoint_format", q.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise Int4CheckpointError(f"{where}: a GPTQ checkpoint of format {fmt!r} (quantization_config."
                                  "checkpoint_format); flora_graph reads 'gptq' and 'gptq_v2'")
    return method, fmt == "gptq", group


def _unpack(packed: np.ndarray, axis: int) -> np.ndarray:
    """The 4-bit values of int32 ``packed``, eight per value along ``axis`` (the lowest bits first), as uint8."""
    u = packed.astype(np.int64) & 0xFFFFFFFF
    nibbles = np.stack([(u >> (4 * j)) & 0xF for j in range(8)], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 8
    return nibbles.reshape(shape).astype(np.uint8)


def _layer(name: str, parts: dict[str, np.ndarray], method: str, minus_one: bool, group: int) -> Int4Grid:
    """The grid of layer ``name`` from its checkpoint tensors ``parts`` (``group``: the config's group size)."""
    for p in ("qweight", "qzeros", "scales"):
        if p not in parts:
            raise Int4CheckpointError(f"quantized layer {name!r} has no {name}.{p} in the checkpoint")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"].astype(np.float32)
    if qweight.dtype != np.int32 or qzeros.dtype != np.int32 or scales.ndim != 2:
        raise Int4CheckpointError(f"quantized layer {name!r}: qweight and qzeros must be int32 and scales 2-D, got "
                                  f"{qweight.dtype}, {qzeros.dtype}, {scales.ndim}-D")
    n_groups, out = scales.shape
    if method == "gptq":
        codes = _unpack(qweight, 0)  # [in, out]
        zeros = _unpack(qzeros, 1)[:, :out]
        if minus_one:
            zeros = (zeros + 1) & 0xF
    else:
        order = np.argsort(_AWQ_ORDER)  # the place of column j's value among the eight
        cols = lambda t: _unpack(t, 1).reshape(t.shape[0], -1, 8)[:, :, order].reshape(t.shape[0], -1)  # noqa: E731
        codes, zeros = cols(qweight), cols(qzeros)[:, :out]
    k = codes.shape[0]
    size = k if group == -1 else group
    if codes.shape[1] != out or zeros.shape != (n_groups, out) or n_groups != -(-k // size):
        raise Int4CheckpointError(f"quantized layer {name!r}: qweight {tuple(qweight.shape)}, qzeros "
                                  f"{tuple(qzeros.shape)} and scales {tuple(scales.shape)} do not fit one "
                                  f"[{k}, {out}] {method.upper()} layer in groups of {size} input rows")
    groups = parts["g_idx"].astype(np.int64) if "g_idx" in parts and method == "gptq" else np.arange(k) // size
    if groups.shape != (k,) or groups.min(initial=0) < 0 or groups.max(initial=0) >= n_groups:
        raise Int4CheckpointError(f"quantized layer {name!r}: g_idx {tuple(groups.shape)} must give each of its "
                                  f"{k} input rows one of its {n_groups} groups")
    return Int4Grid(np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T),
                    groups, size)


def read_checkpoint(folder: str | Path, config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Int4Grid]]:
    """``(state_dict, grids)`` of the GPTQ or AWQ checkpoint ``folder``: torch tensors for every entry of its
    safetensors files, each quantized layer's ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` replaced by its
    float32 ``weight`` (see the module docstring), and the :class:`Int4Grid` of each quantized layer by module
    path. ``config``: its ``config.json``, read (read here where not given). Raises
    :class:`Int4CheckpointError` for a setting it does not take or a layer it cannot read."""
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    if config is None:
        config = json.loads((folder / "config.json").read_text())
    method, minus_one, group = _settings(config, str(folder / "config.json"))
    state: dict[str, Any] = {}
    layers: dict[str, dict[str, np.ndarray]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if part in _PARTS and module:
                    layers.setdefault(module, {})[part] = f.get_tensor(key).numpy()
                else:
                    state[key] = f.get_tensor(key)
    grids: dict[str, Int4Grid] = {}
    for module, parts in layers.items():
        if "qweight" not in parts:  # a g_idx alone, or scales of something else: not a quantized layer
            state.update({f"{module}.{p}": torch.from_numpy(v) for p, v in parts.items()})
            continue
        grids[module] = _layer(module, parts, method, minus_one, group)
        state[f"{module}.weight"] = torch.from_numpy(grids[module].weight())
    if not grids:
        raise Int4CheckpointError(f"{folder}: a {method.upper()} checkpoint (config.json) whose safetensors hold no "
                                  "quantized layer (no *.qweight)")
    return state, grids


def attach_grids(model: Any, grids: Mapping[str, Int4Grid]) -> None:
    """Record ``grids`` (by module path) on ``model``, the model loaded from their checkpoint, for
    :func:`model_grids`."""
    object.__setattr__(model, _GRIDS, dict(grids))


def model_grids(model: Any) -> list[tuple[np.ndarray, Int4Grid]]:
    """``(weight, grid)`` of each layer of ``model`` (loaded from a GPTQ or AWQ checkpoint; none for another model)
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

