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

:data:`TORCH_LOWERING` maps each non-leaf :class:`Op` to ``lower(node, args) -> str``: the
Python expression for ``node`` given the expressions of its inputs. The transformer family's
entries live in :mod:`flora_graph.runtimes.torch_lowering_ops`; a dim named in an attribute
becomes ``arg.size(i)`` of a tensor that carries it (a graph input where no operand does).
"""

from __future__ import annotations

import builtins
import itertools
import keyword
import linecache
import math
import re
import typing
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flora_graph.errors import GraphError, UnsupportedOpError
from flora_graph.ir.graph import Graph
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import Op
from flora_graph.ir.shapes import Shape, format_shape
from flora_graph.runtimes.torch_lowering_ops import TRANSFORMER_LOWERING, dim_expr, dim_sources

__all__ = [
    "TORCH_LOWERING",
    "example_shape",
    "generate_forward",
    "numpy_to_torch",
    "output_needs_copy",
    "to_torch_module",
]

Lower = Callable[[ComputationNode, list[str]], str]

GENERATED_MODULE = "flora_torch_generated"  # __module__ of generated classes; importable nowhere, needed nowhere


# --------------------------------------------------------------------------- op lowerings
def _call(fn: str) -> Lower:
    """``fn(a, b, ...)`` over the node's inputs."""
    return lambda node, args: f"{fn}({', '.join(args)})"


