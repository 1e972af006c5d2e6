"""Capture a deep decoder by tracing its first layers and stamping the rest.

``torch.export`` spends most of a decoder's capture tracing its layers one op at a time under fake
tensors, about the same time for every layer (0.4 s a layer on a 2-core VM, 10 s of a 24-layer 0.5B
model's 19 s export). Layers of one kind have one program: tracing a template of each kind is enough.
Where the layers past the first are alike, three are traced (layer 0, which often differs, the template
1, and 2 for the check); where they come in kinds (windowed and full attention in turn, no rotary in every
fourth layer), the first layers up to the first of every kind. The program of each kind's template is
copied for the later layers of its kind, each copy reading its own layer's weights and cache and the layer
before it, and the head reads the last copy.

How it stays exact:

* **Which models.** The decoder's layers are one ``nn.ModuleList`` as long as its cache. Two layers are
  of one kind where they agree in every module's class, its plain attributes (``sliding_window``,
  ``is_sliding``, a LoRA layer's ``scaling`` ...; the layer's own index aside, and its own module path where an
  attribute names it), its forward hooks, its weights' names, shapes and dtypes, and in the config's
  per-layer lists (``layer_types``). The cache holds keys and values in every layer and nothing else, and at
  least :data:`MIN_STAMPED` layers are left past those traced (:func:`plan` says why not otherwise).
* **The trace.** The model runs with its first layers (the others removed from the list while it is
  traced) and the flat cache of all N: the program's layers run in order, each reading the one before it
  through one tensor (the residual stream) and, besides, only tensors of layer 0 that every later layer reads as
  they are (T5's position biases, which its first layer computes), the head reading the last.
* **The checks.** The first traced layer past its kind's template (layer 2 where the layers are alike),
  stamped from the template, must equal, op for op, that layer as torch.export traced it
  (:func:`canonical`: every op, its arguments, its module path, its output's shape and dtype, weights
  by name, constants by value). Anything else raises :class:`StampError` and the caller traces every
  layer instead. The caller (:func:`~flora_graph.frontend.causal_lm.capture_causal_lm`) then runs the
  whole stamped graph against the eager model on a short decode step, the logits and every layer's keys and
  values, which a layer past those traced that computes otherwise (a Python branch on its own index that
  neither its attributes nor the config show) would fail.

The stamped program then converts as a traced one does (:func:`~flora_graph.frontend.capture.convert_fx_graph`);
adapters are tagged from the module paths the copies carry.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flora_graph.errors import GraphError

__all__ = ["MIN_LAYERS", "MIN_STAMPED", "LayerStack", "StampError", "canonical", "check_by_value", "plan", "plan_layers",
           "stamp", "stamped_or_none", "truncated"]

_log = logging.getLogger(__name__)

MIN_STAMPED = 3
"""The fewest layers left to stamp past those traced (more kinds of layer need more traced): below it, tracing every
layer costs about what the stamping and its checks do."""

MIN_LAYERS = 3 + MIN_STAMPED
"""The fewest layers any plan stamps: three traced (layer 0, a template, the check) and :data:`MIN_STAMPED` left;
fewer are refused before the layers are compared."""

_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "idx", "training"})
"""Module attributes that hold the layer's own index (or the mode), left out of the comparison of layers."""


class StampError(GraphError):
    """The layers cannot be stamped (the message says why); the caller traces every layer."""


@dataclass(frozen=True)
class LayerStack:
    """The decoder's layers: ``owner.<attr>`` is the ``nn.ModuleList`` at module path ``prefix``, ``count`` long.

    ``kinds``: each layer's kind (layers of one kind are alike; layer 0 is its own kind unless it is like a later
    one), ``traced``: the first layers traced, which hold a template of every kind (its first layer from 1 on),
    ``check``: the traced layer stamped from its kind's template and compared with its trace."""

    owner: nn.Module
    attr: str
    prefix: str
    count: int
    kinds: tuple[int, ...]
    traced: int
    check: int

    def templates(self) -> dict[int, int]:
        """Each kind's template: its first layer from layer 1 on."""
        return _templates(self.kinds)


