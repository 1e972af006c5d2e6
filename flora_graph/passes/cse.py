"""cse: Replaces structurally equal nodes (op + attributes + inputs) with one of them.

``Const`` nodes reading the same param merge, and so do params with identical dtype,
shape and bytes (except with ``swappable=True``, where every weight stays its own so an
adapter can be swapped). The first node in graph order survives, with its tags. Adapter
slots never merge: each reads weight inputs of its own, and graph inputs are never merged.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.passes.base import PassResult, register_pass
from flora_graph.passes.rewrite import RewriteContext

__all__ = ["cse"]


_SAMPLE = 256  # values hashed per weight: enough to tell trained weights apart, cheap on any size


def _param_key(arr: np.ndarray) -> tuple[Any, ...]:
    """dtype, shape and a hash of up to :data:`_SAMPLE` evenly spaced values: equal weights have equal
    keys; weights with equal keys are compared in full by :func:`_same_bytes` (no weight is hashed whole)."""
    idx = np.unique(np.linspace(0, arr.size - 1, min(arr.size, _SAMPLE)).astype(np.int64))
    sample = np.ascontiguousarray(arr.flat[idx]) if arr.size else arr.reshape(-1)
    return str(arr.dtype), tuple(arr.shape), hashlib.blake2b(sample.tobytes(), digest_size=16).digest()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of two arrays of one dtype and shape (NaN payloads and -0.0 count), no copies."""
    if a is b or (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides):
        return True
    if a.dtype.hasobject:
        return a.tobytes() == b.tobytes()
    bits = np.dtype(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else None
    if bits is None:
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(np.ascontiguousarray(a).view(bits), np.ascontiguousarray(b).view(bits)))


@register_pass("cse")
def cse(graph: Graph, *, swappable: bool = False) -> PassResult:
    """Merge duplicate nodes and byte-identical params; stats ``merged_nodes``, ``merged_params``."""
    t0 = time.perf_counter()
    ctx = RewriteContext(graph)
    rep: dict[ComputationNode, ComputationNode] = {}
    seen: dict[tuple[Any, ...], ComputationNode] = {}
    canonical: dict[str, str] = {}  # param -> the first param with the same bytes
    by_key: dict[tuple[Any, ...], list[str]] = {}
    refused: dict[str, str] = {}
    for n in graph.nodes:
        if n.op is Op.INPUT:
            continue
        if n.op is Op.CONST:
            param = n.attrs["param"]
            if param not in canonical:
                arr = graph.params[param]
                found = by_key.setdefault(_param_key(arr), [])
                first = next((p for p in found if _same_bytes(graph.params[p], arr)), None)
                if first is None:
                    found.append(param)
                canonical[param] = param if swappable or first is None else first
                if swappable and first is not None:
                    refused[n.name] = f"cse: param {param!r} equals {first!r} but swappable keeps weights separate"
            key: tuple[Any, ...] = (Op.CONST, canonical[param])
        else:
            key = (n.op, tuple(sorted(n.attrs.items())), tuple(id(rep.get(i, i)) for i in n.inputs))
        if key in seen:
            rep[n] = seen[key]
            ctx.replace(n, seen[key])
        else:
            seen[key] = n
    params = len(graph.params)
    changed = ctx.commit()
    stats = {"fired": {"cse": len(rep)} if rep else {}, "refused": refused, "merged_nodes": len(rep),
             "merged_params": params - len(graph.params), "time_s": time.perf_counter() - t0}
    return PassResult(graph, changed, stats)
