"""``ComputationNode``: one value of the graph, produced by one op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flora_graph.ir.ops import Op
from flora_graph.ir.shapes import Shape, format_shape

__all__ = ["ComputationNode"]


@dataclass(eq=False)
class ComputationNode:
    """A node of the IR.

    ``inputs`` are other nodes of the same graph; ``attrs`` is a plain dict of ints,
    floats, strings and tuples, validated against the op's schema; ``shape`` holds ints
    and dim names; ``meta`` is free-form (``adapter``, ``role``, ``module`` tags).

    Nodes compare by identity; :meth:`key` gives the structural key used by CSE and by
    structural equality (op, attributes, inputs), in which every attribute takes part.
    """

    name: str
    op: Op
    inputs: list[ComputationNode] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    shape: Shape = ()
    dtype: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        """Structural identity: op, sorted attributes and the identities of the inputs."""
        return (self.op, tuple(sorted(self.attrs.items())), tuple(id(i) for i in self.inputs))

    def __repr__(self) -> str:
        args = ", ".join(f"%{i.name}" for i in self.inputs)
        return f"%{self.name} = {self.op.value}({args}) : {self.dtype}{format_shape(self.shape)}"

    __hash__ = object.__hash__
