"""LoRA sites of a graph as swappable *slots*, and adapter weights as ``{param name: array}``.

A :class:`LoRASlot` is one adapted module with the rank left open: ``A`` is
``[rank, *in_dims]`` and ``B`` is ``[out, rank, *b_tail]`` (PEFT's layout; ``in_dims`` is
``(in,)`` for a ``Linear`` and ``(C, kh, kw)`` for a ``Conv2d``, whose ``B`` is 1x1). An
adapter is a plain mapping ``{"<module>.lora_A": A, "<module>.lora_B": s·B}`` with the
scale ``s`` already folded into ``B``, so any source (our ``LoRAAdapter`` models, a
graph's own weights, a PEFT checkpoint) can be written and loaded the same way. A module an
adapter leaves out runs as the base layer.

:func:`prepare` finds the sites with :func:`~flora_graph.passes.find_lora` (tags are not
needed) and returns a copy of the graph in which each site's ``Add(base, branch)`` is an
``Identity(base)`` whose lowering :mod:`flora_graph.serving` supplies; the branch itself is
dead there, so the exported model holds no adapter weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flora_graph.errors import FloraGraphError
from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.shapes import format_shape
from flora_graph.passes import LoRAMatch, find_lora
from flora_graph.passes.rewrite import eval_static
from flora_graph.serving.errors import AdapterFileError, ServingError

__all__ = [
    "METADATA_KEY",
    "LoRASite",
    "LoRASlot",
    "ParamSpec",
    "adapter_params",
    "check_params",
    "graph_adapter_params",
    "param_spec",
    "prepare",
    "slots_from_metadata",
    "slots_to_metadata",
]

METADATA_KEY = "flora_graph.lora_slots"
"""Key of the ONNX ``metadata_props`` entry holding the slots as JSON."""

ParamSpec = dict[str, tuple[tuple[int | str | None, ...], np.dtype]]
"""``{param name: (dims, dtype)}``: an int dim must match, a str dim is a symbol every param using it shares."""


@dataclass(frozen=True)
class LoRASlot:
    """One swappable LoRA site: module path, kind and weight shapes with the rank left open."""

    module: str
    kind: str  # "linear" or "conv"
    in_dims: tuple[int, ...]  # A's dims after the rank
    out: int
    b_tail: tuple[int, ...]  # B's dims after the rank: () or (1, 1)
    dtype: str
    stride: tuple[int, ...] = ()  # conv only: the down projection's attributes
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def a_name(self) -> str:
        """Parameter (and ONNX input) name of ``A``."""
        return f"{self.module}.lora_A"

    @property
    def b_name(self) -> str:
        """Parameter (and ONNX input) name of ``B`` (scale folded in)."""
        return f"{self.module}.lora_B"

    @property
    def rank_dim(self) -> str:
        """The symbolic dim naming this slot's rank in the ONNX model."""
        return f"{self.module}.rank"

    def a_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of ``A`` at ``rank``."""
        return (rank, *self.in_dims)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of ``B`` at ``rank``."""
        return (self.out, rank, *self.b_tail)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoRASlot:
        """Inverse of :meth:`to_json`; raises ``ServingError`` on a malformed entry."""
        try:
            kw = {k: tuple(int(x) for x in v) if isinstance(v, list) else v for k, v in d.items()}
            slot = cls(**kw)
        except (TypeError, ValueError) as exc:
            raise ServingError(f"malformed LoRA slot entry {dict(d)!r}: {exc}") from None
        if slot.kind not in ("linear", "conv") or not isinstance(slot.module, str) or not isinstance(slot.out, int):
            raise ServingError(f"malformed LoRA slot entry {dict(d)!r}")
        return slot


@dataclass
class LoRASite:
    """A slot and where it sits in a prepared graph: its input ``x`` and the ``Identity(base)`` standing for it."""

    slot: LoRASlot
    x: ComputationNode
    site: ComputationNode


