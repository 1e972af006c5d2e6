"""Mixed-adapter batches grouped by adapter: each adapter's weights read once a call, however many rows use it, and
adapters of small ranks packed side by side, so that no rank is padded to the largest one's.

A mixed export gathers each row's adapter weights (``Gather(stack, adapter_index)``, or the rows' own weights
that :func:`~flora_graph.serving.mixed.per_row_inputs` feeds instead), so a step reads ``rows x`` one adapter's
weights even where the rows share a few adapters, as a server's rows usually do. :func:`group_rows` rewrites
the ``Linear`` slots of such a model to run on groups instead: the rows of a group are gathered together
(``Gather`` of the slot's input ``[rows, seq, in]`` by :data:`ROWS_INPUT`, ``[groups, rows in a group]``, then
reshaped to ``[groups, rows in a group * seq, in]``: one matrix product a group, not one a row), multiplied by the
group's ``A`` (input ``<stack>.groups``, ``[groups, in, R]``), masked by the rows' lanes (:data:`LANES_INPUT`,
``[groups, rows in a group, 1, R]``, one for every slot), multiplied by the group's ``B`` (``[groups, R, out]``) and put back in place
(``GatherND`` by :data:`PLACES_INPUT`, ``[rows, 2]`` of ``(group, place in it)``) before the slot's ``Add``.

A group is a bin of the call's adapters (:func:`pack_rows`): each adapter takes as many rank lanes as its largest
rank, the bins are as wide as the call's widest adapter, and the adapters go into the first bin with room, widest
first. A bin's ``A`` holds its adapters' ``A`` side by side along the rank (each cut to its rank in the slot), its
``B`` their ``B`` stacked the same way, and a row's lanes are ones on its adapter's ranks, zeros elsewhere, so that it
reads its adapter's product alone: with ranks 8 and 16 two rank-8 adapters share a bin, one rank-64 adapter and seven
of rank 8 take two bins, not eight bins of 64 (the lanes multiply exact zeros away). Rows without an adapter take no
lanes in the first bin. A call reads each adapter's weights once and no padding past its bin's; the cost is two small
gathers, a ``Mul`` and a reshape (no copy) per slot. :func:`grouped_inputs` makes the inputs of a call.
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

__all__ = ["GROUPS_SUFFIX", "LANES_INPUT", "LANES_SUFFIX", "PLACES_INPUT", "ROWS_INPUT", "Packing", "group_rows",
           "grouped_inputs", "pack_rows"]

GROUPS_SUFFIX = ".groups"
"""A stack's name + this: the input of the call's adapters' weights, one entry per group (bin), in a grouped model."""

LANES_INPUT = "lora_group_lanes"
"""``[groups, rows in a group, 1, R]``: each row's rank lanes in its group, ones on its adapter's (every slot's groups
are as wide, each adapter at the same lanes)."""

LANES_SUFFIX = ".lanes"
"""A slot's first product's name + this: the product masked by the rows' lanes."""

ROWS_INPUT = "lora_group_rows"
"""``[groups, rows in a group]`` int64: each group's rows; a group with fewer rows repeats its first."""

PLACES_INPUT = "lora_group_places"
"""``[rows, 2]`` int64: where each row sits in the groups, ``(group, place in it)``."""


_MINUS_ONE, _KEEP_ONE = "lora_group_shape.minus_one", "lora_group_shape.keep"
_LANES_FLAT, _ROWS_SHAPE, _FLAT_SHAPE = f"{LANES_INPUT}.flat", "lora_group_shape.rows", "lora_group_shape.flat"
"""Constants of the grouped model's reshapes: ``[-1]`` and ``[0]`` (a dim kept as it is)."""


def _in_features(stack: onnx.ValueInfoProto) -> int:
    """The in features of a ``Linear`` slot's ``A`` stack ``[slots, in, R]``: a static dim (``ServingError`` else)."""
    dim = stack.type.tensor_type.shape.dim[1]
    if not dim.HasField("dim_value"):
        raise ServingError(f"stack {stack.name!r} has no static in features ({dim.dim_param!r}); cannot group its rows")
    return int(dim.dim_value)


