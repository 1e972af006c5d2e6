"""Lower a :class:`~flora_graph.ir.Graph` to a self-contained ``torch.nn.Module``.

:func:`to_torch_module` writes ``forward`` as Python source, one line per node, using torch
ops only, compiles it with ``exec`` into a fresh ``nn.Module`` subclass and registers every
weight as a buffer under a sanitized name (``w_<param>``). The source is entered into
``linecache`` (as torch.fx does), so ``torch.jit.script`` can read it and the module
scripts, saves and exports with no reference to flora_graph.

Conventions of the generated module:

* ``forward`` takes one ``torch.Tensor`` per graph input, in ``graph.inputs`` order, named
  after the input (sanitized to an identifier);
* it always returns a **tuple** of tensors in ``graph.outputs`` order, even for a single
  output (``module(x)[0]``); the names are in the ``input_names`` / ``output_names``
  attributes, which survive ``torch.jit.script`` and ``torch.jit.save``;
* it computes in each node's dtype (the numpy reference widens float16/bfloat16 to float32
  per op and rounds back; torch computes those dtypes natively).

Each op's torch rule (``OPS[op].torch(node, args) -> str``: the Python expression for
``node`` given the expressions of its inputs) lives with the op in its :mod:`flora_graph.ops`
family module; a dim named in an attribute becomes ``arg.size(i)`` of a tensor that carries
it (a graph input where no operand does). This module is the code generator around them.

A long body can be cut into parts (``max_lines``, used by the ``torchscript`` backend): each
part is a method ``_flora_part_<k>`` taking the values it reads and returning those read
later, which ``forward`` runs through ``torch.jit.fork`` + ``torch.jit.wait``. TorchScript
inlines every method call into one graph, and its interpreter emits a chain of single-use
values by recursion (``CodeImpl::emitUse``, a few C++ frames per node), so a 20,000-node
chain overflowed the stack (SIGSEGV) on the first call; a forked function is compiled and
emitted on its own, which bounds that depth by the part's length.
"""

from __future__ import annotations

import ast
import builtins
import itertools
import keyword
import linecache
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flora_graph.errors import GraphError, UnsupportedOpError
from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op
from flora_graph.ir.shapes import dim_terms
from flora_graph.ops import OPS
from flora_graph.ops._torch import dim_sources
from flora_graph.ops.evaluate import fold_static

__all__ = [
    "example_shape",
    "fold_weight_expressions",
    "generate_forward",
    "numpy_to_torch",
    "output_needs_copy",
    "to_torch_module",
]

GENERATED_MODULE = "flora_torch_generated"  # __module__ of generated classes; importable nowhere, needed nowhere


# --------------------------------------------------------------------------- names
_RESERVED = frozenset({"self", "torch", "F", *dir(builtins)})


