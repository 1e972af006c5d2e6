"""ATen fx graphs (from AOT autograd) to flora_graph executables, op by op through the capture table.

:func:`~flora_graph.torch_jit.canonicalize.canonicalize` first folds AOT autograd's decompositions
back into the table's ops, so that adapters look as they do in exported graphs.

:func:`partition` splits a graph into islands the table converts (each holding at least one
``Linear``/``MatMul``/``Conv2d``: lowering a lone elementwise op costs more than it saves)
and leaves the rest (ops outside the table, shape arithmetic) to torch. Each island becomes
a :class:`CompiledIsland`: converted, optimized and compiled on its first call, with the
weights read then (and scalar chains such as ``alpha / rank`` evaluated, see
:func:`fold_scalars`), and rebuilt when a weight's fingerprint changes.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from flora_graph.errors import GraphError, UnsupportedOpError
from flora_graph.frontend.aten import ATEN_TABLE, NO_TENSOR_OPS, aten_name
from flora_graph.frontend.capture import convert_fx_graph
from flora_graph.ir import Graph, Op
from flora_graph.passes.optimize import optimize
from flora_graph.runtimes.executable import compile as compile_graph
from flora_graph.torch_jit.fingerprint import _DATA_PTR, _VERSION, TensorFingerprint, WeightCheck, bit_view
from flora_graph.torch_jit.presets import resolve_preset
from flora_graph.torch_jit.runner import TorchRunner, make_torch_runner, picker

__all__ = [
    "COMPUTE_OPS",
    "STATS",
    "WARNED",
    "CompiledIsland",
    "LoweringConfig",
    "LoweringFallbackWarning",
    "LoweringStats",
    "fold_scalars",
    "partition",
    "scalar_nodes",
    "unsupported_ops",
]

aten = torch.ops.aten

COMPUTE_OPS = frozenset({
    aten.linear.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
    aten.convolution.default, aten.conv2d.default,
})
"""Ops that make an island worth lowering."""


class LoweringFallbackWarning(UserWarning):
    """Part of a graph handed to the flora_graph backend runs in torch (emitted once per op set)."""


@dataclass
class LoweringConfig:
    """What the dynamo backend was asked for (``torch.compile(..., options={...})``)."""

    preset: str = "auto"
    """A preset name or ``"auto"`` (resolved per island by :func:`~flora_graph.torch_jit.presets.resolve_preset`)."""
    backend: str = "onnxruntime"
    fallback: str = "torch"
    check_weights: WeightCheck = "version"
    on_compile: Callable[[Graph], None] | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoweringStats:
    """Process-wide counters of the dynamo backend (see :func:`flora_graph.torch_jit.dynamo.stats`)."""

    graphs: int = 0
    """fx graphs handed to the backend."""
    inference_graphs: int = 0
    """AOT inference graphs (the ones flora_graph lowers)."""
    torch_graphs: int = 0
    """AOT training forward/backward graphs (run by torch)."""
    partitions: int = 0
    """Islands replaced by a :class:`CompiledIsland`."""
    compiles: int = 0
    """Islands converted, optimized and compiled (again after a weight change)."""
    torch_ops: dict[str, int] = field(default_factory=dict)
    """ATen ops left to torch, with their counts."""
    presets: dict[str, int] = field(default_factory=dict)
    """Compiles per preset run (``"auto"`` counted as what it resolved to)."""


STATS = LoweringStats()
WARNED: set[frozenset[str]] = set()
"""Op sets (and failed islands) already announced by a :class:`LoweringFallbackWarning`."""


# --------------------------------------------------------------------------- support
def _random(n: fx.Node) -> bool:
    """A random or side-effecting op: never folded into a constant."""
    tags = getattr(n.target, "tags", ())
    return n.is_impure() or torch.Tag.nondeterministic_seeded in tags


def scalar_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computing 0-d tensors from 0-d placeholders and literals only (``alpha / rank`` under
    ``dynamic=True``): folded into constants when an island is built, whatever their op."""
    found: set[fx.Node] = set()
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 0:
            continue
        if n.op == "placeholder" or (n.op == "call_function" and not _random(n) and all(a in found for a in n.all_input_nodes)):
            found.add(n)
    return found


def _convertible(n: fx.Node, scalars: set[fx.Node]) -> bool:
    """Whether an island can hold ``n``: the capture table converts it, or it folds (shape arithmetic stays in torch)."""
    if n.op != "call_function" or n.target in NO_TENSOR_OPS or n.target is aten.sym_size.int:
        return False
    if n in scalars:
        return True
    val = n.meta.get("val")
    if n.target is operator.getitem:
        src = n.args[0]
        return isinstance(src, fx.Node) and _convertible(src, scalars) and isinstance(val, torch.Tensor)
    if isinstance(val, list | tuple):
        return n.target in ATEN_TABLE and all(isinstance(v, torch.Tensor) for v in val)
    if not isinstance(val, torch.Tensor) or n.target not in ATEN_TABLE:
        return False
    if n.target in (aten._to_copy.default, aten.to.dtype) and not hasattr(Op, "CAST"):  # no casts in the op set
        src = n.args[0]
        return isinstance(src, fx.Node) and getattr(src.meta.get("val"), "dtype", None) == val.dtype
    return True


