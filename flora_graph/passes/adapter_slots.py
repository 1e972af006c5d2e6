"""adapter-slots: Replaces each LoRA site with an adapter slot whose weights are graph inputs.

``Add(base(x, W, b), s·up(down(x, A), B))`` (:data:`~flora_graph.passes.lora_pattern.LORA`,
recognised with or without tags) becomes, with ``slots="swappable"``,
``LoRASlot(base, x, <module>.lora_A, <module>.lora_B)`` and, with ``slots="mixed"``,
``LoRAMixedSlot(base, x, <module>.lora_A.stack, <module>.lora_B.stack, adapter_index)``
(the ops of :mod:`flora_graph.ops.adapters`). The weights become graph inputs whose
defaults add nothing (rank 0; for the stacks, one zero slot of rank 1), so the graph run
without them is the base model; ``adapter_index`` (int64 ``[batch]``, ``-1``: no adapter)
has no default. The branch and its weights leave the graph: read the graph's own adapter
first (:func:`own_weights`). A slot of the other kind is converted, so the pass can run on
a graph that has slots already; a graph with neither sites nor slots is refused.

Refused with :class:`~flora_graph.errors.AdapterError` naming the module: a branch whose
nodes are also read outside the site; a module with two branches; dynamic LoRA weight
shapes; a conv branch whose up projection is not 1x1 or whose down projection is grouped;
for per-row slots, a site whose input's first dim is not the batch dim of the first graph
input, or a non-pointwise conv site without static spatial dims. A linear site whose input is
``[batch*seq, features]``, flattened batch-major (a ``Reshape`` of ``[batch, seq, ...]`` followed by
row-wise ops only, as OPT's MLP and a mixture-of-experts' shared expert run), gets its per-row slot
between ``Reshape``\\ s to ``[batch, -1, features]`` and back. And a graph in which a
node tagged as part of a LoRA adapter (``meta["role"]`` / ``meta["module"]`` from capture,
or the roles the fusing passes give) no longer belongs to an intact site or slot: a pass
fused or merged that adapter, and a slot made of the rest would bake it in silently.

The presets' passes leave a slot alone: no pattern of theirs has a slot op, and a slot's
weights are graph inputs, never static, so nothing folds, merges, concatenates or
reassociates them. Run this pass before a preset (``optimize(graph, preset, slots="swappable")``)
and every adapter stays swappable. The one pass that rewrites slots, on request, is
``pack-slots`` (:mod:`flora_graph.passes.pack_slots`): it joins sibling slots into one that
stays swappable, its adapters packed from the per-module ones where they are loaded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flora_graph.errors import AdapterError, GraphError
from flora_graph.ir import ComputationNode, Graph, Op, OpGroup
from flora_graph.ir.shapes import Dim, canonical_dim, format_shape
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.lora_pattern import EMBEDDING_LORA, EXPERT_LORA, LORA, LoRAMatch, find_lora
from flora_graph.passes.param_lora import split_param_lora
from flora_graph.passes.rewrite import eval_static, schedule

__all__ = [
    "INDEX_INPUT",
    "LORA_ROLES",
    "SLOTS_DIM",
    "SLOT_KINDS",
    "SLOT_OPS",
    "adapter_slots",
    "bias_name",
    "drop_unread_inputs",
    "lora_sites",
    "magnitude_name",
    "own_weights",
    "rank_dim",
    "rewire",
    "slot_inputs",
    "slot_nodes",
    "weight_names",
]

SLOT_KINDS = ("swappable", "mixed")
SLOT_OPS: dict[str, Op] = {"swappable": Op.LORA_SLOT, "mixed": Op.LORA_MIXED_SLOT}
INDEX_INPUT = "adapter_index"
"""Name of the per-row adapter index input of mixed slots (int64 ``[batch]``, ``-1``: no adapter)."""
SLOTS_DIM = "adapter_slots"
"""Named dim of the stacks' first axis: number of adapters + 1 (the zero slot)."""
LORA_ROLES = frozenset({"base", "lora_down", "lora_up", "lora_scale", "lora_add",  # capture
                        "lora_product", "lora_down_fused", "base_and_down", "merged"})  # what passes make of them
