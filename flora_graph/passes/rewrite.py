"""``RewriteContext``: what a pass sees of a graph during one sweep, and how it edits it.

It is built once per sweep (users map, the set of static nodes) so that no rule walks the
graph per node. Edits are batched: :meth:`RewriteContext.replace` records ``old -> new``
and :meth:`RewriteContext.commit` rewires every reader once, restores topological order
and drops what became dead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flora_graph.errors import GraphError
from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.graph import infer_node
from flora_graph.ops import eval_node

__all__ = ["RewriteContext", "eval_static", "schedule", "static_nodes", "unique_param", "weight_label"]


def static_nodes(graph: Graph) -> set[ComputationNode]:
    """Nodes computable from weights alone: ``Const`` and any node whose inputs are all static."""
    static: set[ComputationNode] = set()
    for n in graph.nodes:
        if n.op is Op.CONST or (n.op is not Op.INPUT and n.inputs and all(i in static for i in n.inputs)):
            static.add(n)
    return static


def eval_static(graph: Graph, node: ComputationNode, memo: dict[ComputationNode, np.ndarray] | None = None) -> np.ndarray:
    """The value of a static node, computed with the numpy reference implementations."""
    memo = {} if memo is None else memo
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        if n.op is Op.CONST:
            memo[n] = graph.params[n.attrs["param"]]
            stack.pop()
        elif n.op is Op.INPUT:
            raise GraphError(f"node {node.name!r} depends on graph input {n.name!r}; it has no static value")
        else:
            todo = [i for i in n.inputs if i not in memo]
            if todo:
                stack.extend(todo)
                continue
            memo[n] = eval_node(n, [memo[i] for i in n.inputs])
            stack.pop()
    return memo[node]


def weight_label(node: ComputationNode) -> str:
    """A weight's name for naming what is derived from it: its param, or the node's name."""
    return str(node.attrs["param"]) if node.op is Op.CONST else node.name


def unique_param(graph: Graph, base: str) -> str:
    """A param name not used in ``graph`` yet: ``base``, else ``base_1``, ``base_2``, ..."""
    name, k = base, 0
    while name in graph.params:
        k += 1
        name = f"{base}_{k}"
    return name


class RewriteContext:
    """One sweep over ``graph``: users, static nodes, weight values, options, batched edits.

    ``options`` are the pass's options (for example ``swappable``); ``stats`` collects
    pass-specific records (for example cost-model decisions) that end up in the pass's stats.
    """

    def __init__(self, graph: Graph, options: Mapping[str, Any] | None = None, stats: dict[str, Any] | None = None) -> None:
        self.graph = graph
        self.options = dict(options or {})
        self.stats: dict[str, Any] = stats if stats is not None else {}
        self.users = graph.users()
        self.static = static_nodes(graph)
        self.outputs = {id(n) for n in graph.outputs.values()}
        self._values: dict[ComputationNode, np.ndarray] = {}
        self._replace: dict[ComputationNode, ComputationNode] = {}

    # ------------------------------------------------------------------ queries
    def value(self, node: ComputationNode) -> np.ndarray:
        """The weight value of a static node (``Const`` or an expression of ``Const`` nodes)."""
        return eval_static(self.graph, node, self._values)

    def scalar(self, node: ComputationNode) -> float | None:
        """The value of a static node holding one element, else ``None``."""
        if math.prod(int(d) for d in node.shape) != 1:
            return None
        return float(np.asarray(self.value(node), dtype=np.float64).reshape(()))

    def other_users(self, node: ComputationNode, *allowed: ComputationNode) -> list[str]:
        """Names of the readers of ``node`` other than ``allowed``; a graph output counts as ``<output>``."""
        out = [u.name for u in self.users.get(node, []) if not any(u is a for a in allowed)]
        if id(node) in self.outputs:
            out.append("<output>")
        return out

    @property
    def swappable(self) -> bool:
        """Whether adapter weights must stay separate ``Const`` nodes (weights derived from them are built in-graph)."""
        return bool(self.options.get("swappable", False))

    # ------------------------------------------------------------------ building
    def add(self, op: Op, inputs: Sequence[ComputationNode], attrs: Mapping[str, Any] | None = None,
            *, name: str, meta: Mapping[str, Any] | None = None) -> ComputationNode:
        """Append a node (``Graph.add``); :meth:`commit` puts it in order."""
        return self.graph.add(op, inputs, attrs, name=name, meta=meta)

    def new_const(self, base: str, value: np.ndarray, **meta: Any) -> ComputationNode:
        """A ``Const`` over a new param named after ``base`` (made unique); never overwrites one."""
        return self.graph.const(unique_param(self.graph, base), value, **meta)

    def weight(self, op: Op, inputs: Sequence[ComputationNode], attrs: Mapping[str, Any] | None = None,
               *, name: str) -> ComputationNode:
        """A derived weight ``op(inputs)``: built in-graph when :attr:`swappable`, else computed now into a new param.

        The computed value uses the reference implementation (float16/bfloat16 widened to
        float32, rounded to the result dtype once). A non-finite result raises ``GraphError``.
        """
        if self.swappable:
            node = self.add(op, inputs, attrs, name=name)
            self.static.add(node)
            return node
        attrs_n, shape, dtype = infer_node(op, inputs, attrs or {}, name)
        recipe = ComputationNode(name, op, list(inputs), attrs_n, shape, dtype)  # evaluated, never added
        value = eval_static(self.graph, recipe, self._values)
        if not np.all(np.isfinite(value.astype(np.float32))):
            raise GraphError(f"weight {name!r} computed from {[i.name for i in inputs]} is not finite")
        const = self.new_const(name, value)
        self.static.add(const)
        return const

    # ------------------------------------------------------------------ editing
    def replace(self, old: ComputationNode, new: ComputationNode) -> None:
        """Record that every reader of ``old`` (and graph outputs) reads ``new``; applied by :meth:`commit`."""
        if old is not new:
            self._replace[old] = new

    @property
    def pending(self) -> int:
        """How many replacements are recorded and not committed yet."""
        return len(self._replace)

    def commit(self) -> bool:
        """Apply the recorded replacements in one walk, reorder topologically, drop dead nodes and params.

        Returns whether anything was replaced.
        """
        if not self._replace:
            return False
        repl = self._replace

        def resolve(n: ComputationNode) -> ComputationNode:
            seen = 0
            while n in repl:
                n = repl[n]
                seen += 1
                if seen > len(repl):
                    raise GraphError(f"replacement cycle through node {n.name!r}")
            return n

        for node in self.graph.nodes:
            # a replacement that reads the node it replaces keeps reading it
            node.inputs = [i if (r := resolve(i)) is node else r for i in node.inputs]
        for key, node in self.graph.outputs.items():
            self.graph.outputs[key] = resolve(node)
        self._replace = {}
        schedule(self.graph)
        self.graph.remove_dead()
        return True


def schedule(graph: Graph) -> None:
    """Reorder ``graph.nodes`` topologically: the current order, each node preceded by inputs not placed yet.

    Nodes a pass appended land right before their first reader (as capture places weights).
    Raises ``GraphError`` on a cycle.
    """
    order: list[ComputationNode] = []
    state: dict[ComputationNode, int] = {}  # 1: on the stack, 2: placed
    for root in graph.nodes:
        if root in state:
            continue
        stack = [(root, iter(root.inputs))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next((i for i in it if state.get(i) != 2), None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif state.get(nxt) == 1:
                raise GraphError(f"graph has a cycle through node {nxt.name!r}")
            else:
                state[nxt] = 1
                stack.append((nxt, iter(nxt.inputs)))
    graph.nodes = order