def _templates(kinds: Sequence[int]) -> dict[int, int]:
    """Kind -> its template, the first of ``kinds``' layers of the kind from layer 1 on."""
    out: dict[int, int] = {}
    for i in range(1, len(kinds)):
        out.setdefault(kinds[i], i)
    return out


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if depth > 2:
        return False
    if isinstance(value, list | tuple | frozenset | set):
        return len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 64 and all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _hooks(m: nn.Module) -> tuple:
    """The forward hooks of ``m`` (a hook adds ops to its module's program), by the function each calls."""
    found = []
    for kind in ("_forward_pre_hooks", "_forward_hooks"):
        for h in (getattr(m, kind, None) or {}).values():
            fn = getattr(h, "__func__", h)
            found.append((kind, getattr(fn, "__module__", ""), getattr(fn, "__qualname__", type(fn).__qualname__),
                          id(getattr(fn, "__code__", fn))))
    return tuple(found)


def _signature(layer: nn.Module, path: str) -> tuple:
    """What must agree between two layers for one's program to be the other's with its own weights (``path``: the
    layer's module path, which an attribute naming a module in it reads as ``#``)."""
    here = re.compile(re.escape(path) + r"(?=\.|'|$)")
    parts: list[Any] = []
    for name, m in layer.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, here.sub("#", repr(v))) for k, v in vars(m).items()
                             if not k.startswith("_") and k not in _INDEX_ATTRS and _plain(v)))
        parts.append((name, type(m).__module__, type(m).__qualname__, attrs, "forward" in vars(m), _hooks(m)))
    for name, t in [*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False)]:
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return tuple(parts)


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def plan(model: nn.Module, layout: Any) -> LayerStack:
    """The layer list of ``model`` (a transformers causal LM, the module torch.export traces) to stamp for a cache
    laid out as ``layout`` (a :class:`~flora_graph.frontend.causal_lm.CacheLayout`): its layers' kinds, how many to
    trace and which to check; raises :class:`StampError` saying why where its layers cannot be stamped."""
    if (layout.shared or layout.kv_layers is not None or layout.states or layout.indexed or layout.indexer_positions
            or layout.cache_type is not None or layout.repeats):
        raise StampError("the cache holds more than keys and values in every layer")
    n = int(layout.layers)
    if n < MIN_LAYERS:
        raise StampError(f"{n} layers: too few to stamp")
    if layout.per_layer and len(set(layout.per_layer[1:])) > 1:
        raise StampError("the layers' keys and values differ in shape")
    found = [path for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise StampError(f"{len(found)} module lists of {n} layers")
    return plan_layers(model, found[0])


def plan_layers(model: nn.Module, prefix: str) -> LayerStack:
    """The layer list of ``model`` at module path ``prefix`` (an ``nn.ModuleList``) to stamp: its layers' kinds, how
    many to trace and which to check; raises :class:`StampError` saying why where its layers cannot be stamped.
    :func:`plan` finds a causal LM's; an encoder-decoder model's decoder names its own."""
    layers = model.get_submodule(prefix) if prefix else model
    if not prefix or not isinstance(layers, nn.ModuleList):
        raise StampError(f"{prefix or 'the model'} is not a layer list within the model")
    n = len(layers)
    if n < MIN_LAYERS:
        raise StampError(f"{n} layers: too few to stamp")
    owner_path, _, attr = prefix.rpartition(".")
    owner = model.get_submodule(owner_path)
    if getattr(owner, attr, None) is not layers:
        raise StampError(f"{prefix} is not an attribute of its owner")
    cfg = _text_config(model)
    per_layer = [(key, value) for key, value in sorted(vars(cfg).items() if cfg is not None else ())
                 if isinstance(value, list | tuple) and len(value) == n]
    seen: dict[tuple, int] = {}
    kinds = []
    for i in range(n):  # a kind: what the layer's modules are and what the config's per-layer lists say of it
        sig = (_signature(layers[i], f"{prefix}.{i}"), tuple((key, repr(value[i])) for key, value in per_layer))
        kinds.append(seen.setdefault(sig, len(seen)))
    templates = _templates(kinds)
    traced = max(templates.values()) + 1
    # the check: the first layer past its kind's template, traced too
    check = next((i for i in range(2, n) if templates[kinds[i]] < i), None)
    if check is None:
        raise StampError(f"no two of layers 1 .. {n - 1} are alike ({prefix})")
    traced = max(traced, check + 1)
    if n - traced < MIN_STAMPED:
        raise StampError(f"{traced} of {n} layers to trace for {len(templates)} kind(s) of layer: too few left to stamp")
    return LayerStack(owner, attr, prefix, n, tuple(kinds), traced, check)


@contextlib.contextmanager
def truncated(stack: LayerStack) -> Iterator[None]:
    """While the block runs, the layer list holds its first ``stack.traced`` layers (the same modules, the same
    paths)."""
    full = getattr(stack.owner, stack.attr)
    setattr(stack.owner, stack.attr, nn.ModuleList(list(full)[:stack.traced]))
    try:
        yield
    finally:
        setattr(stack.owner, stack.attr, full)


def _layer_of_path(path: str, prefix: str) -> int | None:
    if not path.startswith(prefix + "."):
        return None
    head = path[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _stack_paths(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]


def _renamed_stack(node: torch.fx.Node, prefix: str, old: int, new: int) -> dict:
    """``node``'s ``nn_module_stack`` with layer ``old``'s paths moved to layer ``new``."""
    head, out = f"{prefix}.{old}", {}
    for key, v in (node.meta.get("nn_module_stack") or {}).items():
        if isinstance(v, tuple) and v and isinstance(v[0], str) and (v[0] == head or v[0].startswith(head + ".")):
            v = (f"{prefix}.{new}{v[0][len(head):]}", *v[1:])
            key = f"{key}@{new}"
        out[key] = v
    return out


@dataclass
class Stamped:
    """A stamped program: ``graph``, and the weight placeholders by name (``name -> (fqn, tensor)``)."""

    graph: torch.fx.Graph
    weights: dict[str, tuple[str, torch.Tensor]]


def stamp(fx_graph: torch.fx.Graph, weights: Mapping[str, tuple[str, torch.Tensor]], input_names: Sequence[str],
          output_names: Sequence[str], layers: int, prefix: str, tensors: Mapping[str, torch.Tensor],
          kinds: Sequence[int], *, again: Collection[int] = (), cached: bool = True,
          constants: Collection[str] = ()) -> Stamped:
    """The program of ``fx_graph`` (a trace of the first layers of a decoder whose layer list is at ``prefix``) with
    the layers past those traced, up to ``layers``, and the traced layers in ``again``, copied from their kind's
    template (``kinds``: each layer's kind; a kind's template is its first layer from 1 on, traced).

    ``weights``: placeholder name -> (fqn, tensor) of the trace's weights; ``input_names`` / ``output_names``: the
    graph's inputs (of the tensor placeholders that are not weights, in order) and outputs, among them
    ``past_key_values.{i}.*`` / ``present.{i}.*`` for every layer; ``tensors``: the whole model's weights by fqn,
    where the copies find theirs; ``constants``: the placeholders of tensors the program made (lifted constants), which
    every copy reads as its template does. ``cached=False``: the layers have no cache (an encoder's, stamped before the
    decoder's in a graph whose layer-numbered inputs and outputs are the decoder's). Raises :class:`StampError` where
    the program is not a chain of layers each reading the one before through one tensor.
    """
    nodes = list(fx_graph.nodes)
    if any(n.op not in ("placeholder", "call_function", "output") for n in nodes):
        raise StampError("the program calls subgraphs")
    user = [n for n in nodes if n.op == "placeholder" and n.name not in weights
            and isinstance(n.meta.get("val"), torch.Tensor)]
    if len(user) != len(input_names):
        raise StampError(f"{len(input_names)} input names for {len(user)} inputs")
    by_input = dict(zip(input_names, user, strict=True))
    input_of = {n: name for name, n in by_input.items()}

    def layer_of(n: torch.fx.Node) -> int | None:
        found = [i for p in _stack_paths(n) if (i := _layer_of_path(p, prefix)) is not None]
        return found[0] if found else None

    calls = [n for n in nodes if n.op == "call_function"]
    where = {n: layer_of(n) for n in calls}
    traced = sorted({i for i in where.values() if i is not None})
    count = len(traced)
    template_of = _templates(kinds[:layers])
    templates = set(template_of.values())
    if traced != list(range(count)) or count > layers or any(t >= count for t in templates) or any(
            i in templates or not 0 < i < count for i in again):
        raise StampError(f"the trace holds layers {traced}")
    blocks: dict[int, list[torch.fx.Node]] = {i: [] for i in traced}
    pre: list[torch.fx.Node] = []
    tail: list[torch.fx.Node] = []
    seen_layer = -1
    for n in calls:  # the program must run: the part before the layers, layer 0, 1, ..., the head
        i = where[n]
        if i is None:
            (pre if seen_layer < 0 else tail).append(n)
            continue
        if i < seen_layer or tail:
            raise StampError(f"layer {i}'s ops are not together ({n.name})")
        seen_layer = i
        blocks[i].append(n)

    def reads(block: Sequence[torch.fx.Node]) -> list[torch.fx.Node]:
        out: dict[torch.fx.Node, None] = {}
        for n in block:
            for a in n.all_input_nodes:
                out.setdefault(a, None)
        return list(out)

    def size(n: torch.fx.Node) -> bool:  # a size (torch.export computes one once, where first asked): shared
        return isinstance(n.meta.get("val"), torch.SymInt | torch.SymFloat | torch.SymBool | int | float | bool)

    # tensors of layer 0 that the layers past the next read too, beside the one tensor layers pass on (T5's position
    # biases, which its first layer computes and every later layer adds): each copy reads them as its template does
    side = {n for n in blocks.get(0, []) if not size(n) and any((where.get(u) or 0) >= 2 for u in n.users)}
    # the one tensor from layer to layer: what each layer reads of the one before, what the head reads of the last
    into: dict[int, torch.fx.Node] = {}
    out_of: dict[int, torch.fx.Node] = {}
    for i in traced[1:]:
        entering = [a for a in reads(blocks[i]) if a.op == "call_function" and where[a] == i - 1 and not size(a)
                    and a not in side]
        if len(entering) != 1:
            raise StampError(f"layer {i} reads {len(entering)} tensors of layer {i - 1}")
        into[i] = out_of[i - 1] = entering[0]
    into_head = [a for a in reads(tail) if a.op == "call_function" and where[a] is not None and not size(a)
                 and a not in side]
    if len(into_head) != 1 or where[into_head[0]] != count - 1:
        raise StampError(f"the head reads {len(into_head)} tensors of the layers")
    out_of[count - 1] = into_head[0]
    for i in traced:
        for n in reads(blocks[i]):
            if n.op == "call_function" and where[n] is not None and where[n] not in (i, i - 1) and not size(n) \
                    and n not in side:
                raise StampError(f"layer {i} reads layer {where[n]} ({n.name})")
        for n in blocks[i]:  # a layer's tensors go to the next layer (one), the head (the last's) and the outputs
            if size(n) or n in side:
                continue
            for u in n.users:
                if u.op == "call_function" and where.get(u) != i and not (u in tail or where.get(u) == i + 1):
                    raise StampError(f"{n.name} of layer {i} is read by {u.name}")
                if u.op == "call_function" and where.get(u) != i and n is not out_of[i]:
                    raise StampError(f"{n.name} of layer {i} is read by {u.name}, past the one tensor layers pass on")

    out_node = next(n for n in nodes if n.op == "output")
    outs = list(out_node.args[0]) if isinstance(out_node.args[0], tuple | list) else [out_node.args[0]]
    kept_outs = [o for o in outs if isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)]
    if len(kept_outs) != len(outs) or len(outs) != len(output_names):
        raise StampError(f"{len(output_names)} output names for {len(outs)} outputs")
    out_at = {name: k for k, name in enumerate(output_names)}
    # the inputs and outputs of one layer's cache (none for layers without one)
    layer_name = re.compile(r"^(past_key_values|present)\.(\d+)\.(.+)$" if cached else r"(?!)")

    def moved(name: str, layer: int) -> str:
        m = layer_name.match(name)
        return f"{m.group(1)}.{layer}.{m.group(3)}" if m else name

    # ops before the layers that read one layer's cache (the flat cache's layers made from the inputs): a copy
    # reads its own layer's, found by structure with the template's layer index moved
    past_of = {n: (int(m.group(2)), m.group(3)) for n, name in input_of.items()
               if (m := layer_name.match(name)) and m.group(1) == "past_key_values"}
    pre_set = set(pre)
    deps: dict[torch.fx.Node, frozenset[int]] = {}
    for n in pre:
        found: set[int] = set()
        if size(n):  # the layers' caches share their sizes
            deps[n] = frozenset()
            continue
        for a in n.all_input_nodes:
            found |= {past_of[a][0]} if a in past_of else deps.get(a, frozenset())
        deps[n] = frozenset(found)
    keys: dict[tuple[torch.fx.Node, tuple[int, int] | None], Any] = {}

    def key(n: torch.fx.Node, move: tuple[int, int] | None) -> Any:
        """``n``'s structure, layer ``move[0]``'s cache read as layer ``move[1]``'s where given."""
        if (n, move) in keys:
            return keys[(n, move)]

        def enc(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                if a in past_of:
                    i, kind = past_of[a]
                    return ("past", move[1] if move is not None and i == move[0] else i, kind)
                if a in pre_set:
                    return ("pre", key(a, move))
                if a.name in weights:  # the model's weights by name, a constant made during the call by value
                    fqn, t = weights[a.name]
                    return ("weight", fqn) if fqn in tensors else ("constant", _digest(t))
                return ("node", a.name)
            if isinstance(a, list | tuple):
                return tuple(enc(x) for x in a)
            if isinstance(a, dict):
                return tuple(sorted((k, enc(v)) for k, v in a.items()))
            return repr(a)

        keys[(n, move)] = out = (str(n.target), enc(n.args), enc(n.kwargs))
        return out

    by_key: dict[Any, torch.fx.Node] = {}
    for n in pre:
        if deps[n]:
            by_key.setdefault(key(n, None), n)

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    new_weights = dict(weights)
    by_fqn = {weights[n.name][0]: n for n in nodes if n.op == "placeholder" and n.name in weights}
    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    for n in pre:
        env[n] = graph.node_copy(n, lambda a: env[a])
    made: dict[str, torch.fx.Node] = {}

    def weight_of(a: torch.fx.Node, t: int, j: int) -> torch.fx.Node:
        fqn, tensor = weights[a.name]
        head = f"{prefix}.{t}."
        if not fqn.startswith(head) or a.name in constants:  # a constant the layer made: the same in every copy
            return env[a]
        want = f"{prefix}.{j}.{fqn[len(head):]}"
        if want in by_fqn:
            return env[by_fqn[want]]
        if want not in made:
            found = tensors.get(want)
            if found is None or tuple(found.shape) != tuple(tensor.shape) or found.dtype != tensor.dtype:
                raise StampError(f"the model has no weight {want} like {fqn}")
            ph = graph.placeholder(f"stamped_{j}_{a.name}")
            ph.meta = dict(a.meta)
            new_weights[ph.name] = (want, found)
            made[want] = ph
        return made[want]

    def copy(t: int, j: int, before: torch.fx.Node) -> dict[torch.fx.Node, torch.fx.Node]:
        """Layer ``t``'s ops as layer ``j``'s, reading ``before`` where ``t`` reads the layer before it."""
        mine: dict[torch.fx.Node, torch.fx.Node] = {}
        body = set(blocks[t])

        def arg(a: torch.fx.Node) -> torch.fx.Node:
            if a in mine:
                return mine[a]
            if a is into[t]:
                return before
            if a.op == "placeholder":
                if a.name in weights:
                    return weight_of(a, t, j)
                name = input_of.get(a)
                if name is not None and (m := layer_name.match(name)) and int(m.group(2)) == t:
                    return env[by_input[moved(name, j)]]
                return env[a]
            if a in side:
                return env[a]
            if a not in body and where.get(a) is not None and not size(a):
                raise StampError(f"layer {t} reads {a.name} of layer {where[a]}")
            if a in pre_set and deps[a]:  # made from the cache's inputs: from layer j's where it is the template's
                if deps[a] != {t}:
                    raise StampError(f"layer {t} reads {a.name}, made from the cache of layers {sorted(deps[a])}")
                twin = by_key.get(key(a, (t, j)))
                if twin is None:
                    raise StampError(f"no op makes layer {j}'s {a.name}")
                return env[twin]
            return env[a]

        for n in blocks[t]:
            if size(n):  # a size the template computed: torch.export reuses it in the later layers
                mine[n] = env[n]
                continue
            c = graph.node_copy(n, arg)
            c.meta = dict(n.meta)
            c.meta["nn_module_stack"] = _renamed_stack(n, prefix, t, j)
            mine[n] = c
        return mine

    copies: dict[int, dict[torch.fx.Node, torch.fx.Node]] = {}
    last_out: torch.fx.Node | None = None  # the output of the layer placed last
    for j in range(layers):
        if j < count and j not in again:
            for n in blocks[j]:
                env[n] = graph.node_copy(n, lambda a: env[a])
            last_out = env[out_of[j]] if j in out_of else None
            continue
        t = template_of[kinds[j]]
        copies[j] = copy(t, j, last_out)
        last_out = copies[j][out_of[t]]
        if j < count:  # a traced layer stamped again: the layers after it read the copy
            env[out_of[j]] = last_out
    for n in tail:
        env[n] = graph.node_copy(n, lambda a: last_out if a is out_of[count - 1] else env[a])
    new_outs = []
    for name, o in zip(output_names, outs, strict=True):
        m = layer_name.match(name)
        i = int(m.group(2)) if m and m.group(1) == "present" else None
        if i is not None and i in copies:
            t = template_of[kinds[i]]
            src = outs[out_at[moved(name, t)]]
            if where.get(src) != t:
                raise StampError(f"{moved(name, t)} is not made by layer {t}")
            new_outs.append(copies[i][src])
        elif o.op == "call_function" and where.get(o) is not None and where[o] in again:
            # a traced layer stamped again made it: the copy's output of the same name (for a later layer's stand-in
            # that is this layer's output, the name this layer gives it)
            j = where[o]
            own = next((n2 for n2, o2 in zip(output_names, outs, strict=True)
                        if o2 is o and (m2 := layer_name.match(n2)) and int(m2.group(2)) == j), None)
            src = None if own is None else outs[out_at[moved(own, template_of[kinds[j]])]]
            if src is None or src not in copies[j]:
                raise StampError(f"output {name} comes from layer {j}")
            new_outs.append(copies[j][src])
        else:
            new_outs.append(env[o])
    graph.output(tuple(new_outs) if isinstance(out_node.args[0], tuple | list) else new_outs[0])
    return Stamped(graph, new_weights)


def _digest(t: torch.Tensor) -> tuple[str, str, tuple[int, ...]]:
    """A tensor's value as a key: a hash of its bytes, its dtype and shape."""
    data = t.detach().cpu().contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return hashlib.sha1(raw).hexdigest(), str(data.dtype), tuple(data.shape)


def canonical(fx_graph: torch.fx.Graph, weights: Mapping[str, tuple[str, torch.Tensor]], constants: Sequence[str],
              input_names: Sequence[str]) -> list[tuple]:
    """``fx_graph`` op by op as plain values that two traces of one program share: each op's target, arguments
    (ops by position, weights by name, constants by value, inputs by graph input name), module path, and output
    shape and dtype; the op order is the program's."""
    constants = set(constants)
    user = [n for n in fx_graph.nodes if n.op == "placeholder" and n.name not in weights
            and isinstance(n.meta.get("val"), torch.Tensor)]
    named = dict(zip(user, input_names, strict=True))
    digests: dict[str, str] = {}
    at: dict[torch.fx.Node, int] = {}

    def enc(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            if a.op == "placeholder":
                if a.name in weights:
                    fqn, t = weights[a.name]
                    if a.name in constants:
                        if a.name not in digests:
                            digests[a.name] = _digest(t)
                        return ("constant", digests[a.name])
                    return ("weight", fqn)
                return ("input", named.get(a, a.name))
            return ("op", at[a])
        if isinstance(a, list | tuple):
            return tuple(enc(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, enc(v)) for k, v in a.items()))
        return repr(a)

    def meta(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), repr(tuple(v.shape)))
        if isinstance(v, list | tuple):
            return tuple(meta(x) for x in v)
        return repr(v)

    out: list[tuple] = []
    for n in fx_graph.nodes:
        if n.op == "placeholder":
            continue
        at[n] = len(out)
        out.append((n.op, str(n.target), enc(n.args), enc(n.kwargs), tuple(_stack_paths(n)), meta(n.meta.get("val"))))
    return out


def check_by_value(graph: Any, feeds: Mapping[str, Any], eager: Callable[[], Sequence[torch.Tensor]],
                   out_names: Sequence[str], what: str) -> None:
    """Raise :class:`StampError` unless ``graph`` (a stamped IR graph), run in the numpy reference backend on ``feeds``
    (those it takes), gives the outputs ``out_names`` that ``eager()`` returns in that order, each within ``1e-3`` of
    its own scale: the stamped layers past those traced are checked by value too. ``what`` names the graph in the
    message."""
    import numpy as np

    from flora_graph.runtimes import compile as compile_graph

    takes = {i.name for i in graph.inputs}
    try:
        with torch.no_grad():
            want = eager()
        got = compile_graph(graph, "numpy")({k: v for k, v in feeds.items() if k in takes})
    except Exception as exc:  # a model the reference check cannot run: not stamped
        raise StampError(f"the check of {what} failed to run ({type(exc).__name__}: {exc})") from exc
    for name, ref in zip(out_names, want, strict=True):
        ref = ref.detach().float().numpy()
        diff = float(np.abs(np.asarray(got[name], np.float32) - ref).max()) if ref.size else 0.0
        if not diff <= 1e-3 * (1.0 + float(np.abs(ref).max())):
            raise StampError(f"{what}'s {name} differs from eager by {diff:.3g}")


def stamped_or_none(stamped: Callable[[], Any], check: Callable[[Any], None], what: str) -> Any | None:
    """``stamped()`` (a :func:`capture_stamped` graph) where ``check`` (by value, as :func:`check_by_value`) passes it;
    ``None`` where either raises (a :class:`StampError`, or what the stamping did not foresee), logged at debug level
    with the reason: the caller traces every layer of ``what`` instead."""
    try:
        graph = stamped()
        check(graph)
        return graph
    except Exception as exc:
        _log.debug("%s: every layer traced: %s", what, exc)
        return None


def capture_stamped(model: nn.Module, example_inputs: Mapping[str, Any], dynamic_dims: Mapping[str, Any], layout: Any,
                    *, name: str, input_names: Sequence[str], output_names: Sequence[str],
                    dim_max: Mapping[str, int] | None = None, share_weights: bool = False,
                    stack: LayerStack | None = None, uncached: Sequence[LayerStack] = ()) -> Any:
    """:func:`~flora_graph.frontend.capture` of a decoder with its flat cache (the arguments
    :func:`~flora_graph.frontend.causal_lm.capture_causal_lm` passes it), tracing its first layers (:func:`plan` of
    ``layout``, or ``stack`` where the caller planned the layers, as an encoder-decoder model's decoder does) and
    stamping the others; the layer lists ``uncached`` (an encoder's, traced in the same program before the decoder's)
    are cut and stamped the same way first, their layers without a cache. Raises :class:`StampError` where that
    cannot be done exactly (:func:`plan`, :func:`stamp`, the check of the first layer past its kind's template),
    before anything is converted."""
    from flora_graph.frontend.capture import _lifted, convert_fx_graph, flat_dynamic_dims, trace_with_torch_export

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) and hasattr(
        model, "peft_config") else model
    stacks = [*((s, False) for s in uncached), (plan(base, layout) if stack is None else stack, True)]
    try:
        with contextlib.ExitStack() as cut:
            for s, _ in stacks:
                cut.enter_context(truncated(s))
            traced = trace_with_torch_export(model, example_inputs, dynamic_dims, dim_max=dim_max)
    except Exception as exc:  # the model needs all its layers to run: every layer is traced instead
        raise StampError(f"its first layers alone ({', '.join(f'{s.traced} of {s.prefix}' for s, _ in stacks)}) do "
                         f"not trace ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") \
            from exc
    ep = traced.ep
    sig = ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    weights = {n: (fqn, state[fqn]) for n, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                                                   **sig.inputs_to_lifted_tensor_constants}.items()}
    module = traced.model
    tensors = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    constants = sorted(_lifted(ep))
    for placeholder, (fqn, t) in weights.items():  # the trace read the layers' own tensors (none swapped meanwhile)
        own = tensors.get(fqn)
        if placeholder not in constants and any(fqn.startswith(f"{s.prefix}.") for s, _ in stacks) and (
                own is None or own.shape != t.shape or own.dtype != t.dtype or own.data_ptr() != t.data_ptr()
                or own.stride() != t.stride()):
            raise StampError(f"the traced program reads {fqn} other than the model holds it")
    full = Stamped(ep.graph, weights)
    for s, cached in stacks:  # each list in turn, on the program with the lists before it stamped
        check = stamp(full.graph, full.weights, input_names, output_names, s.traced, s.prefix, tensors, s.kinds,
                      again=[s.check], cached=cached, constants=constants)
        if canonical(check.graph, check.weights, constants, input_names) != canonical(full.graph, full.weights,
                                                                                    constants, input_names):
            template = s.templates()[s.kinds[s.check]]
            raise StampError(f"layer {s.check} stamped from layer {template} differs from its trace ({s.prefix})")
        full = stamp(full.graph, full.weights, input_names, output_names, s.count, s.prefix, tensors, s.kinds,
                     cached=cached, constants=constants)
    from flora_graph.adapters import adapters_of
    from flora_graph.adapters.peft import peft_lora_layers

    adapters = {**adapters_of(module), **peft_lora_layers(module)}
    graph = convert_fx_graph(full.graph, full.weights, adapters, flat_dynamic_dims(dynamic_dims), name,
                             input_names=traced.input_names, output_names=output_names, share_weights=share_weights,
                             dim_max=traced.dim_max, constants=constants)
    graph.dim_max, graph.dim_min = traced.dim_max, traced.dim_min
    for node, new in zip(list(graph.inputs), input_names, strict=True):  # as capture names them
        graph.rename_input(node.name, new)
    return graph
