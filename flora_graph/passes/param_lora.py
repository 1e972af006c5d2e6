"""LoRA on a parameter, split into a base product and a low-rank branch (run by ``adapter-slots``).

A :class:`~flora_graph.adapters.param_lora.ParamLoRA` (LoRA on a mixture of experts' expert tensor, or on a 2-D
weight a module reads directly, as PEFT's ``target_parameters``) is captured as a weight expression::

    Wp = Add(W, Mul(MatMul(B, A), s))            # W [out, in], or [experts, out, in] (MatMul per expert)
    Wp = Add(W, Transpose(Mul(MatMul(B, A), s)))  # W [experts, in, out] (an experts module's is_transposed)

read by the layer's product. :func:`split_param_lora` rewrites each product on ``Wp`` into the product on ``W`` plus
a branch on the same input, tagged as capture tags a layer adapter's (``meta["module"]`` the parameter's path,
``"<owner>.<name>"``; roles ``base``, ``lora_down``, ``lora_up``, ``lora_scale``, ``lora_add``):

- ``Linear(x, Wp)`` becomes ``Add(Linear(x, W), Mul(Linear(Linear(x, A), B), s))``: a linear LoRA site;
- an expert product on gathered weights, ``Squeeze(MatMul(Gather(Wp, ids), Unsqueeze(x)))`` (either orientation,
  the forms of :mod:`~flora_graph.passes.group_experts`), becomes that product on ``W`` plus
  ``Mul(ExpertLinear(ExpertLinear(x, A, ids), B, ids), s)``: each (token, expert) pair's own expert's low-rank
  product, an expert LoRA site (:data:`~flora_graph.passes.lora_pattern.EXPERT_LORA`).

The merged ``[experts, out, in]`` weight is then never computed. A ``Wp`` read any other way is refused with
:class:`~flora_graph.errors.AdapterError` naming the parameter and its reader.
"""

from __future__ import annotations

import re

from flora_graph.errors import AdapterError
from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.passes.rewrite import schedule

__all__ = ["split_param_lora"]

_ORIGINAL = re.compile(r"(?:(?P<owner>.+)\.)?parametrizations\.(?P<name>[^.]+)\.original")
_FACTOR = re.compile(r"(?:(?P<owner>.+)\.)?parametrizations\.(?P<name>[^.]+)\.\d+\.lora_(?P<part>[AB])")


def _param(n: ComputationNode) -> str:
    return str(n.attrs.get("param", "")) if n.op is Op.CONST else ""


def _delta(n: ComputationNode) -> tuple[ComputationNode, ComputationNode, ComputationNode, bool] | None:
    """``(A, B, s, transposed)`` of ``Mul(MatMul(B, A), s)`` (or its ``Transpose`` of the last two axes)."""
    transposed = n.op is Op.TRANSPOSE and len(n.shape) == 3 and tuple(n.attrs.get("perm", ())) == (0, 2, 1)
    mul = n.inputs[0] if transposed else n
    if mul.op is not Op.MUL:
        return None
    for prod, s in (mul.inputs, mul.inputs[::-1]):
        if prod.op is Op.MATMUL and s.op is Op.CONST and all(d == 1 for d in s.shape) \
                and all(_FACTOR.fullmatch(_param(f)) for f in prod.inputs):
            b, a = prod.inputs
            if _FACTOR.fullmatch(_param(a))["part"] == "A" and _FACTOR.fullmatch(_param(b))["part"] == "B":
                return a, b, s, transposed
    return None


def _sites(graph: Graph) -> list[tuple[str, ComputationNode, ComputationNode, ComputationNode, ComputationNode, ComputationNode]]:
    """``(parameter path, Wp, W, A, B, s)`` of every parametrized weight expression."""
    found = []
    for n in graph.nodes:
        if n.op is not Op.ADD:
            continue
        for w, d in (n.inputs, n.inputs[::-1]):
            m = _ORIGINAL.fullmatch(_param(w))
            parts = _delta(d) if m else None
            if parts is not None:
                a, b, s, _ = parts
                found.append((f"{m['owner']}.{m['name']}" if m["owner"] else m["name"], n, w, a, b, s))
                break
    return found


def _tag(path: str, role: str) -> dict[str, str]:
    return {"module": path, "role": role}