def unsupported_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Tensor ops of ``gm`` an island cannot hold, with counts."""
    scalars = scalar_nodes(gm)
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor) and not _convertible(n, scalars):
            name = aten_name(n.target)
            out[name] = out.get(name, 0) + 1
    return out


# --------------------------------------------------------------------------- lowered islands
class CompiledIsland(nn.Module):
    """An ATen fx graph run by a flora_graph executable; called with the graph's placeholders' values.

    Constants: the placeholders at ``weights`` (``None``: the arguments that are
    ``nn.Parameter``s at the first call) and every 0-d tensor argument (a Python scalar dynamo
    turned into an input, such as an adapter's ``alpha`` under ``dynamic=True``). Their values
    at the first call are baked into the IR graph, so the LoRA passes see them. Before each
    call their fingerprint is checked (weights: identity, version counter, data pointer;
    scalars: value) and a change rebuilds the executable. A position that changed in
    :data:`VOLATILE_AFTER` rebuilds becomes a runtime input instead (a buffer the model
    rewrites every call, a scalar argument), so it stops costing a compilation per call.
    """

    VOLATILE_AFTER = 3

    def __init__(self, gm: fx.GraphModule, weights: Sequence[int] | None, config: LoweringConfig, name: str) -> None:
        super().__init__()
        self.fx_module = gm
        self.config, self.name = config, name
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.weight_positions = None if weights is None else list(weights)
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        self.multiple = isinstance(out, list | tuple)
        self.graph: Graph | None = None
        self._runner: TorchRunner | None = None
        self._inputs: list[int] = []
        self._pick_inputs: Callable[[Sequence[Any]], Sequence[Any]] = picker([])
        self._pick_weights: Callable[[Sequence[Any]], Sequence[Any]] = picker([])
        self._tensor_pos: list[int] = []
        self._scalar_pos: list[int] = []
        self._fingerprint: TensorFingerprint | None = None
        self._scalars: list[Any] = []
        self._changes: dict[int, int] = {}
        self._volatile: set[int] = set()
        self._failed = False
        self._fast: Callable[[Sequence[Any]], list[torch.Tensor] | None] = lambda args: None

    # ------------------------------------------------------------------ constants
    def _changed(self, args: Sequence[Any]) -> bool:
        fp = self._fingerprint
        if fp is None:
            return True
        weights = self._pick_weights(args)
        if fp.copies:  # content checks, inference tensors
            return fp.changed(weights) or self._scalars_changed(args)
        return fp.moved(weights) or self._scalars_changed(args)

    def _scalars_changed(self, args: Sequence[Any]) -> bool:
        return bool(self._scalar_pos) and [args[i].item() for i in self._scalar_pos] != self._scalars

    def _constants(self, args: Sequence[Any]) -> tuple[list[int], list[int]]:
        """Positions of the weights and of the 0-d scalars to bake, volatile ones left out."""
        weights = self.weight_positions
        if weights is None:
            weights = [i for i, a in enumerate(args) if isinstance(a, nn.Parameter)]
        scalars = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 0]
        tensors = [i for i in weights if i not in scalars and i not in self._volatile]
        return tensors, [i for i in scalars if i not in self._volatile]

    def _note_changes(self, args: Sequence[Any]) -> None:
        """Count, per constant position, the rebuilds it caused; make the frequent ones runtime inputs."""
        fp = self._fingerprint
        if fp is None:
            return
        moved = [p for k, p in enumerate(self._tensor_pos) if TensorFingerprint.state_of([args[p]]) != [fp.state[k]]
                 or (k in fp.copies and not torch.equal(bit_view(args[p]), fp.copies[k]))]
        moved += [p for p, v in zip(self._scalar_pos, self._scalars, strict=True) if args[p].item() != v]
        for pos in moved:
            self._changes[pos] = self._changes.get(pos, 0) + 1
            if self._changes[pos] >= self.VOLATILE_AFTER:
                self._volatile.add(pos)

    # ------------------------------------------------------------------ build / run
    def _build(self, args: Sequence[Any]) -> None:
        tensors, scalars = self._constants(args)
        weights = {self.placeholders[i].name: (self.placeholders[i].name, args[i]) for i in tensors + scalars}
        fx_graph, folded = fold_scalars(self.fx_module.graph, {self.placeholders[i].name: args[i] for i in scalars})
        weights.update({name: (name, value) for name, value in folded.items()})
        graph = convert_fx_graph(fx_graph, weights, name=self.name)
        for out, node in list(graph.outputs.items()):
            if node.op in (Op.INPUT, Op.CONST):  # an alias (clone/detach) of an input: outputs are fresh tensors
                graph.set_output(out, graph.add(Op.IDENTITY, [node], name=f"{out}_copy"))
        preset = resolve_preset(graph, self.config.preset)
        graph = optimize(graph, preset, backend=self.config.backend)  # BACKEND_DEFAULTS, as export does
        exe = compile_graph(graph, self.config.backend, **self.config.backend_options)
        index = {p.name: i for i, p in enumerate(self.placeholders)}
        missing = [n.name for n in graph.inputs if n.name not in index]
        if missing:
            raise GraphError(f"{self.name}: graph inputs {missing} are not placeholders")
        self._inputs = [index[n.name] for n in graph.inputs]
        self.graph, self._runner = graph, make_torch_runner(exe)
        self._tensor_pos, self._scalar_pos = tensors, scalars
        self._pick_inputs, self._pick_weights = picker(self._inputs), picker(tensors)
        self._fingerprint = TensorFingerprint([args[i] for i in tensors], self.config.check_weights)
        self._scalars = [args[i].item() for i in scalars]
        self._fast = self._fast_path()
        STATS.compiles += 1
        STATS.presets[preset] = STATS.presets.get(preset, 0) + 1
        if self.config.on_compile is not None:
            self.config.on_compile(graph)

    def _rebuild(self, args: Sequence[Any]) -> bool:
        if self._failed:
            return False
        self._note_changes(args)
        try:
            self._build(args)
            return True
        except (UnsupportedOpError, GraphError) as exc:
            if self.config.fallback == "error":
                raise
            _warn_once(frozenset({f"{self.name}: {exc}"}), f"flora_graph backend: {self.name} runs in torch: {exc}")
            self._failed = True
            return False

    def _fast_path(self) -> Callable[[Sequence[Any]], list[torch.Tensor] | None]:
        """``run`` for the usual case, as one closure: the weights' identities, version counters and data
        pointers compared in C-level ``map``s (as :meth:`TensorFingerprint.moved` does); ``None`` when
        anything moved (or content checks or scalars are involved), and :meth:`run` takes the full path."""
        fp = self._fingerprint
        if fp is None or fp.copies or self._scalar_pos:
            return lambda args: None
        mine, versions, pointers = tuple(fp.tensors), fp.versions, fp.pointers
        pick_weights, pick_inputs, runner = self._pick_weights, self._pick_inputs, self._runner
        same, version, data_ptr = operator.is_, _VERSION, _DATA_PTR

        def fast(args: Sequence[Any]) -> list[torch.Tensor] | None:
            weights = pick_weights(args)
            # identities first: a replaced tensor (perhaps an inference tensor, without a version counter) stops here
            if (all(map(same, weights, mine)) and list(map(version, weights)) == versions
                    and list(map(data_ptr, weights)) == pointers):
                return runner(pick_inputs(args))  # type: ignore[misc]
            return None

        return fast

    def run(self, args: Sequence[Any]) -> list[torch.Tensor]:
        """The graph's outputs, as a list, for the placeholders' values ``args``."""
        outs = self._fast(args)
        if outs is not None:
            return outs
        if self._changed(args) and not self._rebuild(args):
            out = self.fx_module(*args)
            return list(out) if self.multiple else [out]
        return self._runner(self._pick_inputs(args))  # type: ignore[misc]

    def __call__(self, *args: Any) -> Any:
        """Run on the placeholders' values; returns what the fx graph returns (a tensor or a tuple)."""
        outs = self.run(args)
        return tuple(outs) if self.multiple else outs[0]

    forward = __call__


def fold_scalars(graph: fx.Graph, values: Mapping[str, torch.Tensor]) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """Evaluate the scalar chains (:func:`scalar_nodes`) fed by the 0-d placeholders in ``values``.

    Returns a copy of ``graph`` in which each chain's result, where a non-scalar node reads it,
    is a new placeholder, and those placeholders' values: constants for the conversion,
    whatever ops (table ops or not) computed them.
    """
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new.output(new.graph_copy(graph, env))
    nodes = list(new.nodes)
    found: dict[fx.Node, torch.Tensor] = {}
    for n in nodes:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 0:
            continue
        if n.op == "placeholder" and n.name in values:
            found[n] = values[n.name]
        elif n.op == "call_function" and not _random(n) and all(a in found for a in n.all_input_nodes):
            found[n] = n.target(*fx.node.map_arg(n.args, found.__getitem__), **fx.node.map_arg(n.kwargs, found.__getitem__))
    folded: dict[str, torch.Tensor] = {}
    first = next(iter(nodes), None)
    for n in nodes:
        if n.op != "call_function" or n not in found or all(u in found for u in n.users):
            continue
        with new.inserting_before(first):
            ph = new.placeholder(f"{n.name}_folded")
        ph.meta = dict(n.meta)
        n.replace_all_uses_with(ph, delete_user_cb=lambda u: u not in found)
        folded[ph.name] = found[n]
    new.eliminate_dead_code()
    return new, folded


def _warn_once(key: frozenset[str], message: str) -> None:
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(message, LoweringFallbackWarning, stacklevel=3)


# --------------------------------------------------------------------------- partition
def partition(gm: fx.GraphModule, weights: Sequence[int] | None, config: LoweringConfig,
              name: str = "graph") -> Callable[[list], Any]:
    """``gm`` with its convertible islands replaced by :class:`CompiledIsland` modules.

    Returns a boxed callable (AOT autograd's convention: it takes the list of the graph's
    placeholders' values, which it clears, and returns the outputs). When one island covers
    the whole graph, the island runs without the fx module around it.
    Ops left to torch are counted in :data:`STATS` and named in one warning per op set;
    with ``config.fallback == "error"`` they raise :class:`UnsupportedOpError` instead.
    """
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase

    scalars = scalar_nodes(gm)

    class _Support(OperatorSupportBase):
        def is_node_supported(self, submodules: Any, node: fx.Node) -> bool:
            return _convertible(node, scalars)

    left = unsupported_ops(gm)
    if left:
        if config.fallback == "error":
            raise UnsupportedOpError(f"{len(left)} op(s) outside the flora_graph op set in {name}: {sorted(left)}",
                                     {op: [name] for op in left})
        for op, k in left.items():
            STATS.torch_ops[op] = STATS.torch_ops.get(op, 0) + k
        _warn_once(frozenset(left), f"flora_graph backend: op(s) {', '.join(sorted(left))} run in torch "
                   f"(outside the flora_graph op set); the rest of {name} is compiled")

    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    weight_names = None if weights is None else {placeholders[i] for i in weights}
    partitioner = CapabilityBasedPartitioner(gm, _Support(), allows_single_node_partition=True)
    islands = [p for p in partitioner.propose_partitions() if any(n.target in COMPUTE_OPS for n in p.nodes)]
    if not islands:
        return _boxed(gm)
    fused = partitioner.fuse_partitions(islands)
    lowered: list[tuple[str, CompiledIsland]] = []
    for node in list(fused.graph.nodes):
        if node.op != "call_module" or not node.target.startswith("fused_"):
            continue
        sub = getattr(fused, node.target)
        positions = None if weight_names is None else [
            i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "placeholder" and a.name in weight_names
        ]
        island = CompiledIsland(sub, positions, config, f"{name}.{node.target}")
        setattr(fused, node.target, island)
        lowered.append((node.target, island))
        STATS.partitions += 1
    fused.recompile()
    direct = _whole(fused, lowered)
    return direct if direct is not None else _boxed(fused)


def _whole(fused: fx.GraphModule, lowered: list[tuple[str, CompiledIsland]]) -> Callable[[list], list] | None:
    """A boxed runner of the island alone when it is the whole graph (placeholders in order, outputs as they are)."""
    if len(lowered) != 1:
        return None
    target, island = lowered[0]
    nodes = list(fused.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    calls = [n for n in nodes if n.op not in ("placeholder", "output")]
    out = nodes[-1].args[0]
    if not calls or calls[0].target != target or not isinstance(out, list | tuple):
        return None
    call, getitems = calls[0], calls[1:]
    if not all(isinstance(a, fx.Node) and a.op == "placeholder" for a in call.args) or call.kwargs:
        return None
    where = [placeholders.index(a) for a in call.args]
    if island.multiple:
        index = {g: g.args[1] for g in getitems if g.target is operator.getitem and g.args[0] is call}
        if len(index) != len(getitems) or not all(o in index for o in out):
            return None
        order = [index[o] for o in out]
    elif getitems or list(out) != [call]:
        return None
    else:
        order = [0]
    run = island.run
    same = where == list(range(len(placeholders)))
    count = len(order)
    if same and order == list(range(count)):  # the common case: nothing to reorder on the way in or out

        def run_whole(args: list) -> list:
            outs = run(args)  # a fresh list (the runner's, or the fx module's outputs)
            args.clear()  # the boxed convention: the callee frees its inputs
            return outs if len(outs) == count else outs[:count]

        return run_whole

    def run_island(args: list) -> list:
        outs = run(args if same else [args[j] for j in where])
        args.clear()  # the boxed convention: the callee frees its inputs
        return [outs[i] for i in order]

    return run_island


def _boxed(gm: fx.GraphModule) -> Callable[[list], Any]:
    def run(args: list) -> Any:
        values = list(args)
        args.clear()
        return gm(*values)

    return run
