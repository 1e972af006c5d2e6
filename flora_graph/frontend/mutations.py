"""In-place ops that capture converts as their functional form, without retracing the program.

torch.export keeps in-place ops (``add_``, ``masked_fill_``, ``index_put_``) on the tensors a model
computes. Functionalizing them with ``run_decompositions({})`` retraces the whole program (5-10 s of
CPU for T5, DeBERTa-v2 or Falcon). An in-place op needs no retrace when it writes a tensor that:

- the model computed (not an input, a weight or a buffer: that write outlives the call), or made as a constant
  during the call (``torch.tensor(0)`` in a cache layer's ``__init__``: torch.export lifts it as a constant, and
  refuses a write into a constant the module holds), seen through ops that change autograd metadata only
  (``detach_``);
- is nobody's view and has no view taken of it (a write through a view, or seen through one,
  reaches memory the op's result does not stand for), or is a static slice or select of such a tensor
  (``k[..., :d].copy_(k_nope)``, as latent attention fills its keys; ``ids[:, 0] = start_id``, as BART shifts its
  decoder's tokens; ``t = freq[0]; t[..., 1::3] = ...``, as Qwen3.5 lays out its rotary frequencies:
  :func:`sliced_base`), written as a ``slice_scatter`` / ``select_scatter`` into it and into each cut on the way,
  where no other view of any of them taken before the write is read after; or is a view of views of such a tensor
  that nothing else reads (:func:`_private_view_chain`: DeBERTa's ``pos_query_layer /= scale``);
- keeps its dtype under the functional op (no float scalar added in place to an int tensor).

Such an op is its functional twin (``add_.Tensor`` -> ``add.Tensor``) whose result replaces the
written tensor for every later reader: :func:`plan` finds them, capture converts them so, and
retraces only when some other in-place op remains.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable
from typing import Any, NamedTuple

import torch

__all__ = ["AUTOGRAD_ONLY", "Cut", "functional_of", "plan", "sliced_base", "written_root"]

AUTOGRAD_ONLY = frozenset({torch.ops.aten.detach_.default})
"""In-place ops that change autograd metadata only, never a value: converted as the identity, and no
reason to functionalize (transformers' caches ``detach_`` their tensors: a 4-layer Llama with its cache
captured 3x slower when they sent it through ``run_decompositions``)."""


def _mutable(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable and target not in AUTOGRAD_ONLY


def functional_of(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The functional twin of an in-place overload writing its first argument only
    (``aten.add_.Tensor`` -> ``aten.add.Tensor``), or ``None``."""
    args = op._schema.arguments
    if not op._schema.name.startswith("aten::") or not args or args[0].alias_info is None \
            or not args[0].alias_info.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in args[1:]):
        return None
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    if not isinstance(twin, torch._ops.OpOverload) or twin._schema.is_mutable:
        return None
    return twin


def _is_view(n: torch.fx.Node) -> bool:
    """Whether ``n``'s result may alias an input (``view``, ``slice``, ``transpose``, an in-place op's
    return, an item of ``split``'s list; ``to`` unless it changes the dtype, which makes a copy).
    A call that is not an ATen overload counts as a view, except an item of a fresh result."""
    t = n.target
    if n.op != "call_function":
        return False
    if t is operator.getitem:
        return not isinstance(n.args[0], torch.fx.Node) or _is_view(n.args[0])
    if not isinstance(t, torch._ops.OpOverload):
        return True
    if not any(r.alias_info is not None for r in t._schema.returns):
        return False
    if t.overloadpacket is torch.ops.aten.to and n.args and isinstance(n.args[0], torch.fx.Node):
        return _dtype(n.args[0]) is None or _dtype(n.args[0]) == _dtype(n)
    return True


