"""pack-slots: Sibling ``Linear`` adapter slots that read one input become one slot over the concatenated layer.

The q/k/v projections of an attention block (and the gate/up projections of a gated MLP)
read the same activation. Each is a slot ``LoRASlot(Linear(x, W_i), x, A_i, B_i)`` after
``adapter-slots``: three base ``MatMul``\\ s, six low-rank ``MatMul``\\ s and three ``Add``\\ s
per step, which at decode (one token) cost more in dispatch than in arithmetic, and which
run even when no adapter is active (rank 0). This pass makes them

``Split(LoRASlot(Linear(x, Concat(W_1..W_n)), x, A, B), sizes=(out_1..out_n))``

with ``A = Concat(A_1..A_n)`` ``[r_1 + ... + r_n, in]`` and ``B`` block-diagonal
``[out_1 + ... + out_n, r_1 + ... + r_n]``: one base ``MatMul``, two low-rank ``MatMul``\\ s,
one ``Add`` and one ``Split``. The arithmetic is the same sums (``B``'s off-diagonal blocks
are exact zeros), so the outputs equal the unpacked slots' up to float rounding order in
the concatenated ``MatMul``. The packed slot's module name joins the members' names
(``model.layers.0.self_attn.q_proj+k_proj+v_proj``; attributes ``members`` and
``member_outs`` record them), its weights are the graph inputs
``<packed>.lora_A`` / ``<packed>.lora_B`` (or the ``.stack`` pair of a mixed slot), and
adapters keep their per-module form: :func:`flora_graph.serving.slots.pack_params` packs
them where they enter a session or an adapter file. A mixed slot is packed the same way
(its stacks are the packed ``A.T`` / ``B.T``).

Packed: linear slots of one kind, not packed already, whose base is a ``Linear`` of the
slot's own input with a static weight, of one dtype and bias presence, read by nothing but
its slot. A module that runs more than once (PEGASUS-X's projections, on local and global tokens) is packed only
where every run of it has the same siblings, all runs then reading one packed slot's weights: an adapter's weights
for a module go to one slot. Everything else is left as it is (``refused`` says why for a lone slot).
"""

from __future__ import annotations

import time
from typing import Any

from flora_graph.ir import ComputationNode, Graph, Op, OpGroup
from flora_graph.passes.adapter_slots import INDEX_INPUT, drop_unread_inputs, rewire, slot_inputs
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.pack_linears import concat_linears
from flora_graph.passes.rewrite import schedule, static_nodes

__all__ = ["pack_slots", "packed_module_name"]

_NAME = "pack-slots"


def packed_module_name(modules: list[str]) -> str:
    """``a.b.q+k+v`` for ``a.b.q``, ``a.b.k``, ``a.b.v`` (the full names joined by ``+`` without a shared parent)."""
    parents = {m.rpartition(".")[0] for m in modules}
    if len(parents) == 1 and next(iter(parents)):
        parent = next(iter(parents))
        return f"{parent}." + "+".join(m.rpartition(".")[2] for m in modules)
    return "+".join(modules)


def _groups(graph: Graph) -> tuple[dict[tuple, list[ComputationNode]], dict[str, str]]:
    """Packable slots by (input, slot op, dtype, bias, base attrs), in graph order; why the others are not."""
    users = graph.users()
    static = static_nodes(graph)
    outputs = {id(n) for n in graph.outputs.values()}
    groups: dict[tuple, list[ComputationNode]] = {}
    refused: dict[str, str] = {}
    for n in graph.nodes:
        if n.op not in OpGroup.Adapter or n.attrs.get("kind") != "linear" or n.attrs.get("members") \
                or n.attrs.get("dora") or n.attrs.get("lora_bias"):
            continue  # a DoRA slot's magnitude rescales its own rows, a slot's bias adds to them: not packed
        base, x = n.inputs[0], n.inputs[1]
        why = None
        if base.op is not Op.LINEAR or base.inputs[0] is not x:
            why = "its base is not a Linear of the slot's input"
        elif not all(w in static for w in base.inputs[1:]):
            why = "its base weight is not static"
        elif [u.name for u in users.get(base, [])] != [n.name] or id(base) in outputs:
            why = "its base output is read outside the slot"
        if why:
            refused[n.name] = f"{_NAME}: {why}"
            continue
        key = (id(x), n.op, n.dtype, len(base.inputs), tuple(sorted(base.attrs.items())))
        groups.setdefault(key, []).append(n)
    return groups, refused


