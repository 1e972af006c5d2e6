"""The ATen ops capture refuses on purpose, each with its reason: the one refusal list.

Every op of PyTorch's Core ATen opset (the overloads tagged ``torch.Tag.core``) has a converter
in :data:`~flora_graph.frontend.aten.registry.ATEN_TABLE`, is a size read capture turns into a
dim (:data:`~flora_graph.frontend.aten.registry.SIZE_OPS`), or belongs to one entry of
:data:`REFUSED` (``tests/ops/test_core_aten.py`` checks it against torch's own list, and that
:data:`REFUSED` has at most ten entries). A refused op has no converter, so capture raises
:class:`~flora_graph.errors.UnsupportedOpError` naming it and the module path where it occurs
(``ops`` maps ``"aten.nonzero.default"`` to ``["module 'head' (node nonzero)"]``); the
:func:`refusal_of` an op says why. An entry may also list non-core overloads of the same kind
(``item``, ``rand_like``) that torch.export keeps when it does not decompose.

Refused forms of converted ops (dropout in training mode, a strided scatter along a
dynamic axis) are not listed here: their converters raise
:func:`~flora_graph.frontend.aten.registry.refuse`, naming the form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["REFUSED", "REFUSED_OPS", "Refusal", "refusal_of"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Refusal:
    """One entry of the refusal list: a kind of op, why capture refuses it, and its overloads."""

    name: str
    reason: str
    overloads: tuple[Any, ...]


REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "backward",
        "a gradient op: an inference graph (what capture exports) has none, and training runs its backward in torch",
        (aten._adaptive_avg_pool2d_backward.default, aten.avg_pool2d_backward.default,
         aten.convolution_backward.default, aten.embedding_dense_backward.default,
         aten.max_pool2d_with_indices_backward.default, aten.native_group_norm_backward.default,
         aten.native_layer_norm_backward.default),
    ),
    Refusal(
        "random",
        "draws random numbers: a compiled graph is deterministic, and one draw frozen into a constant would be wrong",
        (aten.rand.default, aten.randn.default, aten.randperm.default, aten.rand_like.default,
         aten.randn_like.default, aten.randint.default, aten.randint.low, aten.randint_like.default,
         aten.bernoulli.default, aten.bernoulli.p, aten.normal.Tensor_float, aten.normal.float_Tensor,
         aten.normal.Tensor_Tensor, aten.uniform.default, aten.multinomial.default),
    ),
    Refusal(
        "data-dependent shape",
        "the output's shape depends on the input's values, which no static or named dim can describe",
        (aten.nonzero.default, aten.argwhere.default, aten.masked_select.default),
    ),
    Refusal(
        "tensor as a Python number",
        "reads a tensor's value into Python (.item()): what follows would depend on data at capture time",
        (aten._local_scalar_dense.default, aten.item.default),
    ),
    Refusal(
        "storage layout",
        "reads or resizes a tensor's storage (is_contiguous, resize_): the IR holds values, not strides or storages",
        (aten.sym_is_contiguous.default, aten.resize_.default),
    ),
)
"""The refusal list: at most ten entries, each a kind of op with its reason (see the module doc)."""

REFUSED_OPS: dict[Any, Refusal] = {op: r for r in REFUSED for op in r.overloads}
"""Each refused overload -> its entry of :data:`REFUSED`."""


def refusal_of(target: Any) -> Refusal | None:
    """The entry of :data:`REFUSED` listing the fx call target ``target``, or ``None``."""
    return REFUSED_OPS.get(target)