def _split_linear(graph: Graph, path: str, user: ComputationNode, w, a, b, s) -> None:
    x = user.inputs[0]
    user.inputs = [x, w, *user.inputs[2:]]
    user.meta = {**user.meta, **_tag(path, "base")}
    down = graph.add(Op.LINEAR, [x, a], name=f"{path}.lora_down", meta=_tag(path, "lora_down"))
    up = graph.add(Op.LINEAR, [down, b], name=f"{path}.lora_up", meta=_tag(path, "lora_up"))
    scaled = graph.add(Op.MUL, [up, s], name=f"{path}.lora_scale", meta=_tag(path, "lora_scale"))
    add = graph.add(Op.ADD, [user, scaled], name=f"{path}.lora_add", meta=_tag(path, "lora_add"))
    graph.replace_all_uses(user, add)
    add.inputs[0] = user


def _expert_product(gather: ComputationNode, users: dict) -> tuple[ComputationNode, ComputationNode] | None:
    """``(x, Squeeze)`` of ``Squeeze(MatMul(Gather(Wp, ids), Unsqueeze(x, 2)), 2)`` or
    ``Squeeze(MatMul(Unsqueeze(x, 1), Gather(Wp, ids)), 1)``, ``gather`` read by that ``MatMul`` alone."""
    readers = users.get(gather, [])
    if gather.attrs.get("axis", 0) != 0 or len(readers) != 1 or readers[0].op is not Op.MATMUL:
        return None
    prod = readers[0]
    col = prod.inputs[1] if prod.inputs[0] is gather else prod.inputs[0]
    after = users.get(prod, [])
    if col.op is not Op.UNSQUEEZE or len(after) != 1 or after[0].op is not Op.SQUEEZE or len(col.inputs[0].shape) != 2:
        return None
    return col.inputs[0], after[0]


def _split_experts(graph: Graph, path: str, gather: ComputationNode, x, out, w, a, b, s) -> None:
    ids = gather.inputs[1]
    gather.inputs = [w, ids]
    out.meta = {**out.meta, **_tag(path, "base")}
    down = graph.add(Op.EXPERT_LINEAR, [x, a, ids], name=f"{path}.lora_down", meta=_tag(path, "lora_down"))
    up = graph.add(Op.EXPERT_LINEAR, [down, b, ids], name=f"{path}.lora_up", meta=_tag(path, "lora_up"))
    scaled = graph.add(Op.MUL, [up, s], name=f"{path}.lora_scale", meta=_tag(path, "lora_scale"))
    add = graph.add(Op.ADD, [out, scaled], name=f"{path}.lora_add", meta=_tag(path, "lora_add"))
    graph.replace_all_uses(out, add)
    add.inputs[0] = out


def split_param_lora(graph: Graph) -> list[str]:
    """Split every product on a parametrized weight (see the module doc) in place; returns the parameter paths.

    Raises :class:`AdapterError` naming the parameter when its weight is read other than by a ``Linear`` or a
    gathered expert product, checked before anything changes."""
    sites = _sites(graph)
    if not sites:
        return []
    users = graph.users()
    plans = []
    for path, wp, w, a, b, s in sites:
        readers = users.get(wp, [])
        if any(o is wp for o in graph.outputs.values()):
            raise AdapterError(f"parameter {path!r}: its adapted weight is a graph output; its LoRA cannot be a slot")
        for r in readers:
            if r.op is Op.LINEAR and r.inputs[1] is wp and r.inputs[0] is not wp and len(w.shape) == 2:
                plans.append(("linear", path, r, w, a, b, s))
                continue
            expert = _expert_product(r, users) if r.op is Op.GATHER and r.inputs[0] is wp and len(w.shape) == 3 else None
            if expert is None:
                raise AdapterError(f"parameter {path!r}: its adapted weight is read by {r.op.value} node {r.name!r}, not "
                                   "by a Linear or a mixture of experts' product on gathered weights; its LoRA cannot be "
                                   "a slot (bake it into the base model: --merge-adapter DIR)")
            plans.append(("experts", path, r, *expert, w, a, b, s))
    for kind, path, node, *rest in plans:
        if kind == "linear":
            _split_linear(graph, path, node, *rest)
        else:
            _split_experts(graph, path, node, *rest)
    schedule(graph)
    graph.remove_dead()
    return list(dict.fromkeys(p for _, p, *_ in plans))