"""``meta["role"]`` values of nodes that belong to a LoRA adapter."""


def magnitude_name(module: str, slots: str = "swappable") -> str:
    """Input name of a DoRA slot's magnitude ``d`` (``<module>.lora_magnitude``; ``.stack`` for mixed slots)."""
    return f"{module}.lora_magnitude" + ("" if slots == "swappable" else ".stack")


def bias_name(module: str, slots: str = "swappable") -> str:
    """Input name of a slot's bias ``c``, what an adapter adds to the layer's bias (``<module>.lora_bias``; ``.stack``
    for mixed slots)."""
    return f"{module}.lora_bias" + ("" if slots == "swappable" else ".stack")


def weight_names(module: str, slots: str = "swappable") -> tuple[str, str]:
    """Input names of a slot's ``A`` and ``B``: ``<module>.lora_A`` (``.stack`` for mixed slots)."""
    a, b = f"{module}.lora_A", f"{module}.lora_B"
    return (a, b) if slots == "swappable" else (f"{a}.stack", f"{b}.stack")


def rank_dim(module: str) -> str:
    """The named dim of a slot's rank: ``<module>.rank``."""
    return f"{module}.rank"


def slot_nodes(graph: Graph) -> list[ComputationNode]:
    """The adapter slot nodes of ``graph``, in graph order."""
    return [n for n in graph.nodes if n.op in OpGroup.Adapter]


def lora_sites(graph: Graph) -> list[LoRAMatch]:
    """The intact LoRA sites of ``graph`` (branch read only inside the site), in graph order.

    A module called more than once (Gemma 3n's AltUp router runs twice a layer) has one site per call, all
    with its one ``A`` and ``B``; its slots then read the same weight inputs. Raises :class:`AdapterError`
    naming the module for a branch read outside its site or a module with two different branches. An
    empty list when there are none.
    """
    users = graph.users()
    outputs = {id(n) for n in graph.outputs.values()}
    found: list[LoRAMatch] = []
    seen: dict[str, tuple[str | float | None, ...]] = {}  # module -> the params of its A and B, its scale
    for m in find_lora(graph, LORA | EMBEDDING_LORA | EXPERT_LORA):
        inner = [m.down, m.up, *(n for n in (m.scale, m.scale2) if n is not None)]
        allowed = {id(n) for n in (*inner, m.add)}
        for n in inner:
            others = [u.name for u in users.get(n, []) if id(u) not in allowed]
            if others or id(n) in outputs:
                raise AdapterError(f"module {m.module!r}: LoRA node {n.name!r} is also read by {others or ['<output>']}; "
                                   "make the slots before fuse-lora-siblings / reassociate-low-rank (optimize(..., slots=...))")
        weights = (_param(m.A), _param(m.B), _scale(graph, m))
        if m.module in seen and (None in weights[:2] or seen[m.module] != weights):
            raise AdapterError(f"module {m.module!r} carries more than one LoRA branch (other weights, or weights "
                               "that are not its parameters); one slot per module is supported")
        seen[m.module] = weights
        found.append(m)
    return found


def _param(node: ComputationNode) -> str | None:
    """The parameter a ``Const`` node holds, or whose transpose it is (an embedding's ``A.T``); ``None`` for
    another node."""
    if node.op is Op.TRANSPOSE and node.inputs[0].op is Op.CONST:
        return f"{node.inputs[0].attrs['param']}.T"
    return str(node.attrs["param"]) if node.op is Op.CONST else None


def _scale(graph: Graph, m: LoRAMatch) -> float | None:
    """A site's scale as a number (capture makes one ``Const`` of it per call), ``None`` without one."""
    return None if m.s is None else _factor(graph, m, {})


def _factor(graph: Graph, m: LoRAMatch, memo: dict[ComputationNode, np.ndarray]) -> float:
    """The factor on a site's branch: its scale ``s``, times an embedding's ``s2`` (``1.0`` without either)."""
    return math.prod(float(np.asarray(eval_static(graph, v, memo), dtype=np.float64).reshape(-1)[0])
                     for v in (m.s, m.s2) if v is not None)


