"""cse: Replaces structurally equal nodes (op + attributes + inputs) with one of them.

``Const`` nodes reading the same param merge, and so do params with identical dtype,
shape and bytes (except with ``swappable=True``, where every weight stays its own so an
adapter can be swapped). The first node in graph order survives, with its tags.
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


def _param_key(arr: np.ndarray) -> tuple[Any, ...]:
    return str(arr.dtype), tuple(arr.shape), hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).digest()


@register_pass("cse")
def cse(graph: Graph, *, swappable: bool = False) -> PassResult:
    """Merge duplicate nodes and byte-identical params; stats ``merged_nodes``, ``merged_params``."""
    t0 = time.perf_counter()
    ctx = RewriteContext(graph)
    rep: dict[ComputationNode, ComputationNode] = {}
    seen: dict[tuple[Any, ...], ComputationNode] = {}
    canonical: dict[str, str] = {}  # param -> the first param with the same bytes
    by_bytes: dict[tuple[Any, ...], str] = {}
    refused: dict[str, str] = {}
    for n in graph.nodes:
        if n.op is Op.INPUT:
            continue
        if n.op is Op.CONST:
            param = n.attrs["param"]
            if param not in canonical:
                arr = graph.params[param]
                first = by_bytes.setdefault(_param_key(arr), param)
                same = first == param or graph.params[first].tobytes() == arr.tobytes()
                canonical[param] = param if swappable or not same else first
                if swappable and first != param and same:
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