def _dtype(v: Any) -> Any:
    val = v.meta.get("val") if isinstance(v, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _keeps_dtype(n: torch.fx.Node, dtype: torch.dtype) -> bool:
    """Whether the functional twin of ``n`` keeps ``dtype``: no operand promotes it (a bool mask does not)."""
    for a in [*n.args[1:], *n.kwargs.values()]:
        if isinstance(a, torch.fx.Node):
            if _dtype(a) is not None and torch.promote_types(dtype, _dtype(a)) != dtype:
                return False
        elif isinstance(a, float) and not dtype.is_floating_point:
            return False
    return True


def _private_view_chain(written: Any, safe: Collection[torch.fx.Node], constants: Collection[str]) -> bool:
    """Whether ``written`` is a view of a view ... of a tensor the call made, through plain view ops (``view``,
    ``permute``, ``transpose``; not an in-place op's return), each of those tensors read by the next view alone: a
    write into ``written`` then reaches no value but its own (DeBERTa's ``pos_query_layer /= scale`` of its
    heads, ``view`` then ``permute`` of a projection)."""
    v = written
    while True:
        t = v.target if isinstance(v, torch.fx.Node) and v.op == "call_function" else None
        if not (isinstance(t, torch._ops.OpOverload) and _is_view(v) and not t._schema.is_mutable and v.args
                and isinstance(v.args[0], torch.fx.Node) and t not in AUTOGRAD_ONLY):
            return False
        parent = v.args[0]
        if set(parent.users) != {v}:
            return False
        if parent.op == "placeholder":
            return parent.name in constants
        if parent.op == "call_function" and (parent in safe or not _is_view(parent)):
            return True
        v = parent


def _private_alias(v: torch.fx.Node, write: torch.fx.Node, order: dict[torch.fx.Node, int],
                   safe: Collection[torch.fx.Node]) -> bool:
    """Whether ``v`` is a ``to`` in the dtype it has (an alias) of a tensor the call made, which nothing reads
    after ``write`` and of which no other view is taken: writing ``v`` then changes what ``v``'s readers see
    alone (transformers' recurrent layers copy their new state into ``state.to(dtype)`` of their cloned cache)."""
    if not (v.op == "call_function" and isinstance(v.target, torch._ops.OpOverload)
            and v.target.overloadpacket is torch.ops.aten.to and _is_view(v) and v.args
            and not v.kwargs.get("copy", False) and v.kwargs.get("memory_format") in (None, torch.preserve_format)):
        return False
    base = v.args[0]
    if not (isinstance(base, torch.fx.Node) and base.op == "call_function" and (base in safe or not _is_view(base))):
        return False
    at = order[write]
    return all(u is v or (order.get(u, at + 1) < at and not _is_view(u)) for u in base.users)


def written_root(n: Any) -> Any:
    """``n`` seen through the :data:`AUTOGRAD_ONLY` ops that return their input (``x.detach_()`` is ``x``)."""
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in AUTOGRAD_ONLY and n.args:
        n = n.args[0]
    return n


class Cut(NamedTuple):
    """One view of :func:`sliced_base`'s chain: ``node`` is ``input[..., start:end:step]`` along ``dim``, or
    where ``select``, ``input.select(dim, start)`` (that one place, the axis dropped). A slice's bounds may be sizes
    the program reads (``x[..., :seq]``: the node of that size)."""

    node: torch.fx.Node
    dim: int
    start: int | torch.fx.Node
    end: int | torch.fx.Node | None
    step: int
    select: bool = False


def _cut_args(n: Any) -> tuple[torch.fx.Node, Cut] | None:
    """``(input, its cut)`` of an ``aten.slice.Tensor`` node at bounds that are numbers or sizes (step 1 for a size) or
    an ``aten.select.int`` node at a static index, else ``None``."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return None
    if n.target is torch.ops.aten.select.int:
        base, dim, index = n.args
        if not isinstance(base, torch.fx.Node) or not isinstance(dim, int) or not isinstance(index, int):
            return None
        return base, Cut(n, dim, index, None, 1, select=True)
    if n.target is not torch.ops.aten.slice.Tensor:
        return None
    base, dim, start, end, step = (list(n.args) + [0, None, None, 1][len(n.args) - 1:])[:5]
    if not isinstance(base, torch.fx.Node) or not isinstance(dim, int) or not (isinstance(step, int) or step is None) \
            or not all(isinstance(v, int) or v is None or (_is_size(v) and (step or 1) == 1) for v in (start, end)):
        return None
    return base, Cut(n, int(dim), start or 0, end, step or 1)


def _is_size(v: Any) -> bool:
    """Whether ``v`` is a node whose value is a size (a ``SymInt``: ``x.shape[-1]``)."""
    return isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.SymInt)


def sliced_base(n: Any) -> tuple[torch.fx.Node, list[Cut]] | None:
    """Where ``n`` is a static slice or select of a static slice ... of a tensor (``h[:, :5]`` is two slices,
    ``ids[:, 0]`` a select): ``(that tensor, [cut, ...])`` from the tensor's cut to ``n``; else ``None``. A cut on
    the way may have other readers (``t = freq[0]`` written slice by slice): a write updates it too."""
    cuts = []
    while (args := _cut_args(n)) is not None:
        n, cut = args
        cuts.append(cut)
    return (n, cuts[::-1]) if cuts else None


def _stale_views(base: torch.fx.Node, write: torch.fx.Node, order: dict[torch.fx.Node, int],
                 chain: Collection[torch.fx.Node] = ()) -> bool:
    """Whether a view of ``base`` taken before ``write``, or a view of that view, is read after it (it would see the
    write); the views in ``chain`` (those a write into a slice was cut through, which the write updates) aside."""
    at = order[write]
    views = [v for v in base.users if v is not write and v not in chain and _is_view(v)
             and v.target not in AUTOGRAD_ONLY and order.get(v, at + 1) < at]
    while views:
        v = views.pop()
        for u in v.users:
            if _is_view(u) and u.target not in AUTOGRAD_ONLY and order.get(u, at + 1) < at:
                views.append(u)  # a view of the view, taken before too: its readers count
            elif order.get(u, at + 1) > at:
                return True
    return False


def plan(fx_nodes: Iterable[torch.fx.Node], converters: Any,
         constants: Collection[str] = ()) -> tuple[dict[torch.fx.Node, Any], list[torch.fx.Node]]:
    """The in-place nodes of ``fx_nodes`` to convert as their functional twin (``{node: twin}``, the
    twin having a converter in ``converters``), and the in-place nodes that need a retrace. ``constants``: the
    placeholders of the constants torch.export lifted from tensors the call made, which a write may take."""
    nodes = list(fx_nodes)
    order = {n: i for i, n in enumerate(nodes)}
    safe: dict[torch.fx.Node, Any] = {}
    unsafe: list[torch.fx.Node] = []
    for n in nodes:
        if n.op != "call_function" or not _mutable(n.target):
            continue
        twin = functional_of(n.target)
        written = n.args[0] if n.args else None
        root = written_root(written)
        fresh = isinstance(root, torch.fx.Node) and (
            (root.op == "call_function" and (root in safe or not _is_view(root)))
            or (root.op == "placeholder" and root.name in constants)
            or _private_alias(root, n, order, safe))
        # a view of the tensor taken before the write and read after it would see the write: refused
        ok = (twin is not None and twin in converters and fresh
              and _dtype(written) is not None and _keeps_dtype(n, _dtype(written))
              and not any(_stale_views(v, n, order) for v in {root, written}))
        if not ok and twin is not None and twin in converters and (cut := sliced_base(written)) is not None:
            base = written_root(cut[0])  # a slice of a tensor the call made: scattered back into it
            chain = {base, cut[0], *(c.node for c in cut[1])}  # what the write updates
            ok = (isinstance(base, torch.fx.Node) and set(written.users) == {n}
                  and ((base.op == "call_function" and (base in safe or not _is_view(base)))
                       or (base.op == "placeholder" and base.name in constants))
                  and _dtype(written) is not None and _keeps_dtype(n, _dtype(written))
                  and not any(_stale_views(b, n, order, chain) for b in chain))
        if not ok and twin is not None and twin in converters and _private_view_chain(written, safe, constants):
            ok = (_dtype(written) is not None and _keeps_dtype(n, _dtype(written))
                  and not _stale_views(written, n, order))
        if ok:
            safe[n] = twin
        else:
            unsafe.append(n)
    return safe, unsafe
