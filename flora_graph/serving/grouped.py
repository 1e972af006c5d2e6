"""Mixed-adapter batches grouped by adapter: each adapter's weights read once a call, however many rows use it.

A mixed export gathers each row's adapter weights (``Gather(stack, adapter_index)``, or the rows' own weights
that :func:`~flora_graph.serving.mixed.per_row_inputs` feeds instead), so a step reads ``rows x`` one adapter's
weights even where the rows share a few adapters, as a server's rows usually do. :func:`group_rows` rewrites
the ``Linear`` slots of such a model to run on groups instead: the rows that use one adapter are gathered
together (``Gather`` of the slot's input ``[rows, seq, in]`` by :data:`ROWS_INPUT`, ``[groups, rows in a
group]``), multiplied by that adapter's ``A`` and ``B`` (inputs ``<stack>.groups``, ``[groups, 1, in, R]`` /
``[groups, 1, R, out]``, one entry per adapter in the call, broadcast over the group's rows), and put back in
place (``GatherND`` by :data:`PLACES_INPUT`, ``[rows, 2]`` of ``(group, place in it)``) before the slot's
``Add``. A call reads each adapter's weights from memory once, whatever its rows' sequence lengths; the cost is
two small gathers per slot. :func:`row_groups` makes the index inputs of a call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from flora_graph.runtimes.onnx_writer import reads, subgraphs
from flora_graph.serving.errors import ServingError
from flora_graph.serving.export import INDEX_INPUT, stack_names
from flora_graph.serving.slots import LoRASlot

__all__ = ["GROUPS_SUFFIX", "PLACES_INPUT", "ROWS_INPUT", "group_rows", "row_groups"]

GROUPS_SUFFIX = ".groups"
"""A stack's name + this: the input of the call's adapters' weights, one entry per adapter, in a grouped model."""

ROWS_INPUT = "lora_group_rows"
"""``[groups, rows in a group]`` int64: each group's rows; a group with fewer rows repeats its first."""

PLACES_INPUT = "lora_group_places"
"""``[rows, 2]`` int64: where each row sits in the groups, ``(group, place in it)``."""


def group_rows(model: onnx.ModelProto, slots: Sequence[LoRASlot]) -> dict[str, str]:
    """Rewrite mixed export ``model`` in place so that its ``Linear`` slots run on groups of rows.

    Each such slot's ``MatMul(x, Gather(A stack, adapter_index))`` and ``MatMul(., Gather(B stack, adapter_index))``
    become ``MatMul(Gather(x, rows), <A stack>.groups)`` and ``MatMul(., <B stack>.groups)``, put back per row by
    ``GatherND(., places)`` (``x`` gathered once, before the first slot that reads it); a DoRA slot's magnitudes
    keep their gather by row. A slot whose graph is not that (another kind, a cast between) keeps its gathers.
    Stacks nothing reads any more stop being inputs. Returns ``{groups input: stack}``, empty (the model unchanged) where no slot can be grouped;
    :class:`ServingError`, the model unchanged, where the new inputs' names are taken.
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
    taken = {ROWS_INPUT, PLACES_INPUT} | {stack + GROUPS_SUFFIX for s, *_ in plans for stack in stack_names(s)}
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
    for s, ga, gb, first, second in plans:
        a_stack, b_stack = stack_names(s)
        drop.update({id(ga), id(gb)})
        first.input[:] = [gathered[first.input[0]], a_stack + GROUPS_SUFFIX]
        out = second.output[0]
        second.input[1] = b_stack + GROUPS_SUFFIX
        second.output[0] = out + GROUPS_SUFFIX
        after.setdefault(position[id(second)], []).append(
            onnx.helper.make_node("GatherND", [second.output[0], PLACES_INPUT], [out], name=f"{s.module}.lora_place"))
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
        dims.insert(1, onnx.TensorShapeProto.Dimension(dim_value=1))  # broadcast over the group's rows

    replace_stack_inputs(g, groups, read, shape)
    g.input.extend([onnx.helper.make_tensor_value_info(ROWS_INPUT, onnx.TensorProto.INT64, ["adapter_groups", "group_rows"]),
                    onnx.helper.make_tensor_value_info(PLACES_INPUT, onnx.TensorProto.INT64, ["batch", 2])])
    return groups


def row_groups(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(slots, rows, places)`` of a call whose row ``i`` uses stack slot ``index[i]``: the distinct slots in order
    of first use (one group each), :data:`ROWS_INPUT` and :data:`PLACES_INPUT`."""
    index = np.asarray(index, np.int64)
    slots, first, group = np.unique(index, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups in order of first use
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    slots, group = slots[order], rank[group.reshape(-1)]
    counts = np.bincount(group, minlength=slots.size)
    rows = np.zeros((slots.size, int(counts.max()) if counts.size else 0), np.int64)
    places = np.zeros((index.size, 2), np.int64)
    fill = np.zeros(slots.size, np.int64)
    for row, grp in enumerate(group.tolist()):
        rows[grp, fill[grp]] = row
        places[row] = grp, fill[grp]
        fill[grp] += 1
    for grp in range(slots.size):  # shorter groups repeat their first row: computed, never read back
        rows[grp, fill[grp]:] = rows[grp, 0]
    return slots, rows, places
