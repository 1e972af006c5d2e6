"""Adapter slots as serving metadata, and adapter weights as ``{param name: array}``.

A :class:`LoRASlot` is one adapted module with the rank left open: ``A`` is
``[rank, *in_dims]`` and ``B`` is ``[out, rank, *b_tail]`` (PEFT's layout; ``in_dims`` is
``(in,)`` for a ``Linear`` and ``(C, kh, kw)`` for a ``Conv2d``, whose ``B`` is 1x1). An
adapter is a plain mapping ``{"<module>.lora_A": A, "<module>.lora_B": s·B}`` with the
scale ``s`` already folded into ``B``, so any source (our ``LoRAAdapter`` models, a
graph's own weights, a PEFT checkpoint) can be written and loaded the same way. A module an
adapter leaves out runs as the base layer.

The slots themselves are IR ops (``LoRASlot`` / ``LoRAMixedSlot``, made from a graph's LoRA
sites by the ``adapter-slots`` pass, :mod:`flora_graph.passes.adapter_slots`);
:func:`graph_slots` reads their :class:`LoRASlot` description off a graph, which the
exports record in the model's metadata (:func:`slots_to_metadata`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flora_graph.errors import AdapterError, FloraGraphError
from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ops.registry import op_def
from flora_graph.passes.adapter_slots import (
    bias_name,
    lora_sites,
    magnitude_name,
    own_weights,
    rank_dim,
    slot_nodes,
    weight_names,
)
from flora_graph.runtimes.reference import to_array
from flora_graph.serving.errors import AdapterFileError, ServingError

__all__ = [
    "ADAPTER_FLAG",
    "METADATA_KEY",
    "LoRASlot",
    "ParamSpec",
    "adapter_params",
    "check_params",
    "graph_adapter_params",
    "graph_slots",
    "pack_params",
    "packed_from_metadata",
    "param_spec",
    "params_through_peft",
    "slots_from_metadata",
    "slots_to_metadata",
    "unpack_params",
]

METADATA_KEY = "flora_graph.lora_slots"
"""Key of the ONNX ``metadata_props`` entry holding the slots as JSON."""

ADAPTER_FLAG = "flora_graph.adapter_active"
"""Input of a model that skips its slots when no adapter is active (float ``[1]``, default ``0``; see
:mod:`flora_graph.serving.base_branch`). :func:`check_params` adds it, ``[1]``, to every adapter for such a
model and drops it from an adapter for a model without it."""

class ParamSpec(dict[str, tuple[tuple[int | str | None, ...], np.dtype]]):
    """``{param name: (dims, dtype)}``: an int dim must match, a str dim is a symbol every param using it shares.

    ``packs`` holds the packed slots (the ``pack-slots`` pass) of the model the spec is for:
    :func:`check_params` packs an adapter given per member module into their weights.
    """

    packs: tuple[LoRASlot, ...] = ()
    unpacks: tuple[LoRASlot, ...] = ()  # packed slots of another export whose adapter files this model reads per module


@dataclass(frozen=True)
class LoRASlot:
    """One swappable LoRA site: module path, kind and weight shapes with the rank left open."""

    module: str
    kind: str  # "linear", "conv", "embedding" (in_dims: the vocabulary) or "experts" (in_dims: (experts, in))
    in_dims: tuple[int, ...]  # A's dims but the rank
    out: int
    b_tail: tuple[int, ...]  # B's dims after the rank: () or (1, 1)
    dtype: str
    stride: tuple[int, ...] = ()  # conv only: the down projection's attributes
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    members: tuple[str, ...] = ()  # a packed slot (the pack-slots pass): the modules it stands for
    member_outs: tuple[int, ...] = ()  # and their output sizes (B is block-diagonal over them)
    dora: bool = False  # a linear slot that also takes DoRA's magnitude (param m_name, [out])
    lora_bias: bool = False  # a linear slot that also takes a bias (param c_name, [out])

    @property
    def a_name(self) -> str:
        """Parameter (and ONNX input) name of ``A``."""
        return weight_names(self.module)[0]

    @property
    def b_name(self) -> str:
        """Parameter (and ONNX input) name of ``B`` (scale folded in)."""
        return weight_names(self.module)[1]

    @property
    def m_name(self) -> str:
        """Parameter (and ONNX input) name of a DoRA slot's magnitude ``d = m / ||W + s B A|| - 1`` (``[out]``)."""
        return magnitude_name(self.module)

    @property
    def c_name(self) -> str:
        """Parameter (and ONNX input) name of a slot's bias ``c``, what an adapter adds to the layer's bias (``[out]``)."""
        return bias_name(self.module)

    @property
    def vector_names(self) -> tuple[str, ...]:
        """The ``[out]`` parameters the slot takes besides ``A`` and ``B``: :attr:`m_name` (DoRA), :attr:`c_name`."""
        return (*((self.m_name,) if self.dora else ()), *((self.c_name,) if self.lora_bias else ()))

    @property
    def rank_dim(self) -> str:
        """The symbolic dim naming this slot's rank in the ONNX model."""
        return rank_dim(self.module)

    def a_shape(self, rank: int | str) -> tuple[int | str, ...]:
        """Shape of ``A`` at ``rank`` (an experts slot's ``[experts, rank, in]``)."""
        if self.kind == "experts":
            return (self.in_dims[0], rank, self.in_dims[1])
        return (rank, *self.in_dims)

    def b_shape(self, rank: int | str) -> tuple[int | str, ...]:
        """Shape of ``B`` at ``rank`` (an experts slot's ``[experts, out, rank]``)."""
        if self.kind == "experts":
            return (self.in_dims[0], self.out, rank)
        return (self.out, rank, *self.b_tail)

    @classmethod
    def of_node(cls, node: ComputationNode) -> LoRASlot:
        """The slot of a ``LoRASlot`` / ``LoRAMixedSlot`` node (attributes and the shapes of its inputs)."""
        a, base, x = node.attrs, node.inputs[0], node.inputs[1]
        if a["kind"] == "linear":
            members = tuple(m for m in str(a.get("members", "")).split(",") if m)
            return cls(a["module"], "linear", (int(x.shape[-1]),), int(base.shape[-1]), (), node.dtype,
                       members=members, member_outs=tuple(int(o) for o in a.get("member_outs", ())) if members else (),
                       dora=bool(a.get("dora")), lora_bias=bool(a.get("lora_bias")))
        if a["kind"] == "experts":  # A [experts, rank, in], or its stack [slots, experts, R, in]
            experts = node.inputs[2].shape[0 if len(node.inputs[2].shape) == 3 else 1]
            return cls(a["module"], "experts", (int(experts), int(x.shape[-1])), int(base.shape[-1]), (), node.dtype)
        if a["kind"] == "embedding":  # A [rank, vocab], or the stack of A.T [slots, vocab, R]
            table = node.inputs[2].shape
            vocab = table[-1] if len(table) == 2 else table[1]
            return cls(a["module"], "embedding", (int(vocab),), int(base.shape[-1]), (), node.dtype)
        return cls(a["module"], "conv", (int(x.shape[1]), *a["kernel"]), int(base.shape[1]), (1, 1), node.dtype,
                   tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoRASlot:
        """Inverse of :meth:`to_json`; raises ``ServingError`` on a malformed entry."""
        try:
            kw = {k: (tuple(str(x) for x in v) if k == "members" else tuple(int(x) for x in v))
                  if isinstance(v, list) else v for k, v in d.items()}
            slot = cls(**kw)
        except (TypeError, ValueError) as exc:
            raise ServingError(f"malformed LoRA slot entry {dict(d)!r}: {exc}") from None
        if slot.kind not in ("linear", "conv", "embedding", "experts") or not isinstance(slot.module, str) or not isinstance(slot.out, int):
            raise ServingError(f"malformed LoRA slot entry {dict(d)!r}")
        for key in ("dora", "lora_bias"):
            if not isinstance(getattr(slot, key), bool) or (getattr(slot, key) and slot.kind != "linear"):
                raise ServingError(f"malformed LoRA slot entry {dict(d)!r}: {key} must be a bool, on a linear slot")
        if slot.members and (len(slot.members) != len(slot.member_outs) or sum(slot.member_outs) != slot.out):
            raise ServingError(f"malformed LoRA slot entry {dict(d)!r}: member outputs do not add up to out")
        return slot


def graph_slots(graph: Graph) -> list[LoRASlot]:
    """The :class:`LoRASlot` of every adapter slot node of ``graph``, in the order of their weight inputs; one per
    module (a module that runs twice has two slot nodes on the same weight inputs)."""
    order = {id(n): k for k, n in enumerate(graph.inputs)}
    nodes = sorted(slot_nodes(graph), key=lambda n: order.get(id(n.inputs[2]), len(order)))
    slots: dict[str, LoRASlot] = {}
    for n in nodes:
        slots.setdefault(str(n.attrs["module"]), LoRASlot.of_node(n))
    return list(slots.values())


def graph_adapter_params(graph: Graph) -> dict[str, np.ndarray]:
    """The graph's own adapter as ``{param name: array}`` (``s·B`` folded, in ``B``'s dtype).

    Reads the intact LoRA sites of ``graph`` (a captured graph, or one optimized without
    fusing its adapters). Raises :class:`ServingError` when it has none; the adapter slots of
    a graph keep no weights of their own (take the adapter from the graph before them).
    """
    try:
        sites = lora_sites(graph)
    except AdapterError as exc:
        raise ServingError(str(exc)) from None
    if not sites:
        if slot_nodes(graph):
            raise ServingError(f"graph {graph.name!r}: its LoRA sites are adapter slots, which hold no adapter weights; "
                               "take the adapter from the graph before the slots were made (graph_adapter_params of "
                               "the captured graph)")
        raise ServingError(f"graph {graph.name!r} has no LoRA branch (Add(base(x, W), up(down(x, A), B) [* s])) "
                           "to take an adapter from")
    out: dict[str, np.ndarray] = {}
    memo: dict[ComputationNode, np.ndarray] = {}
    for m in sites:
        a_name, b_name = weight_names(m.module)
        out[a_name], out[b_name] = own_weights(graph, m, memo)
    return out


def slots_to_metadata(slots: Sequence[LoRASlot], kind: str, packed: Sequence[LoRASlot] = ()) -> dict[str, str]:
    """``metadata_props`` entries recording ``slots`` and the export ``kind`` (``swappable`` or ``mixed``).

    ``packed``: the packed slots of a sibling export (the GenAI model) whose adapter files this
    model reads, unpacking them per module (:func:`unpack_params`).
    """
    doc: dict[str, Any] = {"kind": kind, "slots": [s.to_json() for s in slots]}
    if packed:
        doc["packed"] = [s.to_json() for s in packed]
    return {METADATA_KEY: json.dumps(doc)}


def packed_from_metadata(props: Mapping[str, str], where: str) -> tuple[LoRASlot, ...]:
    """The ``packed`` slots recorded by :func:`slots_to_metadata` (none when absent)."""
    if METADATA_KEY not in props:
        return ()
    try:
        return tuple(LoRASlot.from_json(d) for d in json.loads(props[METADATA_KEY]).get("packed", []))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ServingError(f"{where}: malformed {METADATA_KEY!r} metadata ({exc})") from None


def slots_from_metadata(props: Mapping[str, str], where: str) -> tuple[str, list[LoRASlot]]:
    """``(kind, slots)`` from a model's metadata; ``ServingError`` naming ``where`` if absent or malformed."""
    if METADATA_KEY not in props:
        raise ServingError(f"{where}: not a flora_graph serving export (no {METADATA_KEY!r} metadata)")
    try:
        doc = json.loads(props[METADATA_KEY])
        return str(doc["kind"]), [LoRASlot.from_json(d) for d in doc["slots"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ServingError(f"{where}: malformed {METADATA_KEY!r} metadata ({exc})") from None


def param_spec(slots: Sequence[LoRASlot], flag: bool = False) -> ParamSpec:
    """The :data:`ParamSpec` an adapter for ``slots`` must meet (rank symbolic per module); ``flag``: the model
    also takes :data:`ADAPTER_FLAG`."""
    spec = ParamSpec()
    if flag:
        spec[ADAPTER_FLAG] = ((1,), np.dtype(np.float32))
    for s in slots:
        dt = np.dtype(s.dtype)
        spec[s.a_name] = (s.a_shape(s.rank_dim), dt)
        spec[s.b_name] = (s.b_shape(s.rank_dim), dt)
        for name in s.vector_names:
            spec[name] = ((s.out,), dt)
    spec.packs = tuple(s for s in slots if s.members)
    return spec


def _both_or_neither(params: Mapping[str, Any], a_name: str, b_name: str, adapter: str) -> None:
    """Refuse, naming both, an adapter that sets one of a module's ``A`` and ``B`` without the other."""
    if (a_name in params) != (b_name in params):
        have, miss = (a_name, b_name) if a_name in params else (b_name, a_name)
        raise AdapterFileError(f"adapter {adapter!r} sets {have!r} but not {miss!r}; a module's A and B come together")


def pack_params(params: Mapping[str, Any], packs: Sequence[LoRASlot], adapter: str) -> dict[str, Any]:
    """``params`` with the per-module weights of each packed slot's members packed into the slot's own.

    For members ``1..n`` given (``A_i`` ``[r_i, in]``, ``B_i`` ``[out_i, r_i]``; a member left
    out counts as rank 0): ``A = Concat(A_i)`` along the rank and ``B`` block-diagonal, so the
    packed slot adds exactly what the members' slots add. Other names pass through (a param
    named for the packed slot itself included). Raises :class:`AdapterFileError` naming the
    parameter for a member with ``A`` but no ``B`` (or the reverse) or mismatched shapes.
    """
    out = dict(params)
    for slot in packs:
        names = [weight_names(m) for m in slot.members]
        if not any(a in out or b in out for a, b in names):
            continue
        a_parts, b_parts = [], []
        for (a_name, b_name), width in zip(names, slot.member_outs, strict=True):
            _both_or_neither(out, a_name, b_name, adapter)
            if a_name not in out:
                a_parts.append(np.zeros((0, *slot.in_dims), np.float32))
                b_parts.append(np.zeros((width, 0), np.float32))
                continue
            a = to_array(out.pop(a_name), f"adapter {adapter!r}: parameter {a_name!r}", AdapterFileError)
            b = to_array(out.pop(b_name), f"adapter {adapter!r}: parameter {b_name!r}", AdapterFileError)
            if a.ndim != 2 or b.ndim != 2 or a.shape[1:] != slot.in_dims or b.shape != (width, a.shape[0]):
                raise AdapterFileError(f"adapter {adapter!r}: parameters {a_name!r} {list(a.shape)} and {b_name!r} "
                                       f"{list(b.shape)} do not fit the model's [rank, {slot.in_dims[0]}] and "
                                       f"[{width}, rank] (is it for another model?)")
            a_parts.append(a)
            b_parts.append(b)
        dtype = np.result_type(*a_parts, *b_parts)
        ranks = [a.shape[0] for a in a_parts]
        big_b = np.zeros((slot.out, sum(ranks)), dtype)
        row = col = 0
        for b, r in zip(b_parts, ranks, strict=True):
            big_b[row:row + b.shape[0], col:col + r] = b
            row, col = row + b.shape[0], col + r
        out[slot.a_name] = np.concatenate([a.astype(dtype, copy=False) for a in a_parts], axis=0)
        out[slot.b_name] = big_b
    return out


def unpack_params(params: Mapping[str, Any], packs: Sequence[LoRASlot], adapter: str) -> dict[str, Any]:
    """The inverse of :func:`pack_params`: each packed slot's ``A``/``B`` in ``params`` split per member module.

    Member ``i`` owns rows ``out_i`` of ``B``, and its rank is the columns of ``B`` that are
    nonzero in those rows. A column that is zero everywhere adds nothing and is dropped; a
    column nonzero in the rows of two members is not block-diagonal and refused with
    :class:`AdapterFileError` naming the parameter. A member with no column is left out (rank 0).
    """
    out = dict(params)
    for slot in packs:
        if slot.a_name not in out and slot.b_name not in out:
            continue
        _both_or_neither(out, slot.a_name, slot.b_name, adapter)
        a = to_array(out.pop(slot.a_name), f"adapter {adapter!r}: parameter {slot.a_name!r}", AdapterFileError)
        b = to_array(out.pop(slot.b_name), f"adapter {adapter!r}: parameter {slot.b_name!r}", AdapterFileError)
        if a.ndim != 2 or b.shape != (slot.out, a.shape[0]):
            raise AdapterFileError(f"adapter {adapter!r}: parameters {slot.a_name!r} {list(a.shape)} and {slot.b_name!r} "
                                   f"{list(b.shape)} do not fit [rank, in] and [{slot.out}, rank]")
        bounds = np.cumsum([0, *slot.member_outs])
        used = np.stack([np.any(b[lo:hi] != 0, axis=0) for lo, hi in itertools.pairwise(bounds)])
        shared = np.flatnonzero(used.sum(axis=0) > 1)
        if shared.size:
            raise AdapterFileError(f"adapter {adapter!r}: parameter {slot.b_name!r} is not block-diagonal over "
                                   f"{list(slot.members)} (column {int(shared[0])} feeds two of them)")
        for k, (module, (lo, hi)) in enumerate(zip(slot.members, itertools.pairwise(bounds), strict=True)):
            cols = np.flatnonzero(used[k])
            if cols.size:
                a_name, b_name = weight_names(module)
                out[a_name], out[b_name] = a[cols], b[lo:hi][:, cols]
    return out


def check_params(params: Mapping[str, Any], spec: ParamSpec, adapter: str, *, cast: bool = False) -> dict[str, np.ndarray]:
    """Validate adapter ``params`` against ``spec``; return them as contiguous arrays.

    Every name must be in ``spec``; int dims must match; a symbolic dim (a slot's rank)
    takes one value across the params that use it, and every param using a symbol the
    adapter binds must be present (``A`` without ``B`` is refused). Dtypes must match
    unless ``cast`` converts float arrays. :data:`ADAPTER_FLAG` is added (``[1]``) when the
    spec has it and dropped when it does not; any other value of it is refused. Raises
    :class:`AdapterFileError` naming ``adapter`` and the parameter at fault.
    """
    params = _with_flag(params, spec, adapter)
    if not set(params) <= set(spec):  # per-module weights for a packed model, or packed ones for an unpacked one
        params = unpack_params(pack_params(params, getattr(spec, "packs", ()), adapter),
                               getattr(spec, "unpacks", ()), adapter)
    out: dict[str, np.ndarray] = {}
    bound: dict[str, tuple[int, str]] = {}
    unknown = sorted(set(params) - set(spec))
    vectors = {"lora_bias": "bias", "lora_magnitude": "DoRA magnitude"}
    slotted = {n.removesuffix(".lora_A") for n in spec if n.endswith(".lora_A")} \
        | {m for slot in getattr(spec, "packs", ()) for m in slot.members}
    mods = sorted({n.rpartition(".")[0] for n in unknown})
    if unknown and all(n.rpartition(".")[2] in vectors for n in unknown) and set(mods) <= slotted:
        # slots of the model, made without the vector the adapter gives them
        what = " and ".join(sorted({vectors[n.rpartition(".")[2]] for n in unknown}))
        raise AdapterFileError(f"adapter {adapter!r} adds a {what} (parameter(s) {unknown[:2]}"
                               f"{' ...' if len(unknown) > 2 else ''}) to {len(mods)} module(s) ({', '.join(mods[:3])}"
                               f"{', ...' if len(mods) > 3 else ''}) whose slots in this model take none (the adapters "
                               "it was exported with added none there); export it again with this adapter among them")
    if unknown:
        near = ", ".join(sorted(spec)[:4])
        raise AdapterFileError(f"adapter {adapter!r} has parameter(s) {unknown[:5]} the model does not take "
                               f"(it is for another model?); the model's LoRA parameters are e.g. {near}")
    if not params:
        raise AdapterFileError(f"adapter {adapter!r} holds no parameters")
    for name, value in params.items():
        dims, dtype = spec[name]
        arr = to_array(value, f"adapter {adapter!r}: parameter {name!r}", AdapterFileError)
        if arr.dtype != dtype:
            if not (cast and arr.dtype.kind == "f"):
                raise AdapterFileError(f"adapter {adapter!r}: parameter {name!r} has dtype {arr.dtype}, the model takes {dtype}")
            arr = arr.astype(dtype)
        if arr.ndim != len(dims):
            raise AdapterFileError(f"adapter {adapter!r}: parameter {name!r} has shape {list(arr.shape)}, "
                                   f"the model takes {list(dims)}")
        for size, want in zip(arr.shape, dims, strict=True):
            if isinstance(want, int) and size != want:
                raise AdapterFileError(f"adapter {adapter!r}: parameter {name!r} has shape {list(arr.shape)}, "
                                       f"the model takes {list(dims)} (is it for another model?)")
            if isinstance(want, str):
                if want in bound and bound[want][0] != size:
                    raise AdapterFileError(f"adapter {adapter!r}: parameter {name!r} has {want} = {size}, but "
                                           f"{bound[want][1]!r} has {bound[want][0]}")
                bound.setdefault(want, (int(size), name))
        if not np.all(np.isfinite(arr)):
            raise AdapterFileError(f"adapter {adapter!r}: parameter {name!r} has non-finite values")
        out[name] = np.ascontiguousarray(arr)
    for name, (dims, _) in spec.items():
        syms = [d for d in dims if isinstance(d, str) and d in bound]
        if syms and name not in out:
            raise AdapterFileError(f"adapter {adapter!r} sets {bound[syms[0]][1]!r} but not {name!r}; "
                                   "a module's A and B come together")
    return out


def _with_flag(params: Mapping[str, Any], spec: ParamSpec, adapter: str) -> Mapping[str, Any]:
    """``params`` with :data:`ADAPTER_FLAG` set to ``[1]`` for a spec that has it, without it for one that has not."""
    flag = ADAPTER_FLAG in spec
    if ADAPTER_FLAG in params:
        value = np.asarray(to_array(params[ADAPTER_FLAG], f"adapter {adapter!r}: parameter {ADAPTER_FLAG!r}",
                                    AdapterFileError))
        if value.shape != (1,) or value[0] != 1:
            raise AdapterFileError(f"adapter {adapter!r}: parameter {ADAPTER_FLAG!r} must be [1] (an adapter is "
                                   f"active where it is set), got {value.tolist()}")
        if flag:
            return params
        params = dict(params)
        del params[ADAPTER_FLAG]
        return params
    return {**params, ADAPTER_FLAG: np.ones(1, np.float32)} if flag and params else params


def adapter_params(model: Any) -> dict[str, np.ndarray]:
    """``{param name: array}`` of every :class:`~flora_graph.adapters.LoRAAdapter` in ``model`` (``s·B`` folded), and of
    every :class:`~flora_graph.adapters.param_lora.ParamLoRA` on a parameter of it.

    Names are ``"<module path>.lora_A"`` / ``"<module path>.lora_B"``, the names the
    ``adapter-slots`` pass gives the slots of a graph captured from the same model.
    """
    import torch

    from flora_graph.adapters import adapters_of
    from flora_graph.adapters.param_lora import param_adapters_of

    found = adapters_of(model)
    on_params = param_adapters_of(model)
    if not found and not on_params:
        raise FloraGraphError(f"{type(model).__name__} has no LoRAAdapter modules")
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for path, p in on_params.items():  # LoRA on a parameter: A [(experts,) r, in], B [(experts,) out, r]
            out[f"{path}.lora_A"] = p.lora_A.detach().cpu().numpy().copy()
            b = p.lora_B.detach().cpu()
            out[f"{path}.lora_B"] = (b.float() * p.scaling).to(b.dtype).numpy()
        for path, ad in found.items():
            if ad.lora_A.dtype == torch.bfloat16:
                raise AdapterFileError(f"module {path!r}: bfloat16 adapter weights; cast the model to float32/float16")
            out[f"{path}.lora_A"] = ad.lora_A.detach().cpu().numpy().copy()
            b = ad.lora_B.detach().cpu()
            out[f"{path}.lora_B"] = (b.float() * ad.branch_scale).to(b.dtype).numpy()
    return out


def peft_adapter_params(base_model: Any, folder: Any, *, saved: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{param name: array}`` of a PEFT adapter folder, for :func:`write_adapter` / sessions.

    The folder is installed on a copy of ``base_model`` (the plain model the swappable graph
    was captured from, without adapters) with :func:`~flora_graph.adapters.peft.load_peft_adapter`,
    which honours ``r``/``lora_alpha``/``use_rslora``/``rank_pattern``/``alpha_pattern`` and
    refuses what it cannot, a base weight the folder changes among it (``keep_base``: the embedding layers PEFT
    saves beside an adapter on ``lm_head`` are loaded only where they are the base model's own); ``base_model``
    itself is not touched. The copy's modules are its own and its weights ``base_model``'s (:func:`_module_copy`:
    ``keep_base`` writes none of them), so reading an adapter holds no second copy of the model. A folder that only
    PEFT's own layers hold (``target_parameters``: LoRA on expert tensors; ``use_dora``; ``trainable_token_indices``;
    ``modules_to_save``; ``lora_bias``; biases it trained, ``bias="all"`` / ``"lora_only"``; an AdaLoRA folder; one of
    PEFT's other adapter types, :data:`~flora_graph.adapters.peft.THROUGH_PEFT`) is read through them instead: :func:`params_through_peft` (``saved``, a list, gets the paths of the modules it trains whole).
    """
    from flora_graph.adapters.peft import load_peft_adapter, needs_peft_layers, read_peft_config, saved_vocab

    cfg = read_peft_config(folder, peft_layers=True)
    if (n := saved_vocab(base_model, folder)) is not None:
        raise AdapterError(f"{folder}: its embedding layers hold {n} tokens, the base model "
                           f"{int(base_model.get_input_embeddings().weight.shape[0])} (a fine-tune that added tokens): "
                           f"the adapters of one package share its vocabulary, so it cannot swap; {_MERGE_INSTEAD}, "
                           "where the package takes its vocabulary (and its tokenizer, saved beside it)")
    if needs_peft_layers(cfg) or cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
        return params_through_peft(base_model, folder, saved=saved)
    with _shared_copy(base_model, folder, "the LoRA loader") as model:
        load_peft_adapter(model, folder, keep_base=True)
        params = adapter_params(model)
    return params


def _module_copy(model: Any, private: Collection[str] = ()) -> Any:
    """A copy of ``model`` whose modules (and their plain attributes) are its own and whose parameters and buffers
    are ``model``'s, but those named in ``private`` (any of their names), which are copied: wrapping its modules
    leaves ``model``'s as they are, and no other weight is copied. Only for a change that writes no shared weight."""
    import copy

    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    own = {id(t) for name, t in named if name in private}
    memo = {id(t): t for _, t in named if id(t) not in own}
    return copy.deepcopy(model, memo)


_ADAPTER_OWNED = re.compile(r"^(lora_.*|token_adapter|modules_to_save|original_module|trainable_tokens_.*)$")
"""A segment of a PEFT file key that makes the tensor the adapter's own (PEFT loads it into no base weight)."""


@contextlib.contextmanager
def _shared_copy(model: Any, folder: Any, by: str, private: Collection[str] = ()) -> Iterator[Any]:
    """A copy of ``model`` (:func:`_module_copy`, its weights but ``private`` shared) to install the adapter ``folder``
    on. On leaving, the weights the copy shares get back their data and the ``requires_grad`` flags the install set
    (an adapter freezes the weights it wraps); :class:`AdapterError` naming ``folder``, each weight restored, where the
    install (by ``by``, as the message says it) replaced one's data."""
    twin = _module_copy(model, private)
    copied = {id(q) for q in twin.parameters()}
    before = [(p, p.data, p.requires_grad) for p in model.parameters() if id(p) in copied]
    try:
        yield twin
    finally:
        replaced = [p for p, data, _ in before if p.data_ptr() != data.data_ptr()]
        for p, data, flag in before:
            p.data = data
            p.requires_grad_(flag)
    if replaced:
        raise AdapterError(f"{folder}: {by} replaced {len(replaced)} of the base model's weights as it installed the "
                           f"adapter, which an adapter that leaves the base model as it is cannot do; {_MERGE_INSTEAD}")


def _peft_copy(base_model: Any, folder: Path) -> contextlib.AbstractContextManager[Any]:
    """A copy of ``base_model`` for PEFT to install ``folder`` on, as a context (:func:`_shared_copy`): the copy's own
    weights are those the folder's file names (PEFT loads them in place: biases, embedding layers, modules it trains
    whole), the others ``base_model``'s, unless the config asks for an initialization that rewrites base weights
    (PiSSA, OLoRA, LoftQ, ...) or the file cannot be read (PEFT then says why): a whole copy."""
    import copy

    from safetensors import safe_open

    from flora_graph.adapters.peft import WEIGHTS_FILE, read_peft_config

    init = read_peft_config(folder, peft_layers=True).get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        return contextlib.nullcontext(copy.deepcopy(base_model))
    try:
        with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
            keys = list(f.keys())
    except Exception:
        return contextlib.nullcontext(copy.deepcopy(base_model))
    paths = [_peft_path(k) for k in keys]
    private = {path for path in paths if not any(_ADAPTER_OWNED.match(seg) for seg in path.split("."))}
    return _shared_copy(base_model, folder, "PEFT", private)


def _peft_path(name: str) -> str:
    """A PEFT module name as the plain model's path: no ``base_model.model.`` prefix, no ``.base_layer`` segments
    (nested ``ParamWrapper``\\ s wrap one module once per parameter)."""
    return ".".join(p for p in name.removeprefix("base_model.model.").split(".") if p != "base_layer")


_MERGE_INSTEAD = "bake it into the base model instead (--merge-adapter DIR; export_genai(merge=DIR))"
"""What a refusal of a swappable adapter offers instead."""


def params_through_peft(base_model: Any, folder: Any, *, saved: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{param name: array}`` of a PEFT folder that only PEFT's own layers hold, read through them.

    For LoRA on parameters (``target_parameters``, a mixture of experts' expert tensors: PEFT alone knows how it nests
    one wrapper per adapted parameter), DoRA (``use_dora``), trainable tokens (``trainable_token_indices``: new
    embedding rows for the tokens named, as a LoRA whose rank is their count on the embedding, and on an output layer
    tied to it, :func:`_token_rows`) and whole modules the adapter trained (``modules_to_save``: the change of a
    ``Linear``'s or an ``Embedding``'s weight as a LoRA of full rank, :func:`_saved_rows`) and biases (PEFT's
    ``lora_bias``, ``scaling`` times ``lora_B``'s bias; a ``Linear``'s bias the adapter trained, ``bias="all"`` /
    ``"lora_only"``, or changed in a module it trains whole: the change) as the slot's bias ``c``
    (``"<module>.lora_bias"``, ``[out]``, summed where several add to one module). The folder is installed by
    PEFT on a copy of
    ``base_model``. An AdaLoRA layer (PEFT's ``SVDLinear``, ``x (A * E)^T B^T * alpha / (ranknum + 1e-5)``) gives
    ``A * E`` as ``A`` and ``B`` with that scale folded; a module whose ranks it pruned to none has no slot entry. A
    layer of one of PEFT's other adapter types gives its change of the weight, factored (:func:`_delta_rows`). A
    parameter's ``A`` is ``[experts, r, in]`` and ``B`` ``[experts, out, r]`` with the scale folded
    (``[r, in]`` / ``[out, r]`` for a 2-D weight), named ``"<owner>.<param>.lora_A"``; a layer's as
    :func:`adapter_params` names them. A DoRA layer also gives its magnitude as ``d = m / ||W + s B A|| - 1`` per output
    row (``"<module>.lora_magnitude"``, ``[out]``; PEFT's norm over the base weight and the adapter's product, which
    the slot's ``(1 + d) * (base + delta)`` then applies). ``saved`` (a list), where given, gets the path of each module
    trained whole that became a slot. Raises :class:`AdapterError` where PEFT refuses the folder,
    where a tensor of it matches nothing in the model, where it changes a base weight (but a ``Linear``'s bias), and
    for a LoRA layer kind a slot does not take this way (a convolution's, DoRA on an embedding; an embedding's LoRA is
    read as :func:`_embedding_rows` says, and a GPT-2 ``Conv1D`` layer (``fan_in_fan_out``) as a ``Linear``, its base
    weight transposed for DoRA). PEFT installs the folder on :func:`_peft_copy`'s copy of ``base_model``, which shares
    the weights the folder does not load.
    """
    import torch
    from peft.tuners import adalora, lora
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper
    from transformers.pytorch_utils import Conv1D

    from flora_graph.adapters.peft import peft_installed

    aux = (TrainableTokensLayer, ModulesToSaveWrapper)  # read below
    folder = Path(folder)
    with _peft_copy(base_model, folder) as model:
        adapted = peft_installed(model, folder, "load")
    own = dict(base_model.named_parameters())
    out: dict[str, np.ndarray] = {}
    for name, p in adapted.named_parameters():  # a swappable adapter leaves the base model as it is, but biases
        path = _peft_path(name)
        if path not in own or torch.equal(p.detach(), own[path].detach()):
            continue
        owner = path.rpartition(".")[0]
        if path.endswith(".bias") and isinstance(base_model.get_submodule(owner), (torch.nn.Linear, Conv1D)):
            _add_bias(out, owner, p.detach().float() - own[path].detach().float(), own[path].dtype, folder)
            continue
        raise AdapterError(f"{folder}: it replaces the base model's weight {path!r} with other values (PEFT saves "
                           "such weights beside an adapter on an embedding layer, and trains every bias with "
                           "bias='all'), which an adapter that leaves the base model as it is cannot do (but a Linear "
                           f"layer's bias); {_MERGE_INSTEAD}")
    with torch.no_grad():
        for name, mod in adapted.named_modules():
            if isinstance(mod, lora.Embedding) and "default" in mod.lora_embedding_A:
                _embedding_rows(out, mod, _peft_path(name), folder)
                continue
            if isinstance(mod, BaseTunerLayer) and not isinstance(mod, (lora.LoraLayer, *aux)):
                _delta_rows(out, mod, _peft_path(name), folder)  # PEFT's other adapter types
                continue
            if not isinstance(mod, lora.LoraLayer) or "default" not in getattr(mod, "lora_A", {}):
                continue
            s = float(mod.scaling["default"])
            magnitude = None
            if type(mod) is adalora.SVDLinear:  # x (A * E)^T B^T * scaling / (ranknum + 1e-5), as its forward computes
                path = _peft_path(name)
                dtype = mod.lora_A["default"].dtype
                a = mod.lora_A["default"].detach().float() * mod.lora_E["default"].detach().float()
                b = mod.lora_B["default"].detach().float() * (s / (float(mod.ranknum["default"]) + 1e-5))
                if a.shape[0]:  # a module whose ranks AdaLoRA pruned to none adds nothing: no slot entry
                    _store_rank(out, path, a, b, dtype, folder)
                continue
            if isinstance(mod, adalora.AdaLoraLayer):
                raise AdapterError(f"{folder}: module {_peft_path(name)!r} is an AdaLoRA {type(mod).__name__} layer; "
                                   "AdaLoRA swaps as a hot-swappable slot on Linear layers only")
            a = mod.lora_A["default"].weight.detach().float()
            b = mod.lora_B["default"].weight.detach().float() * s
            if isinstance(mod, lora.ParamWrapper):
                path = f"{_peft_path(name)}.{mod.parameter_name}"
                if mod.get_param().dim() == 3:
                    e = mod.num_experts
                    a = a.reshape(e, -1, a.shape[-1])  # [experts, r, in]
                    b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [experts, out, r]
            elif type(mod) is lora.Linear:
                # fan_in_fan_out (GPT-2's Conv1D, weight [in, out]) lays out only the base weight: the product is
                # the same x A^T B^T
                path = _peft_path(name)
                if mod.use_dora.get("default"):  # m / ||W + s B A|| per output row, as PEFT's DoRA layer divides
                    w = mod.get_base_layer().weight.detach().float()
                    w = w.T if mod.fan_in_fan_out else w  # [out, in]
                    m = mod.lora_magnitude_vector["default"].weight.detach().float()
                    magnitude = m / torch.linalg.norm(w + b @ a, dim=1) - 1
            else:
                raise AdapterError(f"{folder}: module {_peft_path(name)!r} is a {type(mod).__name__} LoRA layer, which "
                                   "an adapter read through PEFT's layers (target_parameters, DoRA, trainable tokens, "
                                   "modules_to_save) cannot carry as a hot-swappable slot")
            dtype = mod.lora_A["default"].weight.dtype
            if getattr(mod, "lora_bias", {}).get("default"):  # B's bias, scaled as PEFT's forward scales B's output
                _add_bias(out, path, mod.lora_B["default"].bias.detach().float() * s, dtype, folder)
            _store_rank(out, path, a, b, dtype, folder)
            if magnitude is not None:
                out[magnitude_name(path)] = np.ascontiguousarray(magnitude.to(dtype).numpy())
        for name, mod in adapted.named_modules():
            if isinstance(mod, TrainableTokensLayer) and "default" in mod.token_indices:
                _add_rank(out, _peft_path(name).removesuffix(".token_adapter"), *_token_rows(mod))
            elif isinstance(mod, ModulesToSaveWrapper) and "default" in mod.modules_to_save:
                path = _peft_path(name)
                rows, bias = _saved_rows(mod.original_module, mod.modules_to_save["default"], path, folder)
                if rows is not None:
                    _add_rank(out, path, *rows)
                    if saved is not None:
                        saved.append(path)
                if bias is not None:
                    _add_bias(out, path, bias, mod.original_module.weight.dtype, folder)
        _check_against_peft(base_model, adapted, out, folder)
    return out


def _delta_rows(params: dict[str, np.ndarray], layer: Any, path: str, folder: Path) -> None:
    """A layer of one of PEFT's other adapter types (:data:`~flora_graph.adapters.peft.THROUGH_PEFT`) on a ``Linear``
    (GPT-2's ``Conv1D``) into ``params`` as a slot: its change of the weight, ``delta = W' - W``, where ``W'`` is what
    PEFT's own ``merge`` makes of the base weight ``W`` (:func:`_merged_change`: additive types such as VeRA and LoHa
    add a change that needs the adapter alone; OFT, BOFT and HRA rotate or reflect ``W``, IA3 scales it, MiSS's ``bat``
    mode reads it: for the base the package holds, each is the one change ``W' - W``), factored exactly, and the change
    of the bias, where the merge changes it (IA3 scaling a layer's outputs), as the slot's bias. Where the change's rank
    is at most half the smaller size (VeRA's, LoHa's, VB-LoRA's, MiSS's, ...) ``A`` and ``B`` are its singular vectors,
    the values folded into ``B``, up to the float64 rank (singular values past ``s_max * max(out, in) * eps32``, what
    float32 can tell apart, dropped); otherwise ``A`` is the identity and ``B`` the change itself (a slot of full rank,
    as a module trained whole: OFT's and IA3's changes). A layer with no change adds no entry. Raises
    :class:`AdapterError` naming the module for a layer on another kind of module (LN tuning's ``LayerNorm``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    kind = type(layer).__module__.split(".")[2] if type(layer).__module__.startswith("peft.tuners.") else "PEFT"
    if not isinstance(base, torch.nn.Linear | Conv1D):
        raise AdapterError(f"{folder}: module {path!r}: its {kind} layer ({type(layer).__name__}) adapts a "
                           f"{type(base).__name__}, not a Linear, whose change of the weight is what a hot-swappable "
                           f"slot holds; {_MERGE_INSTEAD}")
    delta, bias = _merged_change(layer, path, folder)
    if isinstance(base, Conv1D):  # its weight, and the change of it, laid out [in, out]
        delta = delta.T
    dtype = base.weight.dtype if base.weight.dtype != torch.bfloat16 else torch.float32
    if bias is not None and bool(bias.any()):
        _add_bias(params, path, bias.float(), base.bias.dtype, folder)
    u, values, vh = torch.linalg.svd(delta, full_matrices=False)
    if not values.numel() or values[0] == 0:
        return
    rank = int((values > values[0] * max(delta.shape) * torch.finfo(torch.float32).eps).sum())
    # about full rank: the identity on the smaller side, the change as it is
    a, b = _full_rank(delta) if 2 * rank > min(delta.shape) else (vh[:rank], u[:, :rank] * values[:rank])
    _store_rank(params, path, a, b, dtype, folder)


def _merged_change(layer: Any, path: str, folder: Path) -> tuple[Any, Any]:
    """``(W' - W, b' - b)`` in float64 of PEFT ``layer``'s adapter ``"default"``: PEFT's ``merge`` run on a float64
    copy of the layer (the model's own layer untouched), less the copy's weight and bias before it (``b' - b``:
    ``None`` where the base has no bias). Raises :class:`AdapterError` naming the module where PEFT cannot merge it."""
    twin = copy.deepcopy(layer).double()
    inner = twin.get_base_layer()
    weight = inner.weight.detach().clone()
    bias = inner.bias.detach().clone() if getattr(inner, "bias", None) is not None else None
    try:
        twin.merge(adapter_names=["default"])
    except (ValueError, NotImplementedError, TypeError, RuntimeError) as exc:
        raise AdapterError(f"{folder}: module {path!r}: PEFT cannot merge its {type(layer).__name__} layer into the "
                           f"weight ({type(exc).__name__}: {exc}), so it has no change of the weight for a "
                           f"hot-swappable slot to hold; {_MERGE_INSTEAD}") from None
    inner = twin.get_base_layer()
    change = inner.weight.detach() - weight
    return change, None if bias is None else inner.bias.detach() - bias


def _full_rank(delta: Any) -> tuple[Any, Any]:
    """``(A, B)`` of rank ``min(out, in)`` whose product ``B A`` is ``delta`` ``[out, in]`` exactly: one of them the
    change and the other the identity (``A`` the change where ``out <= in``)."""
    import torch

    out_dim, in_dim = delta.shape
    if out_dim <= in_dim:
        return delta, torch.eye(out_dim, dtype=delta.dtype)
    return torch.eye(in_dim, dtype=delta.dtype), delta


def _store_rank(params: dict[str, np.ndarray], path: str, a: Any, b: Any, dtype: Any, folder: Path) -> None:
    """A layer's ``A`` and scaled ``B`` (float tensors) into ``params`` in the adapter's ``dtype``; :class:`AdapterError`
    for bfloat16, which the adapter files do not hold."""
    import torch

    if dtype == torch.bfloat16:
        raise AdapterError(f"{folder}: module {path!r}: bfloat16 adapter weights; cast them to float32/float16")
    params[f"{path}.lora_A"] = np.ascontiguousarray(a.to(dtype).numpy())
    params[f"{path}.lora_B"] = np.ascontiguousarray(b.to(dtype).numpy())


def _check_against_peft(base_model: Any, adapted: Any, params: Mapping[str, np.ndarray], folder: Path) -> None:
    """Check ``params`` (read from the PEFT model ``adapted``) module by module against PEFT's own layers: for each
    ``Linear`` (GPT-2's ``Conv1D``) or ``Embedding`` that PEFT wraps or that ``params`` name, the base module's output on
    random inputs plus what its slot adds (``A``, ``B``, DoRA's ``d``, the bias ``c``) must be the wrapped module's.
    Raises :class:`AdapterError` naming the module where it is not: a part of the adapter that reading it lost (it would
    serve other tokens than PEFT without a word). A mixture of experts' expert tensors are left to their own tests."""
    import torch
    from peft.tuners import lora
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper
    from transformers.pytorch_utils import Conv1D

    tuners = (lora.LoraLayer, ModulesToSaveWrapper, TrainableTokensLayer, BaseTunerLayer)  # any layer PEFT put there
    tokens: dict[str, list[int]] = {}
    paths = {k.rpartition(".")[0] for k in params}
    for name, mod in adapted.named_modules():
        if isinstance(mod, tuners):
            path = _peft_path(name).removesuffix(".token_adapter")
            paths.add(path)
            if isinstance(mod, TrainableTokensLayer) and "default" in mod.token_indices:
                tokens.setdefault(path, []).extend(int(i) for i in mod.token_indices["default"])
    gen = torch.Generator().manual_seed(0)
    inner = adapted.get_base_model()
    for path in sorted(paths):
        try:
            orig, wrapped = base_model.get_submodule(path), inner.get_submodule(path)
        except AttributeError:  # a parameter's path (LoRA on expert tensors), or no module of the plain model
            continue
        if isinstance(orig, torch.nn.Embedding):
            vocab = orig.num_embeddings
            x = torch.cat([torch.randint(0, vocab, (64,), generator=gen), torch.tensor(tokens.get(path, []),
                                                                                        dtype=torch.int64)])
        elif isinstance(orig, (torch.nn.Linear, Conv1D)):
            width = orig.in_features if isinstance(orig, torch.nn.Linear) else orig.weight.shape[0]
            x = torch.randn(4, width, generator=gen, dtype=orig.weight.dtype)
        else:
            continue
        want = wrapped(x).double().numpy()
        base = orig(x).double().numpy()
        a, b = (params.get(n) for n in weight_names(path))
        if a is None:  # a slot the adapter leaves at rank 0 (a bias alone)
            width = orig.num_embeddings if x.dtype == torch.int64 else x.shape[1]
            a, b = np.zeros((0, width)), np.zeros((want.shape[-1], 0))
        d, c = params.get(magnitude_name(path)), params.get(bias_name(path))
        b0 = orig.bias.double().numpy() if d is not None and getattr(orig, "bias", None) is not None else 0.0
        # the slot's own numpy rule, as every backend is tested against; a DoRA slot reads the product without the
        # bias, which adapter-slots adds after it
        got = op_def(Op.LORA_SLOT).numpy(
            base - b0, x.numpy() if x.dtype == torch.int64 else x.double().numpy(), a.astype(np.float64),
            b.astype(np.float64), *(v.astype(np.float64) for v in (d, c) if v is not None), module=path,
            kind="embedding" if x.dtype == torch.int64 else "linear", kernel=(1, 1), stride=(1, 1), padding=(0, 0),
            dilation=(1, 1), dora=int(d is not None), lora_bias=int(c is not None)) + b0
        diff = float(np.abs(got - want).max()) if want.size else 0.0
        if diff > 1e-3 * (1.0 + float(np.abs(want).max(initial=0.0))):
            raise AdapterError(f"{folder}: module {path!r}: the adapter as read for its slots gives other outputs than "
                               f"PEFT's own layer (largest difference {diff:.3g}); refused rather than served wrong")


def _embedding_rows(params: dict[str, np.ndarray], layer: Any, path: str, folder: Path) -> None:
    """PEFT's LoRA on an embedding (``lora_embedding_A`` ``[r, vocab]``, ``lora_embedding_B`` ``[dim, r]``) into
    ``params`` in the slot's layout: ``A`` as it is, ``B`` times the scale (and a scaled embedding's ``embed_scale``,
    which PEFT applies to the LoRA's rows too). Raises :class:`AdapterError` for DoRA on it, which no slot carries."""
    import torch

    if layer.use_dora.get("default"):
        raise AdapterError(f"{folder}: module {path!r}: DoRA on an embedding layer, which no hot-swappable slot "
                           f"carries; {_MERGE_INSTEAD}")
    a = layer.lora_embedding_A["default"].detach()
    if a.dtype == torch.bfloat16:
        raise AdapterError(f"{folder}: module {path!r}: bfloat16 adapter weights; cast them to float32/float16")
    scale = layer._get_embed_scale()
    b = layer.lora_embedding_B["default"].detach().float() * float(layer.scaling["default"]) \
        * (float(scale) if scale is not None else 1.0)
    _add_rank(params, path, a.numpy().copy(), b.to(a.dtype).numpy())


def _add_bias(params: dict[str, np.ndarray], module: str, c: Any, dtype: Any, folder: Path) -> None:
    """Add the float tensor ``c`` (``[out]``) to ``module``'s bias in ``params`` (:func:`bias_name`), or set it, in
    ``dtype``."""
    import torch

    if dtype == torch.bfloat16:
        raise AdapterError(f"{folder}: module {module!r}: bfloat16 weights; cast the model to float32/float16")
    name = bias_name(module)
    if name in params:
        c = c + torch.from_numpy(params[name]).float()
    params[name] = np.ascontiguousarray(c.to(dtype).numpy())


def _saved_rows(base: Any, saved: Any, path: str, folder: Path) -> tuple[tuple[np.ndarray, np.ndarray] | None, Any]:
    """A module the adapter trained whole (PEFT's ``modules_to_save``: ``saved`` replaces ``base``) as ``(rows,
    bias)``: a LoRA of full rank ``r = min(in, out)`` in the slot's layout, ``(A, B)`` whose product is the change of
    its weight, and the change of its bias (a float tensor ``[out]``), each ``None`` where it does not change. A
    ``Linear`` (or GPT-2's ``Conv1D``, its weight transposed): ``A`` ``[r, in]``, ``B``
    ``[out, r]``, one of them the change and the other the identity. An ``Embedding``: ``A`` ``[r, vocab]``, ``B``
    ``[dim, r]``, the change of every token's row as the module computes it (a scaled embedding's rows scaled). A slot
    adds the product and the bias to the base module's output,
    so the package sums ``W x + b`` and ``(W' - W) x + (b' - b)`` where PEFT computes ``W' x + b'``: equal up to float
    rounding. Raises :class:`AdapterError` naming the module for another kind of module, which a slot cannot carry."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if type(base) is not type(saved) or not isinstance(base, (torch.nn.Linear, torch.nn.Embedding, Conv1D)):
        raise AdapterError(f"{folder}: modules_to_save trains {path!r} whole, a {type(base).__name__}; a hot-swappable "
                           f"slot carries a trained Linear (or GPT-2's Conv1D) or Embedding only: {_MERGE_INSTEAD}")
    bias = None
    if getattr(base, "bias", None) is not None and not torch.equal(saved.bias.detach(), base.bias.detach()):
        bias = saved.bias.detach().float() - base.bias.detach().float()
    w = base.weight
    if w.dtype == torch.bfloat16:
        raise AdapterError(f"{folder}: module {path!r}: bfloat16 weights; cast the model to float32/float16")
    with torch.no_grad():
        if isinstance(base, torch.nn.Embedding):  # every token's row as each module computes it: [vocab, dim]
            ids = torch.arange(w.shape[0])
            delta = (saved(ids).float() - base(ids).float()).T  # [dim, vocab], as a Linear's [out, in]
        else:
            delta = saved.weight.detach().float() - w.detach().float()
            if isinstance(base, Conv1D):  # weight [in, out]
                delta = delta.T
    if not torch.any(delta):
        return None, bias
    a, b = _full_rank(delta)
    return (a.to(w.dtype).numpy(), b.to(w.dtype).numpy()), bias


def _token_rows(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's trainable tokens of ``layer`` as a LoRA of rank ``n`` (their count), ``(A, B)`` in the slot's layout:
    the rows ``new - old`` of the tokens named, picked by one-hot factors. An embedding's ``A`` ``[n, vocab]`` picks
    each token's id and ``B`` ``[dim, n]`` holds its new row less its old (times a scaled embedding's ``embed_scale``,
    which PEFT applies to the new rows too); a tied output layer's ``A`` ``[n, dim]`` holds the rows and ``B``
    ``[vocab, n]`` puts each on its token's logit."""
    import torch

    idx = list(layer.token_indices["default"])
    base = layer.base_layer
    w = base.weight.detach().float()
    delta = layer.trainable_tokens_delta["default"].detach().float() - w[idx]  # [n, dim]
    one_hot = torch.zeros(len(idx), w.shape[0])
    one_hot[torch.arange(len(idx)), torch.tensor(idx)] = 1
    if isinstance(base, torch.nn.Embedding):
        scale = layer._get_embed_scale()
        b = delta.T * (float(scale) if scale is not None else 1.0)
        a = one_hot
    elif isinstance(base, torch.nn.Linear):
        a, b = delta, one_hot.T
    else:
        raise AdapterError(f"trainable tokens on a {type(base).__name__}, which no slot takes")
    dtype = base.weight.dtype
    if dtype == torch.bfloat16:
        raise AdapterError("trainable tokens: bfloat16 weights; cast the model to float32/float16")
    return a.to(dtype).numpy(), b.to(dtype).numpy()


def _add_rank(params: dict[str, np.ndarray], module: str, a: np.ndarray, b: np.ndarray) -> None:
    """Add ``(a, b)`` to ``module``'s adapter in ``params`` (its ranks joined: the sum of both products), or set it."""
    a_name, b_name = weight_names(module)
    if a_name in params:
        a = np.concatenate([params[a_name], a], axis=0)
        b = np.concatenate([params[b_name], b], axis=1)
    params[a_name], params[b_name] = np.ascontiguousarray(a), np.ascontiguousarray(b)
