"""A readable text form of a graph, one line per node."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flora_graph.ir.ops import Op
from flora_graph.ir.shapes import format_shape

if TYPE_CHECKING:
    from flora_graph.ir.graph import Graph

__all__ = ["format_graph"]

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64", "int32": "i32", "bool": "bool"}


def _attr(v: Any) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(str(x) for x in v) + ")"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def format_graph(graph: Graph, *, meta: bool = True) -> str:
    """Text like ``%y = Linear(%x, %w, %b) : f32[batch, 16]   # adapter=default role=base``.

    An input with a default shows its shape: ``%fc.lora_A: f32[fc.rank, 64] = default[0, 64]``.
    """
    sig = ", ".join(f"%{n.name}: {_SHORT.get(n.dtype, n.dtype)}{format_shape(n.shape)}"
                    + (f" = default{format_shape(graph.input_defaults[n.name].shape)}" if n.name in graph.input_defaults else "")
                    for n in graph.inputs)
    lines = [f"graph {graph.name}({sig}) {{"]
    for n in graph.nodes:
        if n.op is Op.INPUT:
            continue
        ty = f"{_SHORT.get(n.dtype, n.dtype)}{format_shape(n.shape)}"
        if n.op is Op.CONST:
            body = f"Const[{n.attrs['param']}]"
        else:
            attrs = ", ".join(f"{k}={_attr(v)}" for k, v in n.attrs.items())
            args = ", ".join(f"%{i.name}" for i in n.inputs)
            body = f"{n.op.value}{'[' + attrs + ']' if attrs else ''}({args})"
        line = f"  %{n.name} = {body} : {ty}"
        if meta and n.meta:
            line += "   # " + " ".join(f"{k}={v}" for k, v in sorted(n.meta.items()))
        lines.append(line)
    outs = ", ".join(f"{k}: %{v.name}" for k, v in graph.outputs.items())
    lines.append(f"  return {{{outs}}}")
    lines.append("}")
    return "\n".join(lines)