def group_rows(model: onnx.ModelProto, slots: Sequence[LoRASlot]) -> dict[str, str]:
    """Rewrite mixed export ``model`` in place so that its ``Linear`` slots run on groups of rows.

    Each such slot's ``MatMul(x, Gather(A stack, adapter_index))`` and ``MatMul(., Gather(B stack, adapter_index))``
    become ``MatMul(Gather(x, rows), <A stack>.groups)``, ``Mul(., lanes)`` and ``MatMul(., <B stack>.groups)``,
    put back per row by ``GatherND(., places)`` (``x`` gathered once, before the first slot that reads it, and the
    lanes flattened once); a DoRA slot's magnitudes keep their gather by row. A slot whose graph is not that (another
    kind, a cast between) keeps its gathers. Stacks nothing reads any more stop being inputs. Returns ``{groups input:
    stack}``, empty (the model unchanged) where no slot can be grouped (else :data:`ROWS_INPUT`, :data:`PLACES_INPUT`
    and :data:`LANES_INPUT` are inputs too); :class:`ServingError`, the model unchanged, where the new inputs' names
    are taken.
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
    widths = {first.input[0]: _in_features(inputs[stack_names(s)[0]]) for s, _, _, first, _ in plans}
    taken = {ROWS_INPUT, PLACES_INPUT, LANES_INPUT, _LANES_FLAT, _MINUS_ONE, _KEEP_ONE, _ROWS_SHAPE} \
        | {stack + GROUPS_SUFFIX for s, *_ in plans for stack in stack_names(s)} \
        | {f"{_FLAT_SHAPE}.{w}" for w in widths.values()}
    if clash := sorted(taken & (set(inputs) | set(producer) | {t.name for t in g.initializer})):
        raise ServingError(f"model {g.name!r} already has values named {clash}; cannot group its rows by adapter")

    drop = set()
    position = {id(n): k for k, n in enumerate(g.node)}
    earliest: dict[str, tuple[int, str]] = {}  # a slot input -> (the first position reading it, that slot's module)
    for s, _, _, first, _ in plans:
        earliest[first.input[0]] = min(earliest.get(first.input[0], (len(position), "")), (position[id(first)], s.module))
    # a slot input -> its rows gathered by group, flat ([groups, rows in a group * seq, in]: one product a group); the
    # shape [groups, rows in a group, seq, -1] that gives a product's rows back their place in the group, read once
    flat = {x: f"{x}{GROUPS_SUFFIX}" for x in earliest}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # nodes to put before the node at that position
    helper = onnx.helper
    first_x = min(earliest, key=lambda x: earliest[x])
    constants = {_MINUS_ONE: np.array([-1], np.int64), _KEEP_ONE: np.array([0], np.int64)}
    for x, (at, module) in earliest.items():
        grouped, name = f"{x}{GROUPS_SUFFIX}.4d", f"{module}.lora_group"
        new_nodes.setdefault(at, []).append(helper.make_node("Gather", [x, ROWS_INPUT], [grouped], axis=0, name=name))
        if x == first_x:  # the rows' shape, and the lanes over every position of a row flat as the products: once
            wide = f"{LANES_INPUT}.width"
            new_nodes[at].extend([
                helper.make_node("Shape", [grouped], [f"{_ROWS_SHAPE}.lead"], start=0, end=3, name=f"{_ROWS_SHAPE}/lead"),
                helper.make_node("Concat", [f"{_ROWS_SHAPE}.lead", _MINUS_ONE], [_ROWS_SHAPE], axis=0, name=_ROWS_SHAPE),
                helper.make_node("Shape", [LANES_INPUT], [wide], start=3, name=f"{LANES_INPUT}/width"),
                helper.make_node("Concat", [f"{_ROWS_SHAPE}.lead", wide], [f"{LANES_INPUT}.positions"], axis=0,
                                 name=f"{LANES_INPUT}/positions"),
                helper.make_node("Expand", [LANES_INPUT, f"{LANES_INPUT}.positions"], [f"{LANES_INPUT}.4d"],
                                 name=f"{LANES_INPUT}/expand"),
                helper.make_node("Concat", [_KEEP_ONE, _MINUS_ONE, wide], [f"{LANES_INPUT}.shape"], axis=0,
                                 name=f"{LANES_INPUT}/shape"),
                helper.make_node("Reshape", [f"{LANES_INPUT}.4d", f"{LANES_INPUT}.shape"], [_LANES_FLAT],
                                 name=f"{LANES_INPUT}/flat")])
        shape = f"{_FLAT_SHAPE}.{widths[x]}"
        constants[shape] = np.array([0, -1, widths[x]], np.int64)
        new_nodes[at].append(helper.make_node("Reshape", [grouped, shape], [flat[x]], name=f"{name}/flat"))
    after: dict[int, list[onnx.NodeProto]] = {}
    groups: dict[str, str] = {}
    lanes_type = inputs[stack_names(plans[0][0])[0]].type.tensor_type.elem_type
    for s, ga, gb, first, second in plans:
        a_stack, b_stack = stack_names(s)
        drop.update({id(ga), id(gb)})
        x = first.input[0]
        first.input[:] = [flat[x], a_stack + GROUPS_SUFFIX]
        h = first.output[0]
        lanes = _LANES_FLAT
        if inputs[a_stack].type.tensor_type.elem_type != lanes_type:  # a slot of another float type
            lanes = f"{_LANES_FLAT}.{s.module}"
            after.setdefault(position[id(first)], []).append(helper.make_node(
                "Cast", [_LANES_FLAT], [lanes], to=inputs[a_stack].type.tensor_type.elem_type, name=f"{s.module}.lanes"))
        after.setdefault(position[id(first)], []).append(  # each row's product with its own adapter's ranks alone
            helper.make_node("Mul", [h, lanes], [h + LANES_SUFFIX], name=f"{s.module}.lora_lanes"))
        out = second.output[0]
        second.input[:] = [h + LANES_SUFFIX, b_stack + GROUPS_SUFFIX]
        second.output[0] = out + GROUPS_SUFFIX
        after.setdefault(position[id(second)], []).extend([
            helper.make_node("Reshape", [second.output[0], _ROWS_SHAPE], [f"{out}{GROUPS_SUFFIX}.rows"],
                             name=f"{s.module}.lora_place/rows"),
            helper.make_node("GatherND", [f"{out}{GROUPS_SUFFIX}.rows", PLACES_INPUT], [out], name=f"{s.module}.lora_place")])
        groups[a_stack + GROUPS_SUFFIX], groups[b_stack + GROUPS_SUFFIX] = a_stack, b_stack
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

    replace_stack_inputs(g, {k: v for k, v in groups.items() if k.endswith(GROUPS_SUFFIX)}, read, shape)
    g.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in constants.items())
    g.input.extend([onnx.helper.make_tensor_value_info(LANES_INPUT, lanes_type, ["adapter_groups", "group_rows", 1,
                                                                              "lora_lanes"]),
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
    stack slot ``index[i]``: :data:`ROWS_INPUT`, :data:`PLACES_INPUT`, :data:`LANES_INPUT` and each
    ``<stack>.groups`` (``feeds[stack]`` packed by bin, ``[groups, ...]``). ``ranks[stack]``: each slot's rank in the
    stack and the stack's rank axis; an adapter takes as many lanes as its largest rank over the stacks, at the same
    lanes in every slot (:func:`pack_rows`)."""
    widths = np.max([ranks[stack][0] for stack in groups.values()], axis=0)
    packing = pack_rows(index, widths)
    offsets = np.zeros(widths.shape[0], np.int64)
    for slots in packing.bins:
        offsets[slots] = np.cumsum([0, *(int(widths[s]) for s in slots)])[:-1]
    width = max([1, *(sum(int(widths[s]) for s in slots) for slots in packing.bins)])
    out = {ROWS_INPUT: packing.rows, PLACES_INPUT: packing.places}
    for name, stack in groups.items():
        out[name] = _packed(feeds[stack], *ranks[stack], packing, offsets, width)
    lanes = np.zeros((*packing.rows.shape, 1, width), feeds[next(iter(groups.values()))].dtype)
    for row, (g, p) in enumerate(packing.places.tolist()):
        slot = int(packing.slots[row])
        lanes[g, p, 0, offsets[slot]:offsets[slot] + int(widths[slot])] = 1
    out[LANES_INPUT] = lanes
    return out


def _packed(stack: np.ndarray, ranks: np.ndarray, axis: int, packing: Packing, offsets: np.ndarray,
            width: int) -> np.ndarray:
    """``[groups, ...]``: each bin's slots of ``stack`` side by side along the rank ``axis`` (of the stack), slot
    ``s`` from lane ``offsets[s]`` on, cut to its rank, the rest zeros, ``width`` lanes."""
    inner = axis - 1  # the rank axis of one slot's weights
    shape = list(stack.shape[1:])
    shape[inner] = width
    out = np.zeros((len(packing.bins), *shape), stack.dtype)
    cut = (slice(None),) * inner
    for g, slots in enumerate(packing.bins):
        for slot in slots:
            r, at = int(ranks[slot]), int(offsets[slot])
            if r:
                out[(g, *cut, slice(at, at + r))] = stack[(slot, *cut, slice(0, r))]
    return out
