"""The base model's own path through a swappable export: with no adapter active, no LoRA kernels run.

A swappable export (:func:`~flora_graph.serving.export.export_swappable`) runs every LoRA slot on
every call. With no adapter active its rank-0 defaults still cost each slot's kernels: two empty
``MatMul`` and an ``Add``, about 1 µs each in ONNX Runtime. On the tiny Llama of
``benchmarks/generate.py`` that is 48 kernels, about 10% of a decode step.

:func:`branch_on_adapter` wraps the model's graph in one ``If`` on the float input
:data:`~flora_graph.serving.slots.ADAPTER_FLAG` (``[1]``, default ``0``):

- the ``then`` branch is the graph as it was;
- the ``else`` branch is the same graph without its slots: each slot's ``Add`` is replaced by the
  base layer's output it read, and the slot's own nodes are gone.

Both branches read the model's initializers from the outer graph, so the file grows by the graph's
nodes, not by its weights. The ``If`` itself costs 10-16 µs per call (ONNX Runtime 1.32, the benchmark's
tiny Llama): up to 5% of a decode step with an adapter active, against about 10% saved without one.
``benchmarks/generate.py`` prints both, against the same package exported with ``--no-base-branch``.

Adapters switch the branch on themselves. For a model with the flag,
:func:`~flora_graph.serving.slots.check_params` adds it (``[1]``) to every adapter. So:

- adapter files written for such a model (:func:`~flora_graph.serving.adapter_file.write_adapter`
  with ``model=``) carry the flag;
- ONNX Runtime GenAI, which feeds an adapter file's parameters as they are, takes the LoRA branch
  exactly when an adapter is active;
- :class:`~flora_graph.serving.session.AdapterSession` feeds it with the adapter's weights.

A file written for the same model without the branch (``--no-base-branch``) lacks the flag:
flora_graph's sessions add it on load, but ONNX Runtime GenAI would run such a file as the base
model. Write a package's adapter files with the package (``flora-graph export ... --adapter``), or
with ``write_adapter(..., model=OUT/model.onnx)``.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flora_graph.runtimes.onnx_writer import reads, subgraphs
from flora_graph.serving.errors import ServingError
from flora_graph.serving.slots import ADAPTER_FLAG, METADATA_KEY, slots_from_metadata

__all__ = ["branch_on_adapter", "has_adapter_flag"]

_WITH, _WITHOUT = "|with_adapter", "|base"  # suffixes of the values each branch produces (names are SSA model-wide)


def has_adapter_flag(model: onnx.ModelProto) -> bool:
    """Whether ``model`` takes :data:`~flora_graph.serving.slots.ADAPTER_FLAG` (made by :func:`branch_on_adapter`)."""
    return any(i.name == ADAPTER_FLAG for i in model.graph.input)


def _slot_parts(graph: onnx.GraphProto, weights: Collection[str]) -> tuple[set[int], dict[str, str]]:
    """``(slot node indices, {slot sum: base value})``: the nodes that read the slots' weights (transitively)
    up to each slot's ``Add``, and for each such ``Add`` the value it adds the slot's delta to."""
    tainted = set(weights)
    slot_nodes: set[int] = set()
    sums: dict[str, str] = {}
    for k, node in enumerate(graph.node):  # ONNX keeps nodes in topological order
        hit = [i for i in reads(node) if i in tainted]  # a Loop body's reads count
        if not hit:
            continue
        slot_nodes.add(k)
        if node.op_type == "Add" and len(node.input) == 2 and len(hit) == 1:
            sums[node.output[0]] = node.input[1] if node.input[0] == hit[0] else node.input[0]
        else:
            tainted.update(o for o in node.output if o)
    leaked = [o.name for o in graph.output if o.name in tainted]
    if leaked:
        raise ServingError(f"cannot separate the adapter slots from the base model: output(s) {leaked} depend "
                           "on the adapter weights other than through a slot's Add")
    return slot_nodes, sums


def _branch(graph: onnx.GraphProto, keep: list[int], rename: dict[str, str], suffix: str) -> onnx.GraphProto:
    """The subgraph of the nodes ``keep`` of ``graph`` (values renamed by ``rename``, then every value they
    produce suffixed), with the graph's outputs as its outputs; the nodes are copied, the initializers not."""
    produced = {o for k in keep for o in graph.node[k].output if o}

    def resolve(v: str) -> str:
        while v in rename:
            v = rename[v]
        return v

    def name(v: str) -> str:
        v = resolve(v)
        return v + suffix if v in produced else v  # else read from the outer graph

    def rename_in(m: onnx.NodeProto) -> None:  # a subgraph (a Loop body) reads outer values by name too
        m.input[:] = [name(i) if i else i for i in m.input]
        m.output[:] = [name(o) if o else o for o in m.output]
        for g in subgraphs(m):
            for inner in g.node:
                rename_in(inner)

    nodes = []
    for k in keep:
        m = onnx.NodeProto()
        m.CopyFrom(graph.node[k])
        rename_in(m)
        if m.name:
            m.name += suffix
        nodes.append(m)
    outputs = []
    for out in graph.output:
        value = name(out.name)
        if resolve(out.name) not in produced:  # an outer value: a branch's outputs are its own
            nodes.append(helper.make_node("Identity", [value], [out.name + suffix]))
            value = out.name + suffix
        info = onnx.ValueInfoProto()
        info.CopyFrom(out)
        info.name = value
        outputs.append(info)
    return helper.make_graph(nodes, graph.name + suffix.replace("|", "_"), [], outputs)