def own_weights(graph: Graph, m: LoRAMatch, memo: dict[ComputationNode, np.ndarray] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """A site's own ``(A, s·B)`` (the scale folded into ``B``, in ``B``'s dtype), as a slot takes them (an embedding's
    ``A`` as ``[r, vocab]``, PEFT's layout, from the ``[vocab, r]`` table its ids index; an expert site's
    ``[experts, r, in]`` and ``[experts, out, r]``)."""
    memo = {} if memo is None else memo
    a = np.array(eval_static(graph, m.A, memo), copy=True)
    if m.op is Op.GATHER:
        a = np.ascontiguousarray(a.T)
    b = np.asarray(eval_static(graph, m.B, memo))
    s = _factor(graph, m, memo)
    return a, (b.astype(np.float32) * np.float32(s)).astype(b.dtype)


@dataclass
class _Site:
    """What a slot is made of: from an intact site (``root`` its ``Add``) or a slot to convert (``root`` itself)."""

    module: str
    kind: str  # "linear", "conv", "embedding" or "experts"
    root: ComputationNode
    base: ComputationNode
    x: ComputationNode
    in_dims: tuple[int, ...]  # A's dims after the rank
    out: int
    dtype: str
    attrs: dict[str, Any]
    meta: dict[str, Any]
    ids: ComputationNode | None = None  # an experts site's per-pair expert ids
    w: ComputationNode | None = None  # a linear site's base weight and bias (a DoRA slot reads the product without it)
    bias: ComputationNode | None = None


def _site_of_match(m: LoRAMatch) -> _Site:
    module, a, b = m.module, m.A.shape, m.B.shape
    assert m.add is not None and m.base is not None
    if not all(isinstance(d, int) for d in (*a, *b)):
        raise AdapterError(f"module {module!r}: LoRA weights have dynamic shapes {format_shape(a)}, {format_shape(b)}")
    if tuple(m.base.shape) != tuple(m.add.shape) or m.base.dtype != m.add.dtype:
        raise AdapterError(f"module {module!r}: its Add {m.add.name!r} broadcasts the base layer {m.base.name!r}")
    meta = {**m.add.meta, "role": "lora_slot"} if m.add.meta else {"role": "lora_slot", "module": module}
    attrs: dict[str, Any] = {"module": module, "kind": "linear"}
    if m.op is Op.LINEAR:
        return _Site(module, "linear", m.add, m.base, m.x, (int(a[1]),), int(b[0]), m.A.dtype, attrs, meta, w=m.W,
                     bias=m.bias)
    if m.op is Op.EXPERT_LINEAR:  # A [experts, r, in], B [experts, out, r]; in_dims: (experts, in)
        attrs["kind"] = "experts"
        return _Site(module, "experts", m.add, m.base, m.x, (int(a[0]), int(a[2])), int(b[1]), m.A.dtype, attrs, meta,
                     m.ids)
    if m.op is Op.GATHER:  # A is the [vocab, r] table the ids index
        attrs["kind"] = "embedding"
        return _Site(module, "embedding", m.add, m.base, m.x, (int(a[0]),), int(b[0]), m.B.dtype, attrs, meta)
    up, down = m.up.attrs, m.down.attrs
    if tuple(b[2:]) != (1, 1) or up["stride"] != (1, 1) or up["padding"] != (0, 0) or up["dilation"] != (1, 1):
        raise AdapterError(f"module {module!r}: the LoRA up projection must be a pointwise (1x1) convolution, "
                           f"got B {format_shape(b)} with {dict(up)}")
    if down["groups"] != 1 or up["groups"] != 1:
        raise AdapterError(f"module {module!r}: grouped LoRA projections (groups={down['groups']}) are unsupported")
    attrs.update(kind="conv", kernel=tuple(int(d) for d in a[2:]), stride=down["stride"], padding=down["padding"],
                 dilation=down["dilation"])
    return _Site(module, "conv", m.add, m.base, m.x, tuple(int(d) for d in a[1:]), int(b[0]), m.A.dtype, attrs, meta)


def _site_of_slot(n: ComputationNode) -> _Site:
    base, x, kind = n.inputs[0], n.inputs[1], n.attrs["kind"]
    if kind == "linear":
        in_dims, out = (int(x.shape[-1]),), int(base.shape[-1])
    elif kind == "embedding":
        in_dims, out = (int(n.inputs[2].shape[-1] if n.op is Op.LORA_SLOT else n.inputs[2].shape[1]),), int(base.shape[-1])
    elif kind == "experts":  # A [experts, r, in], or its stack [slots, experts, R, in]; ids the last input
        a = n.inputs[2].shape
        in_dims, out = (int(a[0] if n.op is Op.LORA_SLOT else a[1]), int(x.shape[-1])), int(base.shape[-1])
    else:
        in_dims, out = (int(x.shape[1]), *n.attrs["kernel"]), int(base.shape[1])
    return _Site(n.attrs["module"], kind, n, base, x, in_dims, out, n.dtype, dict(n.attrs), dict(n.meta),
                 n.inputs[-1] if kind == "experts" else None)


def _check_intact(graph: Graph, covered: set[str]) -> None:
    """Refuse a graph with live LoRA-tagged nodes of a module that is neither an intact site nor a slot."""
    lost: dict[str, set[str]] = {}
    for n in graph.live_nodes():
        role = n.meta.get("role")
        if role not in LORA_ROLES:
            continue
        mods = [str(n.meta["module"])] if n.meta.get("module") else []
        mods += [m for m in str(n.meta.get("modules", "")).split(",") if m]
        for mod in mods:
            if mod not in covered:
                lost.setdefault(mod, set()).add(str(role))
    if lost:
        names = sorted(lost)
        listed = ", ".join(map(repr, names[:12])) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        roles = sorted(set().union(*lost.values()))
        raise AdapterError(
            f"graph {graph.name!r}: module(s) {listed} are no longer intact LoRA sites (a pass fused or merged their "
            f"adapter: roles {roles}), so they cannot stay swappable and exporting would bake their adapter in; make the "
            "slots before optimizing (optimize(graph, preset, slots='swappable') or flora-graph optimize --slots "
            "swappable), or export the graph as captured")


# ops whose output row i (first axis of a [rows, features] tensor) is computed from their first operand's row i
_ROW_WISE = OpGroup.Unary | OpGroup.Binary | OpGroup.Adapter | {Op.LINEAR, Op.MATMUL, Op.LAYER_NORM, Op.RMS_NORM}


def _batch_major(x: ComputationNode, batch: Dim) -> bool:
    """Whether ``x`` ``[batch*seq, features]`` holds its rows batch-major: reached from a ``Reshape`` that merges
    ``[batch, seq, ..., features]`` into ``[batch*seq, features]`` through row-wise ops only (a flattened MLP, as
    OPT's layers and a mixture-of-experts' shared expert run), so ``[batch, -1, features]`` gives each batch row
    its own tokens back."""
    rows = canonical_dim(x.shape[0])
    n = x
    while n.op is not Op.RESHAPE:
        features_split = n.op is Op.SPLIT and n.attrs.get("axis") in (-1, 1)  # a packed layer's pieces
        if not (n.op in _ROW_WISE or features_split) or not n.inputs or len(n.shape) != 2 \
                or canonical_dim(n.shape[0]) != rows:
            return False
        n = n.inputs[0]
    src = n.inputs[0].shape
    return (len(n.shape) == 2 and canonical_dim(n.shape[0]) == rows and len(src) >= 3
            and canonical_dim(src[0]) == batch and canonical_dim(n.shape[1]) == canonical_dim(src[-1]))


def _check_rows(graph: Graph, sites: Iterable[_Site]) -> tuple[Dim, dict[str, str]]:
    """The batch dim of per-row slots (the first graph input's first dim, which every site's input must lead
    with) and the modules whose input holds it otherwise: ``"flat"``, flattened batch-major
    (:func:`_batch_major`), or ``"second"``, sequence-first ``[seq, batch, ..., features]`` (FSMT's layers)."""
    if not graph.inputs or not graph.inputs[0].shape:
        raise AdapterError(f"graph {graph.name!r}: the first input must have a batch dim for per-row adapters")
    first = graph.inputs[0]
    batch = canonical_dim(first.shape[0])
    layout: dict[str, str] = {}
    for s in sites:
        shape = s.x.shape
        if s.kind == "experts":  # (token, expert) pairs, batch-major: [batch*seq*k, in]
            if str(batch) not in str(canonical_dim(shape[0])).split("*"):
                raise AdapterError(f"module {s.module!r}: its (token, expert) pairs {s.x.name!r} {list(shape)} are not "
                                   f"a multiple of the batch dim {batch!r} of input {first.name!r}; rows cannot pick "
                                   "adapters there")
            continue
        if s.kind == "linear" and len(shape) == 2 and canonical_dim(shape[0]) != batch and _batch_major(s.x, batch):
            layout[s.module] = "flat"
            continue
        if s.kind == "linear" and len(shape) >= 3 and canonical_dim(shape[0]) != batch \
                and canonical_dim(shape[1]) == batch:
            layout[s.module] = "second"
            continue
        if len(shape) < 2 or canonical_dim(shape[0]) != batch:
            raise AdapterError(f"module {s.module!r}: its input {s.x.name!r} has shape {list(shape)}, whose first dim is "
                               f"not the batch dim {batch!r} of input {first.name!r} (nor its second, nor its rows "
                               "flattened batch-major from it); rows cannot pick adapters there")
        pointwise = (s.attrs.get("kernel"), s.attrs.get("stride"), s.attrs.get("padding")) == ((1, 1), (1, 1), (0, 0))
        if s.kind == "conv" and not pointwise and not all(isinstance(d, int) for d in shape[2:]):
            raise AdapterError(f"module {s.module!r}: per-row conv adapters need static spatial dims, got {list(shape)}")
    return batch, layout


def rewire(graph: Graph, repl: Mapping[ComputationNode, ComputationNode]) -> None:
    """Every reader of a key (and every output) reads its value instead, in one walk."""
    for n in graph.nodes:
        if any(i in repl for i in n.inputs):
            n.inputs = [repl.get(i, i) for i in n.inputs]
    for k, v in graph.outputs.items():
        graph.outputs[k] = repl.get(v, v)


def drop_unread_inputs(graph: Graph, candidates: Iterable[ComputationNode]) -> None:
    """Remove the graph inputs among ``candidates`` that no node reads any more (a replaced slot's weights)."""
    read = {i for n in graph.nodes for i in n.inputs}
    for i in dict.fromkeys(candidates):
        if i not in read and i in graph.inputs:
            graph.remove_input(i)


def _input(graph: Graph, module: str, name: str, dims: tuple[Dim, ...], dtype: str, default: np.ndarray | None):
    try:
        return graph.input(name, dims, dtype, default=default)
    except GraphError as exc:
        raise AdapterError(f"module {module!r}: cannot add its slot input {name!r}: {exc}") from None


def slot_inputs(graph: Graph, module: str, kind: str, in_dims: tuple[int, ...], out: int, dtype: str,
                slots: str) -> tuple[ComputationNode, ComputationNode]:
    """New graph inputs for the ``A`` and ``B`` of ``module``'s ``slots`` slot, with defaults that add nothing."""
    a_name, b_name = weight_names(module, slots)
    r = rank_dim(module)
    if kind == "experts":  # in_dims (experts, in): A [experts, r, in], B [experts, out, r] (a stack of them)
        lead = () if slots == "swappable" else (SLOTS_DIM,)
        a_dims, b_dims = (*lead, in_dims[0], r, in_dims[1]), (*lead, in_dims[0], out, r)
    elif slots == "swappable":
        tail = (1, 1) if kind == "conv" else ()
        a_dims, b_dims = (r, *in_dims), (out, r, *tail)
    elif kind == "conv":  # A as [slots, R, kh*kw*C] (taps major), B as [slots, out, R]
        a_dims, b_dims = (SLOTS_DIM, r, math.prod(in_dims)), (SLOTS_DIM, out, r)
    else:  # A.T as [slots, in, R], B.T as [slots, R, out]
        a_dims, b_dims = (SLOTS_DIM, in_dims[0], r), (SLOTS_DIM, r, out)
    size = 0 if slots == "swappable" else 1  # rank 0; one zero slot of rank 1
    made = []
    for name, dims in ((a_name, a_dims), (b_name, b_dims)):
        default = np.zeros([size if isinstance(d, str) else d for d in dims], dtype)
        made.append(_input(graph, module, name, dims, dtype, default))
    return made[0], made[1]


def _vector_sites(sites: list[_Site], dora: Iterable[str], bias: Iterable[str]) -> None:
    """Mark the sites of the ``dora`` modules (and converted DoRA slots) as DoRA slots, and those of the ``bias``
    modules (and converted slots with a bias) as slots with a bias; refuse a module that is no linear site of its own.
    A module without a site here is left alone (an encoder-decoder's other graph has it)."""
    for key, want, why in (("dora", set(dora), "DoRA's magnitude rescales a linear layer's rows"),
                           ("lora_bias", set(bias), "an adapter's bias adds to a linear layer's outputs")):
        for s in sites:
            if s.module in want or s.attrs.get(key):
                if s.kind != "linear" or s.attrs.get("members"):
                    raise AdapterError(f"module {s.module!r}: {why}; its {s.kind} slot cannot take one")
                s.attrs[key] = 1


def _vector_input(graph: Graph, module: str, name: str, out: int, dtype: str, slots: str) -> ComputationNode:
    """A slot's vector input ``[out]`` (a stack ``[slots, out]``), zeros by default: a DoRA slot's magnitude
    ``d = m / ||W + s B A|| - 1`` per output row (no rescaling), a slot's bias (none added)."""
    dims = (out,) if slots == "swappable" else (SLOTS_DIM, out)
    default = np.zeros([1 if isinstance(d, str) else d for d in dims], dtype)
    return _input(graph, module, name, dims, dtype, default)


@register_pass("adapter-slots")
def adapter_slots(graph: Graph, *, slots: str = "swappable", dora: Iterable[str] = (),
                  bias: Iterable[str] = ()) -> PassResult:
    """Make every LoRA site (and every slot of the other kind) a ``slots`` slot; stats ``slots`` lists the modules.

    ``dora``: modules whose slots also take DoRA's magnitude (a weight-decomposed adapter, PEFT's ``use_dora``):
    the slot reads the layer's product without its bias and gives ``(1 + d) * (base + delta)``, the bias added
    after; an adapter without DoRA leaves ``d`` at its default, zeros. ``bias``: modules whose slots also take a
    bias ``c`` (:func:`bias_name`), added to their output: what an adapter adds to the layer's bias (PEFT's
    ``lora_bias``, a trained bias); an adapter without one leaves ``c`` at its default, zeros."""
    t0 = time.perf_counter()
    if slots not in SLOT_KINDS:
        raise ValueError(f"adapter-slots: slots={slots!r}; expected one of {list(SLOT_KINDS)}")
    split_param_lora(graph)  # LoRA on parameters (expert tensors, a router's weight) as sites of their own
    matches = lora_sites(graph)  # a module called twice has two sites on its one A and B
    existing = slot_nodes(graph)
    modules = [m.module for m in matches] + [n.attrs["module"] for n in existing]
    twice = sorted({m.module for m in matches} & {n.attrs["module"] for n in existing})
    if twice:
        raise AdapterError(f"module(s) {twice} carry a LoRA branch and a slot; one slot per module is supported")
    _check_intact(graph, set(modules))
    if not modules:
        raise AdapterError(f"graph {graph.name!r} has no LoRA branch (Add(base(x, W), up(down(x, A), B) [* s])) to "
                           "make swappable; apply_lora to the modules to serve adapters on, then capture")
    op = SLOT_OPS[slots]
    convert = [n for n in existing if n.op is not op]
    sites = [_site_of_match(m) for m in matches] + [_site_of_slot(n) for n in convert]
    stats: dict[str, Any] = {"fired": {}, "refused": {}, "slots": list(dict.fromkeys(s.module for s in sites))}
    if not sites:
        return PassResult(graph, False, {**stats, "time_s": time.perf_counter() - t0})
    _vector_sites(sites, dora, bias)
    batch, layout = _check_rows(graph, sites) if slots == "mixed" else (None, {})
    # 1. detach each site behind a placeholder, so its branch (and its weights' names) leave the graph
    holders = {s.root: graph.add(Op.IDENTITY, [s.base], name=f"{s.module}.lora_slot_pending") for s in sites}
    rewire(graph, holders)
    old = list(dict.fromkeys(i for n in convert for i in n.inputs[2:]))  # a converted slot's weight (and index) inputs
    graph.remove_dead()
    drop_unread_inputs(graph, old)
    # 2. the slots, their weights graph inputs (the index after the first site's stacks, as serving exports)
    index = next((i for i in graph.inputs if i.name == INDEX_INPUT), None)
    made: dict[ComputationNode, ComputationNode] = {}
    weights: dict[str, tuple[ComputationNode, ...]] = {}  # one A and B per module, however often it runs
    for s in sites:
        if s.module not in weights:
            weights[s.module] = slot_inputs(graph, s.module, s.kind, s.in_dims, s.out, s.dtype, slots)
            for key, name in (("dora", magnitude_name), ("lora_bias", bias_name)):
                if s.attrs.get(key):
                    weights[s.module] += (_vector_input(graph, s.module, name(s.module, slots), s.out, s.dtype, slots),)
        a, b = weights[s.module][:2]
        ins = [holders.get(s.base, s.base), holders.get(s.x, s.x), a, b]  # x may be another site: its holder for now
        base_bias = None
        if s.attrs.get("dora") and s.bias is not None:  # the product without its bias, which is added after
            ins[0] = graph.add(Op.LINEAR, [ins[1], s.w], name=f"{s.module}.base_without_bias", meta=s.meta)
            base_bias = s.bias
        if slots == "mixed":
            if index is None:
                index = _input(graph, s.module, INDEX_INPUT, (batch,), "int64", None)  # type: ignore[arg-type]
            ins.append(index)
        if s.ids is not None:
            ins.append(holders.get(s.ids, s.ids))
        ins.extend(weights[s.module][2:])  # a DoRA slot's magnitude, a slot's bias
        try:
            if s.module in layout:  # rows as [batch, seq, f] for the slot, and back
                if layout[s.module] == "flat":  # from [batch*seq, f]
                    there, back = {"shape": (batch, -1, int(s.x.shape[-1]))}, {"shape": (-1, s.out)}
                    there_base = {"shape": (batch, -1, s.out)}
                    how = Op.RESHAPE
                else:  # from [seq, batch, ..., f]: the first two axes swapped, there and back
                    there = back = there_base = {"perm": (1, 0, *range(2, len(s.x.shape)))}
                    how = Op.TRANSPOSE
                ins[:2] = [graph.add(how, [v], attrs, name=f"{s.module}.lora_slot/rows_{what}", meta=s.meta)
                           for v, attrs, what in zip(ins[:2], (there_base, there), ("base", "x"), strict=True)]
                slot = graph.add(op, ins, s.attrs, name=f"{s.module}.lora_slot/by_row", meta=s.meta)
                made[holders[s.root]] = graph.add(how, [slot], back, name=f"{s.module}.lora_slot", meta=s.meta)
            else:
                made[holders[s.root]] = graph.add(op, ins, s.attrs, name=f"{s.module}.lora_slot", meta=s.meta)
            if base_bias is not None:
                made[holders[s.root]] = graph.add(Op.ADD, [made[holders[s.root]], base_bias], name=f"{s.module}.bias",
                                                  meta=s.meta)
        except GraphError as exc:
            raise AdapterError(f"module {s.module!r}: cannot make its slot: {exc}") from None
    rewire(graph, made)
    schedule(graph)
    graph.remove_dead()
    stats["fired"] = {"adapter-slots": len(sites)}
    stats["converted"] = [n.attrs["module"] for n in convert]
    return PassResult(graph, True, {**stats, "time_s": time.perf_counter() - t0})