def _pack(graph: Graph, group: list[ComputationNode], made: dict[str, tuple[ComputationNode, ComputationNode]]
          ) -> tuple[dict[ComputationNode, ComputationNode], list]:
    """The packed slot and a ``Split`` per member; returns ``{old slot: its piece}`` and the old weight inputs.
    ``made``: the weight inputs of the packed modules so far, which a group of the same modules (layers called
    twice, on two inputs: PEGASUS-X's local and global tokens) reads too."""
    first = group[0]
    x, op = first.inputs[1], first.op
    modules = [str(n.attrs["module"]) for n in group]
    outs = tuple(int(n.inputs[0].shape[-1]) for n in group)
    module = packed_module_name(modules)
    bases = [n.inputs[0] for n in group]
    base = concat_linears(graph, bases, f"{module}.base", {**bases[0].meta, "module": module} if bases[0].meta else {})
    slots = "swappable" if op is Op.LORA_SLOT else "mixed"
    if module not in made:
        made[module] = slot_inputs(graph, module, "linear", (int(x.shape[-1]),), sum(outs), first.dtype, slots)
    a, b = made[module]
    ins = [base, x, a, b]
    if slots == "mixed":
        ins.append(next(i for i in graph.inputs if i.name == INDEX_INPUT))
    attrs: dict[str, Any] = {"module": module, "kind": "linear", "members": ",".join(modules), "member_outs": outs}
    meta = {**first.meta, "module": module, "modules": ",".join(modules)}
    packed = graph.add(op, ins, attrs, name=f"{module}.lora_slot", meta=meta)
    pieces = {n: graph.add(Op.SPLIT, [packed], {"axis": -1, "sizes": outs, "index": i}, name=f"{n.name}.piece",
                           meta=n.meta) for i, n in enumerate(group)}
    return pieces, [i for n in group for i in n.inputs[2:4]]


@register_pass(_NAME)
def pack_slots(graph: Graph) -> PassResult:
    """Pack sibling linear slots; stats ``packed`` lists each packed slot's members."""
    t0 = time.perf_counter()
    groups, refused = _groups(graph)
    repl: dict[ComputationNode, ComputationNode] = {}
    old: list[ComputationNode] = []
    packed: list[list[str]] = []
    made: dict[str, tuple[ComputationNode, ComputationNode]] = {}
    # a module takes one packed slot's weights or its own: one packed with the same siblings wherever it runs
    sets: dict[str, set[frozenset[str]]] = {}
    order: dict[frozenset[str], list[str]] = {}  # the first run's member order, which every run of the set takes
    for group in groups.values():
        mods = [str(n.attrs["module"]) for n in group]
        members = frozenset(mods) if len(group) > 1 else frozenset()
        order.setdefault(members, mods)
        for m in mods:
            sets.setdefault(m, set()).add(members)
    for name in refused:
        sets.setdefault(str(graph.node(name).attrs["module"]), set()).add(frozenset())
    for group in groups.values():
        if len(group) < 2:
            refused[group[0].name] = f"{_NAME}: no sibling slot reads {group[0].inputs[1].name!r}"
            continue
        members = frozenset(str(n.attrs["module"]) for n in group)
        if any(sets[m] != {members} for m in members) or len(members) < len(group):
            for n in group:
                refused[n.name] = (f"{_NAME}: module {n.attrs['module']!r} runs elsewhere with other siblings (or "
                                   "none), and one module takes one slot's weights")
            continue
        group = sorted(group, key=lambda n, first=order[members]: first.index(str(n.attrs["module"])))
        pieces, weights = _pack(graph, group, made)
        repl.update(pieces)
        old += weights
        packed.append([str(n.attrs["module"]) for n in group])
    if repl:
        rewire(graph, repl)
        schedule(graph)
        graph.remove_dead()
        drop_unread_inputs(graph, old)
    stats = {"fired": {_NAME: len(packed)} if packed else {}, "refused": refused, "packed": packed,
             "time_s": time.perf_counter() - t0}
    return PassResult(graph, bool(packed), stats)