def _slot_of(m: LoRAMatch, graph: Graph) -> LoRASlot:
    module = m.module
    a, b = m.A.shape, m.B.shape
    if not all(isinstance(d, int) for d in (*a, *b)):
        raise ServingError(f"module {module!r}: LoRA weights have dynamic shapes {format_shape(a)}, {format_shape(b)}")
    if m.op is Op.LINEAR:
        return LoRASlot(module, "linear", (int(a[1]),), int(b[0]), (), m.A.dtype)
    up = m.up.attrs
    if tuple(b[2:]) != (1, 1) or up["stride"] != (1, 1) or up["padding"] != (0, 0) or up["dilation"] != (1, 1):
        raise ServingError(f"module {module!r}: the LoRA up projection must be a pointwise (1x1) convolution, "
                           f"got B {format_shape(b)} with {dict(up)}")
    d = m.down.attrs
    if d["groups"] != 1:
        raise ServingError(f"module {module!r}: grouped LoRA down projection (groups={d['groups']}) is unsupported")
    return LoRASlot(module, "conv", tuple(int(v) for v in a[1:]), int(b[0]), (1, 1), m.A.dtype,
                    tuple(d["stride"]), tuple(d["padding"]), tuple(d["dilation"]))


def _matches(graph: Graph) -> list[LoRAMatch]:
    """The LoRA sites of ``graph`` whose branch is read only inside the site; errors name the module."""
    users = graph.users()
    outputs = {id(n) for n in graph.outputs.values()}
    found, seen = [], set()
    for m in find_lora(graph):
        inner = [m.down, m.up, *([m.scale] if m.scale is not None else [])]
        allowed = {id(n) for n in (*inner, m.add)}
        for n in inner:
            others = [u.name for u in users.get(n, []) if id(u) not in allowed]
            if others or id(n) in outputs:
                raise ServingError(f"module {m.module!r}: LoRA node {n.name!r} is also read by {others or ['<output>']}; "
                                   "export the unfused graph (before fuse-lora-siblings / reassociate-low-rank)")
        if m.module in seen:
            raise ServingError(f"module {m.module!r} carries more than one LoRA branch; one slot per module is supported")
        seen.add(m.module)
        found.append(m)
    if not found:
        raise ServingError(f"graph {graph.name!r} has no LoRA branch (Add(base(x, W), up(down(x, A), B) [* s])) "
                           "to make swappable; apply_lora to the modules to serve adapters on, then capture")
    return found


def graph_adapter_params(graph: Graph) -> dict[str, np.ndarray]:
    """The graph's own adapter as ``{param name: array}`` (``s·B`` folded, in ``B``'s dtype)."""
    out: dict[str, np.ndarray] = {}
    memo: dict[ComputationNode, np.ndarray] = {}
    for m in _matches(graph):
        slot = _slot_of(m, graph)
        a = np.asarray(eval_static(graph, m.A, memo))
        b = np.asarray(eval_static(graph, m.B, memo))
        s = 1.0 if m.s is None else float(np.asarray(eval_static(graph, m.s, memo), dtype=np.float64).reshape(()))
        out[slot.a_name] = np.array(a, copy=True)
        out[slot.b_name] = (b.astype(np.float32) * np.float32(s)).astype(b.dtype)
    return out


def prepare(graph: Graph) -> tuple[Graph, list[LoRASite]]:
    """A copy of ``graph`` whose LoRA sites are ``Identity(base)`` nodes, and the sites (in graph order).

    Raises :class:`ServingError` naming the module when a branch is shared or unsupported,
    or when the graph has no LoRA branch at all.
    """
    g = graph.copy()
    sites = []
    for m in _matches(g):
        slot = _slot_of(m, g)
        assert m.base is not None and m.add is not None
        ident = g.add(Op.IDENTITY, [m.base], name=f"{m.add.name}.site",
                      meta={"role": "lora_site", "module": slot.module})
        g.replace_all_uses(m.add, ident)
        sites.append(LoRASite(slot, m.x, ident))
    g.toposort()
    g.remove_dead()
    return g, sites


def slots_to_metadata(slots: Sequence[LoRASlot], kind: str) -> dict[str, str]:
    """``metadata_props`` entries recording ``slots`` and the export ``kind`` (``swappable`` or ``mixed``)."""
    return {METADATA_KEY: json.dumps({"kind": kind, "slots": [s.to_json() for s in slots]})}


