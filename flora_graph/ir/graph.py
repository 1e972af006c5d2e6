"""``Graph``: ordered inputs, named outputs, nodes in topological order, and weights.

The graph is a small explicit data structure; networkx supplies the algorithms
(:meth:`Graph.to_networkx`). Build graphs with :meth:`Graph.input`, :meth:`Graph.const`
and :meth:`Graph.add`, which validate attributes and infer shapes and dtypes on the spot.
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import DTYPES, Op, schema
from flora_graph.ir.shapes import Dim, canonical_dim

__all__ = ["Graph", "check_default", "infer_node"]


def infer_node(op: Op, inputs: Sequence[ComputationNode], attrs: Mapping[str, Any], name: str):
    """Validate attributes and infer ``(attrs, shape, dtype)`` of a non-leaf node.

    Raises ``GraphError``/``ShapeError`` naming the node.
    """
    sch = schema(op)
    sch.check_arity(len(inputs), name)
    attrs = sch.normalize_attrs(dict(attrs), name)
    if sch.infer is None:
        raise GraphError(f"node {name!r}: {op.value} is a leaf; use Graph.input/Graph.const")
    try:
        # canonical input shapes, so a hand-edited or loaded "16" or "seq*batch" reads as 16 / "batch*seq"
        shapes = [tuple(canonical_dim(d) for d in i.shape) for i in inputs]
        shape, dtype = sch.infer(shapes, [i.dtype for i in inputs], attrs)
    except ShapeError as exc:
        raise ShapeError(f"node {name!r} ({op.value}): {exc}") from None
    return attrs, tuple(canonical_dim(d) for d in shape), dtype


class Graph:
    """A computation graph over :class:`ComputationNode`.

    ``params`` maps weight names to numpy arrays; a ``Const`` node names one in its
    ``param`` attribute. ``outputs`` maps output names to nodes, in order. ``dim_max`` maps a
    dynamic dim name to the largest size the graph is valid for (a learned position table
    of ``512`` rows bounds ``"seq"`` by 512); a name absent from it is unbounded. ``dim_min``
    maps a dim name to the smallest size the graph is valid for (a bound ``torch.export``
    asked for while tracing); a name absent from it starts at 0.
    ``input_defaults`` maps an input's name to the (read-only) array it takes when a caller
    leaves it out (:meth:`input` with ``default=``; an adapter slot's rank-0 weights): every
    backend accepts the input omitted, and ONNX lowers it as an input with a same-named
    initializer, which a feed overrides.
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[ComputationNode] = []
        self.outputs: dict[str, ComputationNode] = {}
        self.nodes: list[ComputationNode] = []
        self.params: dict[str, np.ndarray] = {}
        self.dim_max: dict[str, int] = {}
        self.dim_min: dict[str, int] = {}
        self.input_defaults: dict[str, np.ndarray] = {}
        self._names: set[str] = set()
        self._counter = 0

    # ------------------------------------------------------------------ building
    def unique_name(self, base: str) -> str:
        """A node name not yet used in this graph, derived from ``base``."""
        base = base or "n"
        if base not in self._names:
            return base
        while True:
            self._counter += 1
            cand = f"{base}_{self._counter}"
            if cand not in self._names:
                return cand

    def _append(self, node: ComputationNode) -> ComputationNode:
        if node.name in self._names:
            raise GraphError(f"node name {node.name!r} is already used in graph {self.name!r}")
        self._names.add(node.name)
        self.nodes.append(node)
        return node

    def input(self, name: str, shape: Sequence[Dim], dtype: str = "float32", *, default: np.ndarray | None = None,
              **meta: Any) -> ComputationNode:
        """Declare a graph input with a (possibly dynamic) shape.

        ``default``: the array the input takes when a caller leaves it out, of the input's
        dtype and rank, equal to its static dims (a named dim takes the default's size, 0
        included). Raises ``GraphError``/``ShapeError`` naming the input.
        """
        if dtype not in DTYPES:
            raise GraphError(f"input {name!r}: unknown dtype {dtype!r}")
        try:
            dims = tuple(canonical_dim(d) for d in shape)
        except ShapeError as exc:
            raise ShapeError(f"input {name!r}: {exc}") from None
        node = ComputationNode(name, Op.INPUT, [], {}, dims, dtype, dict(meta))
        if default is not None:
            arr = _read_only(np.array(default, copy=True))
            check_default(node, arr)
        self._append(node)
        self.inputs.append(node)
        if default is not None:
            self.input_defaults[name] = arr
        return node

    def const(self, param: str, value: np.ndarray | None = None, *, name: str | None = None, **meta: Any) -> ComputationNode:
        """A ``Const`` node reading weight ``param``; stores ``value`` when given."""
        if value is not None:
            if param in self.params and self.params[param] is not value:
                raise GraphError(f"param {param!r} already exists in graph {self.name!r}; pick a new name")
            arr = np.asarray(value)
            if str(arr.dtype) not in DTYPES:
                raise GraphError(f"param {param!r}: unsupported dtype {arr.dtype}")
            self.params[param] = arr
        if param not in self.params:
            raise GraphError(f"const refers to unknown param {param!r}")
        arr = self.params[param]
        node = ComputationNode(
            self.unique_name(name or param), Op.CONST, [], {"param": param}, tuple(int(d) for d in arr.shape),
            str(arr.dtype), dict(meta),
        )
        return self._append(node)

    def add(self, op: Op, inputs: Sequence[ComputationNode], attrs: Mapping[str, Any] | None = None,
            *, name: str | None = None, meta: Mapping[str, Any] | None = None) -> ComputationNode:
        """Append a node, validating attributes and inferring its shape and dtype."""
        name = self.unique_name(name or op.value.lower())
        for i in inputs:
            if not isinstance(i, ComputationNode):
                raise GraphError(f"node {name!r}: input {i!r} is not a ComputationNode")
        attrs_n, shape, dtype = infer_node(op, inputs, attrs or {}, name)
        node = ComputationNode(name, op, list(inputs), attrs_n, shape, dtype, dict(meta or {}))
        return self._append(node)

    def set_output(self, name: str, node: ComputationNode) -> None:
        """Name ``node`` as graph output ``name``."""
        self.outputs[name] = node

    # ------------------------------------------------------------------ queries
    def node(self, name: str) -> ComputationNode:
        """The node called ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"graph {self.name!r} has no node {name!r}")

    def users(self) -> dict[ComputationNode, list[ComputationNode]]:
        """Map each node to the nodes that read it (in graph order)."""
        out: dict[ComputationNode, list[ComputationNode]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def param_of(self, node: ComputationNode) -> np.ndarray:
        """The weight behind a ``Const`` node."""
        if node.op is not Op.CONST:
            raise GraphError(f"node {node.name!r} is {node.op.value}, not Const")
        return self.params[node.attrs["param"]]

    def ops(self) -> list[str]:
        """Op names of the non-leaf nodes in order (handy in tests)."""
        return [n.op.value for n in self.nodes if n.op not in (Op.INPUT, Op.CONST)]

    def to_networkx(self) -> nx.MultiDiGraph:
        """A networkx view: node names as keys, ``op``/``shape``/``meta`` as data, one edge per use."""
        g = nx.MultiDiGraph(name=self.name)
        for n in self.nodes:
            g.add_node(n.name, op=n.op.value, shape=n.shape, dtype=n.dtype, attrs=dict(n.attrs), meta=dict(n.meta))
        for n in self.nodes:
            for pos, i in enumerate(n.inputs):
                g.add_edge(i.name, n.name, index=pos)
        return g

    # ------------------------------------------------------------------ editing
    def replace_all_uses(self, old: ComputationNode, new: ComputationNode) -> None:
        """Make every reader of ``old`` (and outputs) read ``new`` instead."""
        for n in self.nodes:
            n.inputs = [new if i is old else i for i in n.inputs]
        for k, v in self.outputs.items():
            if v is old:
                self.outputs[k] = new

    def toposort(self) -> None:
        """Reorder ``nodes`` topologically, keeping the current order where it is free."""
        order = {n: i for i, n in enumerate(self.nodes)}
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for n in self.nodes:
            for i in n.inputs:
                if i not in order:
                    raise GraphError(f"node {n.name!r} reads {i.name!r}, which is not in the graph")
                g.add_edge(i, n)
        try:
            self.nodes = list(nx.lexicographical_topological_sort(g, key=lambda n: order[n]))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(g)
            raise GraphError("graph has a cycle through " + " -> ".join(a.name for a, _ in cycle)) from None

    def live_nodes(self) -> list[ComputationNode]:
        """The nodes some output depends on, in graph order (iterative, any depth)."""
        live: set[ComputationNode] = set()
        stack = list(self.outputs.values())
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.inputs)
        return [n for n in self.nodes if n in live]

    def remove_input(self, node: ComputationNode) -> None:
        """Drop graph input ``node`` (and its default); ``GraphError`` while a node still reads it."""
        if node not in self.inputs:
            raise GraphError(f"{node.name!r} is not an input of graph {self.name!r}")
        readers = [n.name for n in self.nodes if any(i is node for i in n.inputs)]
        if readers or any(v is node for v in self.outputs.values()):
            raise GraphError(f"input {node.name!r} is still read by {readers or ['<output>']}")
        self.inputs = [i for i in self.inputs if i is not node]
        self.nodes = [n for n in self.nodes if n is not node]
        self._names.discard(node.name)
        self.input_defaults.pop(node.name, None)

    def rename_input(self, old: str, new: str) -> None:
        """Rename graph input ``old`` to ``new`` (its default follows); ``GraphError`` if ``new`` is taken."""
        node = next((i for i in self.inputs if i.name == old), None)
        if node is None:
            raise GraphError(f"{old!r} is not an input of graph {self.name!r}")
        if new != old and new in self._names:
            raise GraphError(f"cannot rename input {old!r} to {new!r}: graph {self.name!r} already has a node {new!r}")
        self._names.discard(old)
        self._names.add(new)
        node.name = new
        if old in self.input_defaults:
            self.input_defaults[new] = self.input_defaults.pop(old)

    def remove_dead(self) -> int:
        """Drop nodes no output depends on (inputs stay) and unused params; return count removed."""
        live = set(self.live_nodes()) | set(self.inputs)
        before = len(self.nodes)
        self.nodes = [n for n in self.nodes if n in live]
        self._names = {n.name for n in self.nodes}
        used = {n.attrs["param"] for n in self.nodes if n.op is Op.CONST}
        self.params = {k: v for k, v in self.params.items() if k in used}
        return before - len(self.nodes)

    def copy(self, *, share_weights: bool = False) -> Graph:
        """A deep copy: new nodes and meta, copied params. Iterative, so any depth copies.

        ``share_weights=True`` copies no weight: the copy's params are read-only views of this
        graph's arrays (copy-on-write: a pass that changes a weight stores a new array, and
        writing into a shared one raises ``ValueError``). Writing into *this* graph's arrays
        in place afterwards shows through the copy; don't, or copy without sharing.
        """
        out = Graph(self.name)
        if share_weights:
            out.params = {k: _read_only(v) for k, v in self.params.items()}
        else:
            out.params = {k: np.array(v, copy=True) for k, v in self.params.items()}
        out.dim_max = dict(self.dim_max)
        out.dim_min = dict(self.dim_min)
        out.input_defaults = dict(self.input_defaults)  # read-only arrays, shared
        new: dict[ComputationNode, ComputationNode] = {}
        for n in self.nodes:
            try:
                ins = [new[i] for i in n.inputs]
            except KeyError:
                raise GraphError(f"cannot copy graph {self.name!r}: node {n.name!r} reads a node defined after it or outside the graph") from None
            new[n] = ComputationNode(n.name, n.op, ins, dict(n.attrs), tuple(n.shape), n.dtype, _copy.deepcopy(n.meta))
        out.nodes = list(new.values())
        out._names = set(self._names)
        out._counter = self._counter
        out.inputs = [new[i] for i in self.inputs]
        out.outputs = {k: new[v] for k, v in self.outputs.items()}
        return out

    # ------------------------------------------------------------------ io, text
    def save(self, path: str | Path) -> None:
        """Write ``graph.json`` and ``weights.safetensors`` into directory ``path`` (atomically)."""
        from flora_graph.ir.serialize import save_graph

        save_graph(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read a graph written by :meth:`save`, validating everything; raises ``GraphError``."""
        from flora_graph.ir.serialize import load_graph

        return load_graph(path)

    def format(self, *, meta: bool = True) -> str:
        """Readable text form (see :func:`flora_graph.ir.printer.format_graph`)."""
        from flora_graph.ir.printer import format_graph

        return format_graph(self, meta=meta)

    def __str__(self) -> str:
        return self.format()

    def summary(self) -> str:
        """One line: node, op and parameter counts."""
        from collections import Counter

        counts = Counter(n.op.value for n in self.nodes if n.op not in (Op.INPUT, Op.CONST))
        nparams = sum(int(v.size) for v in self.params.values())
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        return f"graph {self.name!r}: {len(self.nodes)} nodes, {len(self.params)} weights ({nparams:,} values); {ops}"


def _read_only(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself when it is already read-only, else a read-only view of it (no data copied)."""
    if not arr.flags.writeable:
        return arr
    view = arr.view()
    view.flags.writeable = False
    return view


def check_default(node: ComputationNode, arr: np.ndarray) -> None:
    """Raise ``GraphError`` naming input ``node`` when ``arr`` cannot be its default (dtype, rank, static dims)."""
    if not isinstance(arr, np.ndarray) or str(arr.dtype) != node.dtype:
        got = str(arr.dtype) if isinstance(arr, np.ndarray) else type(arr).__name__
        raise GraphError(f"input {node.name!r}: default of dtype {got}, the input is {node.dtype}")
    if arr.ndim != len(node.shape) or any(isinstance(d, int) and d != s for d, s in zip(node.shape, arr.shape, strict=False)):
        raise ShapeError(f"input {node.name!r}: default of shape {list(arr.shape)} does not fit the declared "
                         f"{list(node.shape)}")


def iter_leaves(nodes: Iterable[ComputationNode]) -> Iterable[ComputationNode]:
    """The ``Input``/``Const`` nodes among ``nodes``."""
    return (n for n in nodes if n.op in (Op.INPUT, Op.CONST))
