"""The one registration mechanism: :func:`define` declares an op with everything it needs.

An op is declared once, in its family module, with

* its schema: arity, attributes, the shape/dtype rule and a one-line doc
  (registered in :data:`flora_graph.ir.ops.SCHEMAS`, so graphs can be built and verified);
* ``numpy``: ``impl(*arrays, **attrs) -> ndarray``, the executable definition every backend
  is tested against (attributes of kind ``"dim"``/``"dims"`` arrive resolved to ints;
  16-bit floats arrive widened to float32 and the caller rounds the result to the node's dtype);
* ``onnx``: ``lower(ctx, node, out)``, which appends through ``ctx`` (the ONNX driver's
  :class:`~flora_graph.runtimes.onnx_lowering.LoweringContext`) the ONNX nodes computing
  ``node`` into the value named ``out``;
* ``torch``: ``lower(node, args) -> str``, the Python source of an expression computing
  ``node`` from the expressions ``args`` of its inputs, with torch ops only (the torch code
  generator writes one line per node).

The backends look rules up in :data:`OPS`; nothing else registers an op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flora_graph.ir.ops import AttrSpec, InferFn, Op, OpSchema, register_op

if TYPE_CHECKING:
    from flora_graph.ir.node import ComputationNode

__all__ = ["OPS", "NumpyImpl", "OnnxRule", "OpDef", "TorchRule", "define", "op_def"]

NumpyImpl = Callable[..., np.ndarray]
OnnxRule = Callable[[Any, "ComputationNode", str], None]
TorchRule = Callable[["ComputationNode", list[str]], str]


@dataclass(frozen=True)
class OpDef:
    """An op with its schema and its three rules."""

    op: Op
    schema: OpSchema
    numpy: NumpyImpl
    onnx: OnnxRule
    torch: TorchRule
    family: str  # the module that declares it, e.g. "linear"
    torch_source: str = ""  # module-level functions the torch rule's expressions call (put before forward)


OPS: dict[Op, OpDef] = {}
"""Every non-leaf op with its rules, by op."""


def define(
    name: str,
    value: str,
    inputs: tuple[int, int | None],
    attrs: dict[str, AttrSpec] | None = None,
    *,
    infer: InferFn,
    doc: str,
    numpy: NumpyImpl,
    onnx: OnnxRule,
    torch: TorchRule,
    groups: Iterable[str] = (),
    family: str | None = None,
    torch_source: str = "",
) -> Op:
    """Declare op ``Op.<name>`` (``value`` in text and JSON) with ``inputs`` = ``(min, max)``
    (``max`` ``None``: variadic), its attribute specs, shape rule, doc, rules and groups.

    ``family`` defaults to the last component of the calling module's name. ``torch_source`` is
    Python source of module-level functions the torch rule's expressions call (a loop, which
    one expression cannot hold), written once into each generated module that uses the op;
    their names start with ``_flora_``. Returns the op.
    """
    if family is None:
        import inspect

        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        family = str(caller.f_globals.get("__name__", "?")).rsplit(".", 1)[-1] if caller is not None else "?"
    for rule, what in ((numpy, "numpy"), (onnx, "onnx"), (torch, "torch")):
        if not callable(rule):
            raise TypeError(f"op {value!r}: the {what} rule must be callable, got {rule!r}")
    sch = register_op(name, value, inputs[0], inputs[1], attrs, infer, doc, groups)
    OPS[sch.op] = OpDef(sch.op, sch, numpy, onnx, torch, family, torch_source)
    return sch.op


def op_def(op: Op) -> OpDef:
    """The definition of non-leaf ``op`` (``KeyError`` for a leaf)."""
    return OPS[op]