class _Namer:
    """Unique ASCII identifiers derived from graph names (never a keyword, builtin or ``__x``)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, name: str, prefix: str = "") -> str:
        base = prefix + re.sub(r"[^0-9A-Za-z_]", "_", name)
        if not base or base[0].isdigit() or base.startswith("__") or keyword.iskeyword(base) or base in _RESERVED:
            base = f"v_{base}"
        cand = base
        for k in itertools.count(1):
            if cand not in self.used:
                break
            cand = f"{base}_{k}"
        self.used.add(cand)
        return cand


# --------------------------------------------------------------------------- source
def generate_forward(graph: Graph, constants: Mapping[ComputationNode, np.ndarray] | None = None,
                     *, max_lines: int | None = None) -> tuple[str, list[str], dict[str, str | np.ndarray]]:
    """The source of ``forward`` for ``graph``.

    Returns ``(source, arg_names, buffers)``: the ``def forward(self, ...)`` text, the
    argument name of each graph input (in order) and ``{buffer name: param name}``. Nodes
    in ``constants`` (see :func:`fold_weight_expressions`) are read from buffers holding
    their value (``{buffer name: array}``) instead of being computed. With ``max_lines``,
    a body longer than that is cut into forked parts of at most ``max_lines`` lines
    (methods ``_flora_part_<k>``, defined before ``forward`` in the source; see the module
    docstring). The module-level functions the ops' torch rules call (``OpDef.torch_source``:
    a scan's loop) come first, once each. Raises :class:`UnsupportedOpError` for an op without a torch rule.
    """
    if not graph.outputs:
        raise GraphError(f"graph {graph.name!r} has no outputs to lower")
    names = _Namer()
    expr: dict[ComputationNode, str] = {}
    args = []
    for node in graph.inputs:
        expr[node] = names(node.name)
        args.append(expr[node])
    buffers: dict[str, str] = {}
    with dim_sources((expr[n], n.shape) for n in graph.inputs):  # named dims in attributes read these sizes
        body = _body(graph, names, expr, buffers, constants or {})
    outs = [expr[n] for n in graph.outputs.values()]
    parts: list[str] = []
    if max_lines is not None and len(body) > max_lines:
        parts, body = _fork_parts(body, outs, max_lines, names)
    sig = ", ".join(["self", *(f"{a}: torch.Tensor" for a in args)])
    lines = [f"def forward({sig}) -> {_tensor_tuple(len(outs))}:", *body, f"    return ({', '.join(outs)},)"]
    helpers = dict.fromkeys(OPS[n.op].torch_source for n in graph.live_nodes() if n.op in OPS and OPS[n.op].torch_source)
    return "".join(f"{h.strip()}\n\n\n" for h in helpers) + "".join(f"{p}\n\n" for p in parts) + "\n".join(lines) + "\n", args, buffers


PART_PREFIX = "_flora_part_"  # methods of a forward cut into parts (buffers are "w_*": never a clash)


def _tensor_tuple(n: int) -> str:
    return "tuple[" + ", ".join(["torch.Tensor"] * n) + "]"


def _line_names(line: str) -> tuple[str, set[str]]:
    """The variable a body line ``    v = expr  # ...`` assigns and the variables ``expr`` reads."""
    stmt = ast.parse(line.strip()).body[0]
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        raise GraphError(f"torch lowering: cannot cut the generated line {line.strip()!r} into a part")
    called = {id(n.func) for n in ast.walk(stmt.value) if isinstance(n, ast.Call)}  # an op's helper function
    reads = {n.id for n in ast.walk(stmt.value) if isinstance(n, ast.Name) and id(n) not in called} - {"self", "torch", "F"}
    return stmt.targets[0].id, reads


def _fork_parts(body: list[str], outs: list[str], max_lines: int, names: _Namer) -> tuple[list[str], list[str]]:
    """Cut ``body`` into methods of at most ``max_lines`` lines; return their sources and ``forward``'s new body.

    A part takes every variable it reads that is defined before it (by an earlier part or
    as a graph input) and returns every variable it defines that a later part or the
    return statement reads.
    """
    parsed = [_line_names(line) for line in body]
    chunks = [range(k, min(k + max_lines, len(body))) for k in range(0, len(body), max_lines)]
    last_read: dict[str, int] = {}
    for c, rows in enumerate(chunks):
        for i in rows:
            for name in parsed[i][1]:
                last_read[name] = c
    for name in outs:
        last_read[name] = len(chunks)
    parts: list[str] = []
    calls: list[str] = []
    for c, rows in enumerate(chunks):
        defined = [parsed[i][0] for i in rows]
        reads = sorted({n for i in rows for n in parsed[i][1]} - set(defined))
        results = [d for d in defined if last_read.get(d, -1) > c]
        if not results:  # nothing it computes is read later
            continue
        method = f"{PART_PREFIX}{c}"
        sig = ", ".join(["self", *(f"{r}: torch.Tensor" for r in reads)])
        parts.append("\n".join([f"def {method}({sig}) -> {_tensor_tuple(len(results))}:",
                                *(body[i] for i in rows), f"    return ({', '.join(results)},)"]))
        future = names(f"part_{c}", "f_")
        calls.append(f"    {future} = torch.jit.fork(self.{method}{''.join(', ' + r for r in reads)})")
        calls.append(f"    ({', '.join(results)},) = torch.jit.wait({future})")
    return parts, calls


def _body(graph: Graph, names: _Namer, expr: dict[ComputationNode, str], buffers: dict[str, str | np.ndarray],
          constants: Mapping[ComputationNode, np.ndarray]) -> list[str]:
    """One source line per live non-leaf node not in ``constants``; fills ``expr`` and ``buffers``."""
    attrs = _Namer()
    by_param: dict[str, str] = {}
    body: list[str] = []
    live = graph.live_nodes()
    read = {i for n in live if n.op not in (Op.INPUT, Op.CONST) and n not in constants for i in n.inputs}
    read |= set(graph.outputs.values())
    for node in live:
        if node in constants and node.op is not Op.CONST:
            if node in read:
                attr = attrs(node.name, "w_")
                buffers[attr] = constants[node]
                expr[node] = f"self.{attr}"
            continue
        if node.op is Op.INPUT:
            if node not in expr:
                raise GraphError(f"node {node.name!r} is an Input that graph {graph.name!r} does not declare")
            continue
        if node.op is Op.CONST:
            if node not in read:
                continue
            param = node.attrs["param"]
            if param not in graph.params:
                raise GraphError(f"Const node {node.name!r} refers to unknown param {param!r}")
            if param not in by_param:
                by_param[param] = attrs(param, "w_")
                buffers[by_param[param]] = param
            expr[node] = f"self.{by_param[param]}"
            continue
        d = OPS.get(node.op)
        if d is None:
            raise UnsupportedOpError(
                f"node {node.name!r}: no torch lowering of {node.op.value}", {node.op.value: [node.name]}
            )
        try:
            code = d.torch(node, [expr[i] for i in node.inputs])
        except KeyError as exc:
            raise GraphError(f"node {node.name!r} reads {exc.args[0]!r} before it is defined") from None
        var = names(node.name, "v_")
        body.append(f"    {var} = {code}  # {node.op.value} {node.name!r}")
        expr[node] = var
    return body


