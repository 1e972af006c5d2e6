"""``canonicalize``: AOT autograd's decomposed ATen folded back into the capture table's ops.

AOT autograd hands over graphs in decomposed ATen: ``F.linear`` arrives as ``t`` + ``addmm``
(or ``mm``), wrapped in reshapes on a 3-D+ input; ``layer_norm`` as ``native_layer_norm`` +
``getitem``. Rewritten back to ``aten.linear`` / ``aten.layer_norm`` on the original input,
the IR sees ``Linear`` nodes reading the adapter's input directly, and the LoRA passes
recognise adapters exactly as they do in exported graphs.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

__all__ = ["canonicalize"]

aten = torch.ops.aten


def _is_transpose_2d(n: Any) -> bool:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return False
    if n.target is aten.t.default:
        return True
    if n.target is aten.permute.default:
        return list(n.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    if n.target is aten.transpose.int:
        return sorted(d % 2 for d in n.args[1:3]) == [0, 1]
    return False


def _rank(n: Any) -> int | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _replace(g: fx.Graph, old: fx.Node, target: Any, args: tuple) -> fx.Node:
    with g.inserting_before(old):
        new = g.call_function(target, args)
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    g.erase_node(old)
    return new


def canonicalize(gm: fx.GraphModule) -> int:
    """Fold AOT autograd's decompositions back into table ops; return the number of rewrites.

    - ``mm(x, t(W))`` -> ``linear(x, W)``; ``addmm(b, x, t(W))`` with 1-D ``b`` -> ``linear(x, W, b)``;
      any other ``addmm(c, x, y)`` -> ``add(mm(x, y), c)``.
    - ``native_layer_norm(x, shape, w, b, eps)`` whose only used result is ``[0]`` -> ``layer_norm``.
    - the reshapes around a linear on a 3-D+ input disappear (:func:`_unflatten_linears`).
    """
    g, count = gm.graph, 0
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target is aten.addmm.default:
            bias, x, w = n.args[:3]
            if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
                continue
            if _is_transpose_2d(w) and _rank(bias) == 1:
                _replace(g, n, aten.linear.default, (x, w.args[0], bias))
            else:
                with g.inserting_before(n):
                    mm = (g.call_function(aten.linear.default, (x, w.args[0])) if _is_transpose_2d(w)
                          else g.call_function(aten.mm.default, (x, w)))
                mm.meta = dict(n.meta)
                _replace(g, n, aten.add.Tensor, (mm, bias))
            count += 1
        elif n.target is aten.mm.default and _is_transpose_2d(n.args[1]):
            _replace(g, n, aten.linear.default, (n.args[0], n.args[1].args[0]))
            count += 1
        elif n.target is aten.native_layer_norm.default:
            users = list(n.users)
            if not all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in users):
                continue
            main = [u for u in users if u.args[1] == 0]
            for u in users:
                if u not in main:
                    g.erase_node(u)
            x, shape, w, b, eps = n.args[:5]
            with g.inserting_before(n):
                ln = g.call_function(aten.layer_norm.default, (x, shape, w, b, eps))
            ln.meta = dict(main[0].meta) if main else {}
            for u in main:
                u.replace_all_uses_with(ln)
                g.erase_node(u)
            g.erase_node(n)
            count += 1
    count += _unflatten_linears(g)
    g.eliminate_dead_code()
    gm.recompile()
    return count


_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})


def _same_dims(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Equal sizes, symbolic ones compared as expressions (no guard is added)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        ex = x.node.expr if isinstance(x, torch.SymInt) else x
        ey = y.node.expr if isinstance(y, torch.SymInt) else y
        if isinstance(ex, int) != isinstance(ey, int) or ex != ey:
            return False
    return True


def _unflatten_linears(g: fx.Graph) -> int:
    """``view(linear(view(x, [prod(lead), K]), W, b), [*lead, N])`` -> ``linear(x, W, b)``.

    AOT autograd flattens the leading dims around every ``F.linear`` on a 3-D+ input; kept,
    those reshapes would sit between an adapter's branches and hide the LoRA pattern (and
    with two symbolic leading dims the IR cannot express them).
    """
    count = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not aten.linear.default or len(n.users) != 1:
            continue
        inner, outer = n.args[0], next(iter(n.users))
        if not (isinstance(inner, fx.Node) and inner.target in _VIEWS and outer.target in _VIEWS):
            continue
        x = inner.args[0]
        xv, iv, ov = (v.meta.get("val") if isinstance(v, fx.Node) else None for v in (x, inner, outer))
        if not all(isinstance(v, torch.Tensor) for v in (xv, iv, ov)) or xv.dim() < 3 or iv.dim() != 2:
            continue
        if not (_same_dims(xv.shape[-1:], iv.shape[-1:]) and _same_dims(xv.shape[:-1], ov.shape[:-1])):
            continue
        with g.inserting_before(outer):
            new = g.call_function(aten.linear.default, (x, *n.args[1:]))
        new.meta = dict(outer.meta)
        outer.replace_all_uses_with(new)
        g.erase_node(outer)
        g.erase_node(n)
        if not inner.users:
            g.erase_node(inner)
        count += 1
    return count
