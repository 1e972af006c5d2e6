"""ATen ops that emit nothing: aliases, eval-mode dropout and tuple unpacking.

``clone``, ``detach``, ``alias``, ``contiguous`` and ``dropout`` (eval mode, or ``p == 0``)
return their input unchanged; ``dropout`` in training mode is refused. ``operator.getitem``
picks one value of a tuple-valued node (``split``, ``unbind``, attention kernels).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch

from flora_graph.errors import GraphError, UnsupportedOpError
from flora_graph.frontend.aten.registry import register
from flora_graph.ir import ComputationNode

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten


def _alias(ctx: CaptureContext, x: ComputationNode, *_: Any, **__: Any) -> ComputationNode:
    return x


register(aten.clone.default, aten.detach.default, aten.alias.default, aten.contiguous.default)(_alias)


@register(aten.dropout.default)
def _dropout(ctx: CaptureContext, x: ComputationNode, p: float = 0.5, train: bool = False) -> ComputationNode:
    if train and p > 0:
        raise UnsupportedOpError("dropout in training mode cannot be captured; call model.eval()", {"aten.dropout.default(train=True)": [ctx.where()]})
    return x


@register(operator.getitem)
def _getitem(ctx, seq, index):
    if not isinstance(seq, tuple):
        raise GraphError(f"{ctx.where()}: getitem on a non-tuple value")
    return seq[index]
