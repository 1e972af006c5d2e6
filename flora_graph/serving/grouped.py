"""Mixed-adapter batches grouped by adapter: each adapter's weights read once a call, however many rows use it, and
adapters of small ranks packed side by side, so that no rank is padded to the largest one's.

A mixed export gathers each row's adapter weights (``Gather(stack, adapter_index)``, or the rows' own weights
that :func:`~flora_graph.serving.mixed.per_row_inputs` feeds instead), so a step reads ``rows x`` one adapter's
weights even where the rows share a few adapters, as a server's rows usually do. :func:`group_rows` rewrites
the ``Linear`` slots of such a model to run on groups instead: the rows of a group are gathered together
(``Gather`` of the slot's input ``[rows, seq, in]`` by :data:`ROWS_INPUT`, ``[groups, rows in a group]``),
multiplied by the group's ``A`` (input ``<stack>.groups``, ``[groups, 1, in, R]``, broadcast over the group's rows),
masked by the row's lanes (``<A stack>.lanes``, ``[groups, rows in a group, 1, R]``), multiplied by the group's ``B``
(``[groups, 1, R, out]``) and put back in place (``GatherND`` by :data:`PLACES_INPUT`, ``[rows, 2]`` of ``(group,
place in it)``) before the slot's ``Add``.

A group is a bin of the call's adapters (:func:`pack_rows`): each adapter takes as many rank lanes as its largest
rank, the bins are as wide as the call's widest adapter, and the adapters go into the first bin with room, widest
first. A bin's ``A`` holds its adapters' ``A`` side by side along the rank (each cut to its rank in the slot), its
``B`` their ``B`` stacked the same way, and a row's lanes are ones on its adapter's ranks, zeros elsewhere, so that it
reads its adapter's product alone: with ranks 8 and 16 two rank-8 adapters share a bin, one rank-64 adapter and seven
of rank 8 take two bins, not eight bins of 64 (the lanes multiply exact zeros away). Rows without an adapter take no
lanes in the first bin. A call reads each adapter's weights once and no padding past its bin's; the cost is two small
gathers and a ``Mul`` per slot. :func:`grouped_inputs` makes the inputs of a call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from flora_graph.runtimes.onnx_writer import reads, subgraphs
from flora_graph.serving.errors import ServingError
from flora_graph.serving.export import INDEX_INPUT, stack_names
from flora_graph.serving.slots import LoRASlot

__all__ = ["GROUPS_SUFFIX", "LANES_SUFFIX", "PLACES_INPUT", "ROWS_INPUT", "Packing", "group_rows", "grouped_inputs",
           "pack_rows"]

GROUPS_SUFFIX = ".groups"
"""A stack's name + this: the input of the call's adapters' weights, one entry per group (bin), in a grouped model."""

LANES_SUFFIX = ".lanes"
"""An ``A`` stack's name + this: ``[groups, rows in a group, 1, R]``, each row's rank lanes in its group (ones on its
adapter's ranks)."""

ROWS_INPUT = "lora_group_rows"
"""``[groups, rows in a group]`` int64: each group's rows; a group with fewer rows repeats its first."""

PLACES_INPUT = "lora_group_places"
"""``[rows, 2]`` int64: where each row sits in the groups, ``(group, place in it)``."""