def branch_on_adapter(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a swappable export, slots recorded in its metadata) as one ``If`` on the adapter flag.

    The ``then`` branch is the graph as it was. The ``else`` branch skips every slot (see the module
    docstring). The flag is a new input, ``float [1]``, with the default ``0`` (no adapter); the model's
    other inputs, outputs, initializers and metadata stay as they were. ``model`` changes in place (its
    weights are not copied: a large model's are most of its memory) and is returned.

    Raises :class:`ServingError` when the model has no slots, already has the flag, or a value of
    the adapter weights reaches an output other than through a slot's ``Add``.
    """
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ServingError(f"model {model.graph.name!r} is not a swappable export (no {METADATA_KEY!r} metadata)")
    if has_adapter_flag(model):
        raise ServingError(f"model {model.graph.name!r} already branches on {ADAPTER_FLAG!r}")
    kind, slots = slots_from_metadata(props, f"model {model.graph.name!r}")
    if kind != "swappable" or not slots:
        raise ServingError(f"model {model.graph.name!r}: only a swappable export with slots branches on an adapter "
                           f"(it is {kind!r} with {len(slots)} slot(s))")
    graph = model.graph
    weights = {n for s in slots for n in (s.a_name, s.b_name, *s.vector_names)}
    slot_nodes, sums = _slot_parts(graph, weights)
    if len(sums) < len(slots):  # a module that runs twice has two sums
        raise ServingError(f"model {graph.name!r}: found {len(sums)} slot sum(s) (Add of a base output and a "
                           f"delta) for {len(slots)} slot(s); cannot separate the base model")
    every = range(len(graph.node))
    with_adapter = _branch(graph, list(every), {}, _WITH)
    without = _branch(graph, [k for k in every if k not in slot_nodes], sums, _WITHOUT)
    del graph.node[:]
    del graph.value_info[:]  # the values now live in the branches; ONNX Runtime infers their shapes there
    cond = f"{ADAPTER_FLAG}/active"
    graph.node.extend([
        helper.make_node("Cast", [ADAPTER_FLAG], [cond], name=cond, to=TensorProto.BOOL),
        helper.make_node("If", [cond], [o.name for o in graph.output], name="adapter_branch",
                         then_branch=with_adapter, else_branch=without),
    ])
    graph.input.append(helper.make_tensor_value_info(ADAPTER_FLAG, TensorProto.FLOAT, [1]))
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), ADAPTER_FLAG))
    return model
