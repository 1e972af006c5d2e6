"""ATen ops that emit nothing: aliases, eval-mode dropout and tuple unpacking.

``clone``, ``detach``, ``alias``, ``contiguous`` and ``dropout`` (its feature and alpha forms too; eval mode, or ``p == 0``)
return their input unchanged; ``native_dropout`` there returns it with a mask of ones; either
in training mode is refused (it draws random numbers). ``operator.getitem``
picks one value of a tuple-valued node (``split``, ``unbind``, attention kernels).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flora_graph.errors import GraphError, UnsupportedOpError
from flora_graph.frontend.aten.registry import register
from flora_graph.ir import ComputationNode, Op

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__: list[str] = []

aten = torch.ops.aten


def _alias(ctx: CaptureContext, x: ComputationNode, *_: Any, **__: Any) -> ComputationNode:
    return x


register(aten.clone.default, aten.detach.default, aten.alias.default, aten.contiguous.default,
         aten.detach_.default)(_alias)  # detach_ changes autograd metadata only: the same value


@register(aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
          aten.feature_alpha_dropout.default)
def _dropout(ctx: CaptureContext, x: ComputationNode, p: float = 0.5, train: bool = False) -> ComputationNode:
    """``dropout`` and its channel-wise (``Dropout2d``: ``feature_dropout``) and alpha forms: ``x`` in eval mode."""
    if train and p > 0:
        name = str(ctx.fx_node.target).removeprefix("aten.")
        raise UnsupportedOpError("dropout in training mode cannot be captured; call model.eval()",
                                 {f"aten.{name}(train=True)": [ctx.where()]})
    return x


@register(aten.native_dropout.default)
def _native_dropout(ctx: CaptureContext, x: ComputationNode, p: float,
                    train: bool | None) -> tuple[ComputationNode, ComputationNode]:
    """``(x, ones)`` when nothing is dropped: ``train=False`` or ``p == 0`` (``train=None`` trains, as torch)."""
    if (train is None or train) and p > 0:
        raise UnsupportedOpError("native_dropout in training mode cannot be captured; call model.eval()",
                                 {"aten.native_dropout.default(train=True)": [ctx.where()]})
    mask = ctx.emit(Op.EXPAND, [ctx.new_param(f"{ctx.fx_node.name}_keep", np.asarray(True))], {"shape": tuple(x.shape)})
    return x, mask


@register(operator.getitem)
def _getitem(ctx, seq, index):
    if not isinstance(seq, tuple):
        raise GraphError(f"{ctx.where()}: getitem on a non-tuple value")
    return seq[index]