def group_rows(model: onnx.ModelProto, slots: Sequence[LoRASlot]) -> dict[str, str]:
    """Rewrite mixed export ``model`` in place so that its ``Linear`` slots run on groups of rows.

    Each such slot's ``MatMul(x, Gather(A stack, adapter_index))`` and ``MatMul(., Gather(B stack, adapter_index))``
    become ``MatMul(Gather(x, rows), <A stack>.groups)``, ``Mul(., <A stack>.lanes)`` and ``MatMul(., <B
    stack>.groups)``, put back per row by ``GatherND(., places)`` (``x`` gathered once, before the first slot that
    reads it); a DoRA slot's magnitudes keep their gather by row. A slot whose graph is not that (another kind, a cast
    between) keeps its gathers. Stacks nothing reads any more stop being inputs. Returns ``{new input: stack}`` (the
    groups' weights and the lanes, each for the stack it is made from), empty (the model unchanged) where no slot can
    be grouped; :class:`ServingError`, the model unchanged, where the new inputs' names are taken.
    """
    g = model.graph
    inputs = {i.name: i for i in g.input}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # values read besides by the graph's own nodes: its outputs, and what its nodes' subgraphs (an If's branches) read
    elsewhere = {o.name for o in g.output} | {i for n in g.node for sub in subgraphs(n) for m in sub.node for i in reads(m)}

    def gather_of(stack: str) -> onnx.NodeProto | None:
        found = [n for n in consumers.get(stack, []) if n.op_type == "Gather" and n.domain in ("", "ai.onnx")
                 and list(n.input) == [stack, INDEX_INPUT]
                 and all(a.i == 0 for a in n.attribute if a.name == "axis")]
        return found[0] if len(found) == 1 else None

    def sole(value: str) -> onnx.NodeProto | None:
        use = consumers.get(value, [])
        return use[0] if len(use) == 1 and value not in elsewhere else None

    plans = []
    for s in slots:
        if s.kind != "linear":  # a DoRA slot's product too: its magnitudes stay gathered per row
            continue
        a_stack, b_stack = stack_names(s)
        ga, gb = gather_of(a_stack), gather_of(b_stack)
        if ga is None or gb is None or a_stack not in inputs or b_stack not in inputs:
            continue
        first = sole(ga.output[0])
        if first is None or first.op_type != "MatMul" or first.input[1] != ga.output[0]:
            continue
        second = sole(first.output[0])
        if second is None or second.op_type != "MatMul" or list(second.input) != [first.output[0], gb.output[0]] \
                or sole(gb.output[0]) is not second:
            continue
        plans.append((s, ga, gb, first, second))
    if not plans:  # nothing to group (an embedding's slot alone, say): the model stays as it is
        return {}
    taken = {ROWS_INPUT, PLACES_INPUT} | {stack + GROUPS_SUFFIX for s, *_ in plans for stack in stack_names(s)} \
        | {stack_names(s)[0] + LANES_SUFFIX for s, *_ in plans}
    if clash := sorted(taken & (set(inputs) | set(producer))):
        raise ServingError(f"model {g.name!r} already has values named {clash}; cannot group its rows by adapter")

    drop = set()
    position = {id(n): k for k, n in enumerate(g.node)}
    earliest: dict[str, tuple[int, str]] = {}  # a slot input -> (the first position reading it, that slot's module)
    for s, _, _, first, _ in plans:
        earliest[first.input[0]] = min(earliest.get(first.input[0], (len(position), "")), (position[id(first)], s.module))
    gathered = {x: f"{x}{GROUPS_SUFFIX}" for x in earliest}  # a slot input -> its rows gathered by group
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # nodes to put before the node at that position
    for x, (at, module) in earliest.items():
        new_nodes.setdefault(at, []).append(
            onnx.helper.make_node("Gather", [x, ROWS_INPUT], [gathered[x]], axis=0, name=f"{module}.lora_group"))
    after: dict[int, list[onnx.NodeProto]] = {}
    groups: dict[str, str] = {}
    lanes: list[onnx.ValueInfoProto] = []
    for s, ga, gb, first, second in plans:
        a_stack, b_stack = stack_names(s)
        drop.update({id(ga), id(gb)})
        first.input[:] = [gathered[first.input[0]], a_stack + GROUPS_SUFFIX]
        masked = first.output[0] + LANES_SUFFIX  # each row's product with its own adapter's ranks alone
        after.setdefault(position[id(first)], []).append(
            onnx.helper.make_node("Mul", [first.output[0], a_stack + LANES_SUFFIX], [masked], name=f"{s.module}.lora_lanes"))
        out = second.output[0]
        second.input[:] = [masked, b_stack + GROUPS_SUFFIX]
        second.output[0] = out + GROUPS_SUFFIX
        after.setdefault(position[id(second)], []).append(
            onnx.helper.make_node("GatherND", [second.output[0], PLACES_INPUT], [out], name=f"{s.module}.lora_place"))
        groups[a_stack + GROUPS_SUFFIX], groups[b_stack + GROUPS_SUFFIX] = a_stack, b_stack
        groups[a_stack + LANES_SUFFIX] = a_stack
        a_type = inputs[a_stack].type.tensor_type
        rank = onnx.TensorShapeProto.Dimension()
        rank.CopyFrom(a_type.shape.dim[-1])  # the A stack's rank dim: the lanes' width is the groups' rank
        lanes.append(onnx.helper.make_tensor_value_info(a_stack + LANES_SUFFIX, a_type.elem_type,
                                                        ["adapter_groups", "group_rows", 1, "lanes"]))
        lanes[-1].type.tensor_type.shape.dim[-1].CopyFrom(rank)
    nodes = []
    for k, n in enumerate(g.node):
        nodes.extend(new_nodes.get(k, []))
        if id(n) not in drop:
            nodes.append(n)
        nodes.extend(after.get(k, []))
    del g.node[:]
    g.node.extend(nodes)

    read = {i for n in g.node for i in reads(n)}  # an If's branches may read a stack too
    from flora_graph.serving.mixed import replace_stack_inputs  # mixed serves this module's models

    def shape(dims) -> None:
        dims[0].dim_param = "adapter_groups"
        dims.insert(1, onnx.TensorShapeProto.Dimension(dim_value=1))  # broadcast over the group's rows

    replace_stack_inputs(g, {k: v for k, v in groups.items() if k.endswith(GROUPS_SUFFIX)}, read, shape)
    g.input.extend([*lanes,
                    onnx.helper.make_tensor_value_info(ROWS_INPUT, onnx.TensorProto.INT64, ["adapter_groups", "group_rows"]),
                    onnx.helper.make_tensor_value_info(PLACES_INPUT, onnx.TensorProto.INT64, ["batch", 2])])
    return groups