def _ints(values: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def _float(value: float, node: ComputationNode) -> str:
    if not math.isfinite(value):
        raise GraphError(f"node {node.name!r} ({node.op.value}): non-finite attribute {value}")
    return repr(float(value))


def _size_product(x: str, shape: Shape, axes: Iterable[int], divisor: int = 1) -> str:
    """Source for ``prod(x.shape[i] for i in axes) // divisor``, static dims folded in."""
    static, dynamic = 1, []
    for i in axes:
        if isinstance(shape[i], int):
            static *= shape[i]
        else:
            dynamic.append(f"{x}.size({i})")
    if static % divisor == 0:
        terms = [*dynamic, str(static // divisor)] if static // divisor != 1 or not dynamic else dynamic
        return " * ".join(terms)
    return f"({' * '.join([*dynamic, str(static)])}) // {divisor}"


def _reshaped(x: str, shape: Shape, dims: list[str]) -> str:
    """``x.reshape(dims)``; through 1-D when ``x`` has a named dim, which spares torch.export the
    stride guards (such as ``3*b % 2*b != 0``) that a direct view of symbolic dims can need."""
    flat = f"{x}.reshape([-1])" if any(isinstance(d, str) for d in shape) else x
    return f"{flat}.reshape([{', '.join(dims)}])"


def _dim_source(x: str, shape: Shape, i: int) -> str:
    return str(shape[i]) if isinstance(shape[i], int) else f"{x}.size({i})"


def _div(node: ComputationNode, args: list[str]) -> str:
    if node.dtype.startswith(("int", "uint")):  # integer division truncates toward zero, as in the reference
        return f'torch.div({args[0]}, {args[1]}, rounding_mode="trunc")'
    return f"torch.div({args[0]}, {args[1]})"


def _linear(node: ComputationNode, args: list[str]) -> str:
    return f"F.linear({', '.join(args)})"


def _conv2d(node: ComputationNode, args: list[str]) -> str:
    a = node.attrs
    bias = args[2] if len(args) == 3 else "None"
    return (
        f"F.conv2d({args[0]}, {args[1]}, {bias}, {_ints(a['stride'])}, {_ints(a['padding'])}, "
        f"{_ints(a['dilation'])}, {int(a['groups'])})"
    )


def _gelu(node: ComputationNode, args: list[str]) -> str:
    return f"F.gelu({args[0]}, approximate={node.attrs['approximate']!r})"


def _softmax(node: ComputationNode, args: list[str]) -> str:
    return f"torch.softmax({args[0]}, {int(node.attrs['axis'])})"


def _layer_norm(node: ComputationNode, args: list[str]) -> str:
    shape = node.inputs[0].shape
    axis = node.attrs["axis"] % len(shape)
    norm = shape[axis:]
    if not all(isinstance(d, int) for d in norm):
        raise UnsupportedOpError(
            f"node {node.name!r} (LayerNorm): torch lowering needs static normalized dims, "
            f"got {format_shape(norm)} of input {format_shape(shape)}",
            {node.op.value: [node.name]},
        )
    scale = args[1] if len(args) > 1 else "None"
    bias = args[2] if len(args) > 2 else "None"
    eps = _float(node.attrs["epsilon"], node)
    return f"F.layer_norm({args[0]}, {_ints(int(d) for d in norm)}, {scale}, {bias}, {eps})"


def _reshape(node: ComputationNode, args: list[str]) -> str:
    x, shape, target = args[0], node.inputs[0].shape, node.attrs["shape"]
    if any(isinstance(t, str) for t in target):  # a named target dim: every size from the inferred output shape
        return _reshaped(x, shape, [dim_expr(d, node, [(x, shape)]) for d in node.shape])
    known = math.prod(t for t in target if t > 0)
    # ONNX: 0 copies the input dim; -1 is what the dims not copied by a 0 leave over (as the reference)
    rest = [j for j in range(len(shape)) if j >= len(target) or target[j] != 0]
    dims = [
        _dim_source(x, shape, i) if t == 0 else _size_product(x, shape, rest, known) if t == -1 else str(t)
        for i, t in enumerate(target)
    ]
    return _reshaped(x, shape, dims)


def _flatten(node: ComputationNode, args: list[str]) -> str:
    x, shape = args[0], node.inputs[0].shape
    axis = node.attrs["axis"] + len(shape) if node.attrs["axis"] < 0 else node.attrs["axis"]
    lead = _size_product(x, shape, range(axis))
    tail = _size_product(x, shape, range(axis, len(shape)))
    return _reshaped(x, shape, [lead, tail])


def _transpose(node: ComputationNode, args: list[str]) -> str:
    return f"{args[0]}.permute({_ints(node.attrs['perm'])})"


def _concat(node: ComputationNode, args: list[str]) -> str:
    return f"torch.cat([{', '.join(args)}], {int(node.attrs['axis'])})"


def _split(node: ComputationNode, args: list[str]) -> str:
    sizes, index = node.attrs["sizes"], node.attrs["index"]
    return f"{args[0]}.narrow({int(node.attrs['axis'])}, {sum(sizes[:index])}, {sizes[index]})"


TORCH_LOWERING: dict[Op, Lower] = {
    Op.LINEAR: _linear,
    Op.MATMUL: _call("torch.matmul"),
    Op.CONV2D: _conv2d,
    Op.ADD: _call("torch.add"),
    Op.SUB: _call("torch.sub"),
    Op.MUL: _call("torch.mul"),
    Op.DIV: _div,
    Op.NEG: _call("torch.neg"),
    Op.RELU: _call("torch.relu"),
    Op.GELU: _gelu,
    Op.SILU: _call("F.silu"),
    Op.SIGMOID: _call("torch.sigmoid"),
    Op.TANH: _call("torch.tanh"),
    Op.IDENTITY: lambda node, args: args[0],
    Op.SOFTMAX: _softmax,
    Op.LAYER_NORM: _layer_norm,
    Op.RESHAPE: _reshape,
    Op.FLATTEN: _flatten,
    Op.TRANSPOSE: _transpose,
    Op.CONCAT: _concat,
    Op.SPLIT: _split,
    **TRANSFORMER_LOWERING,
}


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
def generate_forward(graph: Graph) -> tuple[str, list[str], dict[str, str]]:
    """The source of ``forward`` for ``graph``.

    Returns ``(source, arg_names, buffers)``: the ``def forward(self, ...)`` text, the
    argument name of each graph input (in order) and ``{buffer name: param name}``.
    Raises :class:`UnsupportedOpError` for an op without a :data:`TORCH_LOWERING` entry.
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
        body = _body(graph, names, expr, buffers)
    outs = [expr[n] for n in graph.outputs.values()]
    ret = "tuple[" + ", ".join(["torch.Tensor"] * len(outs)) + "]"
    sig = ", ".join(["self", *(f"{a}: torch.Tensor" for a in args)])
    lines = [f"def forward({sig}) -> {ret}:", *body, f"    return ({', '.join(outs)},)"]
    return "\n".join(lines) + "\n", args, buffers


def _body(graph: Graph, names: _Namer, expr: dict[ComputationNode, str], buffers: dict[str, str]) -> list[str]:
    """One source line per live non-leaf node; fills ``expr`` and ``buffers`` (``{buffer: param}``)."""
    attrs = _Namer()
    by_param: dict[str, str] = {}
    body: list[str] = []
    for node in graph.live_nodes():
        if node.op is Op.INPUT:
            if node not in expr:
                raise GraphError(f"node {node.name!r} is an Input that graph {graph.name!r} does not declare")
            continue
        if node.op is Op.CONST:
            param = node.attrs["param"]
            if param not in graph.params:
                raise GraphError(f"Const node {node.name!r} refers to unknown param {param!r}")
            if param not in by_param:
                by_param[param] = attrs(param, "w_")
                buffers[by_param[param]] = param
            expr[node] = f"self.{by_param[param]}"
            continue
        lower = TORCH_LOWERING.get(node.op)
        if lower is None:
            raise UnsupportedOpError(
                f"node {node.name!r}: no torch lowering of {node.op.value}", {node.op.value: [node.name]}
            )
        try:
            code = lower(node, [expr[i] for i in node.inputs])
        except KeyError as exc:
            raise GraphError(f"node {node.name!r} reads {exc.args[0]!r} before it is defined") from None
        var = names(node.name, "v_")
        body.append(f"    {var} = {code}  # {node.op.value} {node.name!r}")
        expr[node] = var
    return body


_counter = itertools.count()


def _exec_source(source: str, graph_name: str) -> Callable[..., typing.Any]:
    """Compile ``source`` under a unique file name kept in ``linecache`` (so TorchScript can read it)."""
    filename = f"<flora_graph torch lowering {next(_counter)}: {re.sub(r'[^0-9A-Za-z_.]', '_', graph_name)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, typing.Any] = {"torch": torch, "F": F, "__name__": GENERATED_MODULE}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["forward"]


def numpy_to_torch(arr: np.ndarray) -> torch.Tensor:
    """A tensor over ``arr`` (shared when torch can; bfloat16 via its bits; readonly or negative strides copied)."""
    if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16, which torch.from_numpy does not know
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
    if not arr.flags.writeable or any(s < 0 for s in arr.strides):
        arr = np.array(arr)
    return torch.from_numpy(arr)


def to_torch_module(graph: Graph, *, fold_weights: bool = True) -> torch.nn.Module:
    """A self-contained ``nn.Module`` computing ``graph`` (see the module docstring for conventions).

    Weights are copied into buffers, so later edits of ``graph.params`` do not reach the
    module. With ``fold_weights`` (default), expressions over weights alone (a swappable
    graph's ``s * B`` or ``[W; A]``) are computed once here, as ONNX Runtime does when it
    loads a session, instead of on every call. The generated source is ``type(module).source``.
    """
    if fold_weights and any(n.inputs and all(i.op is Op.CONST for i in n.inputs) for n in graph.nodes):
        from flora_graph.passes.constant_fold import constant_fold

        graph = constant_fold(graph.copy()).graph
        graph.remove_dead()
    source, args, buffers = generate_forward(graph)
    forward = _exec_source(source, graph.name)
    cls_name = "Graph_" + re.sub(r"[^0-9A-Za-z_]", "_", graph.name)
    cls = type(cls_name, (torch.nn.Module,), {"forward": forward, "__module__": GENERATED_MODULE, "source": source})
    module = cls()
    for attr, param in buffers.items():
        module.register_buffer(attr, numpy_to_torch(np.array(graph.params[param], copy=True)))
    module.input_names = [n.name for n in graph.inputs]
    module.output_names = list(graph.outputs)
    module.arg_names = args
    return module.eval()


def output_needs_copy(graph: Graph) -> list[bool]:
    """Per output: whether it may be a weight (or computed from weights alone) and must be copied out."""
    depends: dict[ComputationNode, bool] = {}
    for node in graph.nodes:
        depends[node] = node.op is Op.INPUT or any(depends.get(i, False) for i in node.inputs)
    return [not depends.get(n, False) for n in graph.outputs.values()]


def example_shape(shape: Sequence[int | str], sizes: dict[str, int]) -> list[int]:
    """A concrete shape: static dims as they are, named dims (and products of them) from ``sizes``."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(math.prod(int(p) if p.isdigit() else sizes[p] for p in d.split("*")))
    return out