def slots_from_metadata(props: Mapping[str, str], where: str) -> tuple[str, list[LoRASlot]]:
    """``(kind, slots)`` from a model's metadata; ``ServingError`` naming ``where`` if absent or malformed."""
    if METADATA_KEY not in props:
        raise ServingError(f"{where}: not a flora_graph serving export (no {METADATA_KEY!r} metadata)")
    try:
        doc = json.loads(props[METADATA_KEY])
        return str(doc["kind"]), [LoRASlot.from_json(d) for d in doc["slots"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ServingError(f"{where}: malformed {METADATA_KEY!r} metadata ({exc})") from None


def param_spec(slots: Sequence[LoRASlot]) -> ParamSpec:
    """The :data:`ParamSpec` an adapter for ``slots`` must meet (rank symbolic per module)."""
    spec: ParamSpec = {}
    for s in slots:
        dt = np.dtype(s.dtype)
        spec[s.a_name] = ((s.rank_dim, *s.in_dims), dt)
        spec[s.b_name] = ((s.out, s.rank_dim, *s.b_tail), dt)
    return spec


def check_params(params: Mapping[str, Any], spec: ParamSpec, adapter: str, *, cast: bool = False) -> dict[str, np.ndarray]:
    """Validate adapter ``params`` against ``spec``; return them as contiguous arrays.

    Every name must be in ``spec``; int dims must match; a symbolic dim (a slot's rank)
    takes one value across the params that use it, and every param using a symbol the
    adapter binds must be present (``A`` without ``B`` is refused). Dtypes must match
    unless ``cast`` converts float arrays. Raises :class:`AdapterFileError` naming
    ``adapter`` and the parameter at fault.
    """
    out: dict[str, np.ndarray] = {}
    bound: dict[str, tuple[int, str]] = {}
    unknown = sorted(set(params) - set(spec))
    if unknown:
        near = ", ".join(sorted(spec)[:4])
        raise AdapterFileError(f"adapter {adapter!r} has parameter(s) {unknown[:5]} the model does not take "
                               f"(it is for another model?); the model's LoRA parameters are e.g. {near}")
    if not params:
        raise AdapterFileError(f"adapter {adapter!r} holds no parameters")
    for name, value in params.items():
        dims, dtype = spec[name]
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
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


def adapter_params(model: Any) -> dict[str, np.ndarray]:
    """``{param name: array}`` of every :class:`~flora_graph.adapters.LoRAAdapter` in ``model`` (``s·B`` folded).

    Names are ``"<module path>.lora_A"`` / ``"<module path>.lora_B"``, the names
    :func:`prepare` gives the slots of a graph captured from the same model.
    """
    import torch

    from flora_graph.adapters import adapters_of

    found = adapters_of(model)
    if not found:
        raise FloraGraphError(f"{type(model).__name__} has no LoRAAdapter modules")
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for path, ad in found.items():
            if ad.lora_A.dtype == torch.bfloat16:
                raise AdapterFileError(f"module {path!r}: bfloat16 adapter weights; cast the model to float32/float16")
            out[f"{path}.lora_A"] = ad.lora_A.detach().cpu().numpy().copy()
            b = ad.lora_B.detach().cpu()
            out[f"{path}.lora_B"] = (b.float() * ad.scaling).to(b.dtype).numpy()
    return out


def peft_adapter_params(base_model: Any, folder: Any) -> dict[str, np.ndarray]:
    """``{param name: array}`` of a PEFT adapter folder, for :func:`write_adapter` / sessions.

    The folder is installed on a copy of ``base_model`` (the plain model the swappable graph
    was captured from, without adapters) with :func:`~flora_graph.adapters.peft.load_peft_adapter`,
    which honours ``r``/``lora_alpha``/``use_rslora``/``rank_pattern``/``alpha_pattern`` and
    refuses what it cannot; ``base_model`` itself is not touched.
    """
    import copy

    from flora_graph.adapters.peft import load_peft_adapter

    model = copy.deepcopy(base_model)
    load_peft_adapter(model, folder)
    return adapter_params(model)