@dataclass(frozen=True)
class Packing:
    """The groups of a call (:func:`pack_rows`): ``bins`` (each group's stack slots, widest first), :data:`ROWS_INPUT`
    ``rows``, :data:`PLACES_INPUT` ``places``, and each row's stack slot ``slots``."""

    bins: list[list[int]]
    rows: np.ndarray
    places: np.ndarray
    slots: np.ndarray


def pack_rows(index: np.ndarray, widths: np.ndarray) -> Packing:
    """The groups of a call whose row ``i`` uses stack slot ``index[i]`` (``-1``: the zero slot, last), the slots
    ``widths`` rank lanes wide (``widths[slot]``): the distinct slots packed into bins as wide as the widest of them,
    widest first (ties in order of first use), each into the first bin with room; the groups in the order the bins
    open, a group's rows in row order (a group with fewer rows repeats its first: computed, never read back)."""
    index = np.asarray(index, np.int64)
    slots = np.asarray(widths).shape[0]
    own = np.where(index < 0, index + slots, index)  # the zero slot by its place
    used, first = np.unique(own, return_index=True)
    used = used[np.argsort(first, kind="stable")]  # in order of first use
    wide = [int(widths[u]) for u in used]
    capacity = max([1, *wide])
    bins: list[list[int]] = []
    room: list[int] = []
    bin_of: dict[int, int] = {}
    for k in sorted(range(len(used)), key=lambda k: -wide[k]):  # widest first, stable
        b = next((b for b, left in enumerate(room) if left >= wide[k]), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(capacity)
        bins[b].append(int(used[k]))
        room[b] -= wide[k]
        bin_of[int(used[k])] = b
    group = np.array([bin_of[int(u)] for u in own], np.int64)
    counts = np.bincount(group, minlength=len(bins))
    rows = np.zeros((len(bins), int(counts.max()) if counts.size else 0), np.int64)
    places = np.zeros((index.size, 2), np.int64)
    fill = np.zeros(len(bins), np.int64)
    for row, grp in enumerate(group.tolist()):
        rows[grp, fill[grp]] = row
        places[row] = grp, fill[grp]
        fill[grp] += 1
    for grp in range(len(bins)):
        rows[grp, fill[grp]:] = rows[grp, 0]
    return Packing(bins, rows, places, own)


def grouped_inputs(groups: Mapping[str, str], feeds: Mapping[str, np.ndarray],
                   ranks: Mapping[str, tuple[np.ndarray, int]], index: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of a call to a model :func:`group_rows` rewrote (``groups``, what it returned) whose row ``i`` uses
    stack slot ``index[i]``: :data:`ROWS_INPUT`, :data:`PLACES_INPUT`, each ``<stack>.groups`` (``feeds[stack]``
    packed by bin, ``[groups, 1, ...]``) and ``<A stack>.lanes``. ``ranks[stack]``: each slot's rank in the stack and
    the stack's rank axis; an adapter is as wide as its largest rank over the ``A`` stacks (:func:`pack_rows`)."""
    a_stacks = sorted({stack for name, stack in groups.items() if name.endswith(LANES_SUFFIX)})
    widths = np.max([ranks[stack][0] for stack in a_stacks], axis=0)
    packing = pack_rows(index, widths)
    out = {ROWS_INPUT: packing.rows, PLACES_INPUT: packing.places}
    offsets: dict[str, np.ndarray] = {}
    for name, stack in groups.items():
        if name.endswith(GROUPS_SUFFIX):
            out[name], offsets[stack] = _packed(feeds[stack], *ranks[stack], packing)
    for name, stack in groups.items():
        if name.endswith(LANES_SUFFIX):
            out[name] = _lanes(packing, ranks[stack][0], offsets[stack], out[stack + GROUPS_SUFFIX].shape[-1],
                               feeds[stack].dtype)
    return out


def _packed(stack: np.ndarray, ranks: np.ndarray, axis: int, packing: Packing) -> tuple[np.ndarray, np.ndarray]:
    """``([groups, 1, ...], offsets)``: each bin's slots of ``stack`` side by side along the rank ``axis`` (of the
    stack), each cut to its rank, the rest zeros, as wide as the widest bin; each slot's first rank lane in its bin."""
    width = max([1, *(sum(int(ranks[slot]) for slot in b) for b in packing.bins)])
    inner = axis - 1  # the rank axis of one slot's weights
    shape = list(stack.shape[1:])
    shape[inner] = width
    out = np.zeros((len(packing.bins), 1, *shape), stack.dtype)
    offsets = np.zeros(stack.shape[0], np.int64)
    for g, slots in enumerate(packing.bins):
        at = 0
        for slot in slots:
            r = int(ranks[slot])
            offsets[slot] = at
            if r:
                cut = (slice(None),) * inner
                out[(g, 0, *cut, slice(at, at + r))] = stack[(slot, *cut, slice(0, r))]
            at += r
    return out, offsets


def _lanes(packing: Packing, ranks: np.ndarray, offsets: np.ndarray, width: int, dtype: np.dtype) -> np.ndarray:
    """``[groups, rows in a group, 1, width]``: ones on each row's adapter's rank lanes in its group."""
    out = np.zeros((*packing.rows.shape, 1, width), dtype)
    for row, (g, p) in enumerate(packing.places.tolist()):
        slot = int(packing.slots[row])
        out[g, p, 0, offsets[slot]:offsets[slot] + int(ranks[slot])] = 1
    return out
