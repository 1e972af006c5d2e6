"""What a model returns, as the compiler sees it: tensors only, in a fixed order, no key/value cache.

Hugging Face models return a ``ModelOutput`` (a dict-like dataclass: ``logits``, then
``past_key_values`` or ``cache`` when ``config.use_cache`` is on, ...) and a causal LM with
``use_cache`` on returns a ``DynamicCache`` that ``torch.export`` cannot trace. Every place
that captures a model or compares a captured graph with its eager model goes through this
module, so that both see the same outputs:

* :func:`no_kv_cache` turns ``use_cache`` off on every config in the model while it runs
  (:func:`~flora_graph.frontend.capture` wraps ``torch.export`` in it);
* :func:`set_use_cache` does so for good (a loaded model kept for export and its checks);
* :func:`output_tensors` flattens an eager output (tensor, tuple, list, dict, ``ModelOutput``)
  into its tensors in the order the captured graph lists its outputs;
* :func:`max_abs_diff` compares a compiled graph's outputs with them, all of them, in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flora_graph.errors import FloraGraphError

__all__ = ["leaf_keys", "max_abs_diff", "no_kv_cache", "output_names", "output_tensors", "set_use_cache"]


def _cache_configs(model: nn.Module) -> list[Any]:
    """Every distinct config object of ``model`` and its submodules that has a ``use_cache`` flag."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return list(seen.values())


def set_use_cache(model: nn.Module, value: bool) -> list[tuple[Any, Any]]:
    """Set ``use_cache`` on every config of ``model``; return ``[(config, previous value)]`` to undo it."""
    changed = []
    for cfg in _cache_configs(model):
        changed.append((cfg, cfg.use_cache))
        cfg.use_cache = value
    return changed


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """While inside: ``use_cache=False`` on every config of ``model`` (outputs without a key/value cache)."""
    changed = set_use_cache(model, False)
    try:
        yield
    finally:
        for cfg, was in changed:
            cfg.use_cache = was


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output, flattened in ``torch.export``'s order (the graph's outputs' order).

    Containers are flattened with torch's pytree (tuples, lists, dicts, ``ModelOutput``, which
    holds only its non-``None`` fields); leaves that are not tensors (a cache object, ``None``,
    a number) are left out. Raises :class:`FloraGraphError` when no tensor is left.
    """
    import torch.utils._pytree as pytree

    tensors = [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise FloraGraphError(f"model output of type {type(out).__name__} holds no tensor")
    return tensors


def output_names(out: Any, inputs: Collection[str] = ()) -> list[str]:
    """Names for :func:`output_tensors`' tensors, as Hugging Face names them: a ``ModelOutput``'s field
    (``logits``, ``last_hidden_state``, ``pooler_output``), ``field.i`` inside a tuple field, ``output_i``
    for a plain tuple's items (``output`` for a lone tensor).

    A name that is one of the model's ``inputs`` (a diffusers UNet takes ``sample`` and returns ``sample``)
    is prefixed ``out_`` until it is not (``out_sample``, the name Optimum gives that output): one ONNX
    graph cannot hold two values of one name."""
    leaves = [(keys, leaf) for keys, leaf in leaf_keys(out) if isinstance(leaf, torch.Tensor)]
    if len(leaves) == 1 and not leaves[0][0]:
        names = ["output"]
    else:
        names = [".".join(keys) if keys and not keys[0].isdigit() else "output_" + "_".join(keys) for keys, _ in leaves]
    taken = set(inputs)
    for i, name in enumerate(names):
        while name in taken:
            name = "out_" + name
        names[i] = name
        taken.add(name)
    return names


def leaf_keys(value: Any) -> list[tuple[list[str], Any]]:
    """``(keys, leaf)`` for every leaf of ``value`` in torch's pytree order: a dict key, a sequence index
    or an attribute name per level, as strings.

    Types registered with torch's pytree without a key function (diffusers' ``BaseOutput``, whose
    ``tree_flatten_with_path`` raises) are named from their flattening: the keys it keeps for a
    dict-like type, else each child's index."""
    import torch.utils._pytree as pytree

    try:
        return [([str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path], leaf)
                for path, leaf in pytree.tree_flatten_with_path(value)[0]]
    except ValueError:  # a node type without flatten_with_keys_fn
        pass
    leaves, spec = pytree.tree_flatten(value)
    out: list[tuple[list[str], Any]] = []

    def walk(node: Any, keys: list[str]) -> None:
        if node.is_leaf():
            out.append((keys, leaves[len(out)]))
            return
        context, children = node.context, node.children()
        named = isinstance(context, list | tuple) and len(context) == len(children)
        for i, child in enumerate(children):
            walk(child, [*keys, str(context[i]) if named else str(i)])

    walk(spec, [])
    return out


def max_abs_diff(got: Mapping[str, np.ndarray], want: Sequence[torch.Tensor]) -> float:
    """Largest ``|got - want|`` over a compiled graph's outputs (in order) and the eager tensors
    (:func:`output_tensors`): ``inf`` when their counts or shapes differ, ``nan`` when either side
    holds a NaN, so that ``diff <= tolerance`` fails in both cases. Equal infinities (a masked logit's ``-inf`` on
    both sides) differ by 0."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got.values(), want, strict=True):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            return float("inf")
        if g.size:
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            with np.errstate(invalid="ignore"):  # inf - inf: NaN, then 0 where the two are the same infinity
                d = float(np.max(np.where(g64 == w64, 0.0, np.abs(g64 - w64))))
            if d != d:  # NaN: it must not be lost to max()
                return d
            worst = max(worst, d)
    return worst