_counter = itertools.count()


def _exec_source(source: str, graph_name: str) -> dict[str, Callable[..., typing.Any]]:
    """Compile ``source`` under a unique file name kept in ``linecache`` (so TorchScript can read it);
    return ``forward`` and its parts by name."""
    filename = f"<flora_graph torch lowering {next(_counter)}: {re.sub(r'[^0-9A-Za-z_.]', '_', graph_name)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, typing.Any] = {"torch": torch, "F": F, "__name__": GENERATED_MODULE}
    exec(compile(source, filename, "exec"), namespace)
    return {k: v for k, v in namespace.items() if k == "forward" or k.startswith(PART_PREFIX)}


def numpy_to_torch(arr: np.ndarray) -> torch.Tensor:
    """A tensor over ``arr`` (shared when torch can; bfloat16 via its bits; readonly or negative strides copied)."""
    if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16, which torch.from_numpy does not know
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
    if not arr.flags.writeable or any(s < 0 for s in arr.strides):
        arr = np.array(arr)
    return torch.from_numpy(arr)


def to_torch_module(graph: Graph, *, fold_weights: bool = True, max_lines: int | None = None) -> torch.nn.Module:
    """A self-contained ``nn.Module`` computing ``graph`` (see the module docstring for conventions).

    Weights are copied into buffers, so later edits of ``graph.params`` do not reach the
    module. With ``fold_weights`` (default), expressions over weights alone (a swappable
    graph's ``s * B`` or ``[W; A]``) are computed once here, as ONNX Runtime does when it
    loads a session, instead of on every call. ``max_lines`` cuts a longer ``forward`` into
    forked parts (:func:`generate_forward`). The generated source is ``type(module).source``.
    """
    constants = fold_weight_expressions(graph) if fold_weights else None
    source, args, buffers = generate_forward(graph, constants, max_lines=max_lines)
    methods = _exec_source(source, graph.name)
    cls_name = "Graph_" + re.sub(r"[^0-9A-Za-z_]", "_", graph.name)
    cls = type(cls_name, (torch.nn.Module,), {**methods, "__module__": GENERATED_MODULE, "source": source})
    module = cls()
    for attr, value in buffers.items():
        arr = graph.params[value] if isinstance(value, str) else value
        module.register_buffer(attr, numpy_to_torch(np.array(arr, copy=True)))
    module.input_names = [n.name for n in graph.inputs]
    module.output_names = list(graph.outputs)
    module.arg_names = args
    return module.eval()


def fold_weight_expressions(graph: Graph, max_elements: int = 1 << 24) -> dict[ComputationNode, np.ndarray]:
    """The value of every live node computable from weights alone (static shape, at most
    ``max_elements`` values), by the ops' numpy rules: what the generated module reads from a
    buffer instead of recomputing on each call, as ONNX Runtime folds constants at load."""
    return fold_static(graph.params, graph.live_nodes(), max_elements)[0]


def output_needs_copy(graph: Graph) -> list[bool]:
    """Per output: whether it may be a weight (or computed from weights alone) and must be copied out."""
    depends: dict[ComputationNode, bool] = {}
    for node in graph.nodes:
        depends[node] = node.op is Op.INPUT or any(depends.get(i, False) for i in node.inputs)
    return [not depends.get(n, False) for n in graph.outputs.values()]


def example_shape(shape: Sequence[int | str], sizes: dict[str, int]) -> list[int]:
    """A concrete shape: static dims as they are, named dims (and products or sums of them) from ``sizes``."""
    return [sum(c * math.prod(sizes[n] for n in names) for c, names in dim_terms(d)) for d in shape]
