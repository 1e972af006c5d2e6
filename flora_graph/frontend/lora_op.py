"""One traced op per LoRA Linear site while :func:`~flora_graph.frontend.capture` runs ``torch.export``.

``torch.export`` traces every ATen op of a model through fake tensors with symbolic sizes,
which costs about a millisecond per op whatever the op computes. A LoRA Linear forward
(PEFT's or ours) is five of them (base product, down, up, scale, add) plus PEFT's
bookkeeping: seven traced nodes per site, a third of a 4-layer Llama's. During capture,
:func:`lora_sites_as_op` gives each eligible adapter a forward that calls the custom op
``flora_graph::lora_linear`` (:func:`lora_linear`) instead, which the trace records as one
node; the ATen table (:mod:`~flora_graph.frontend.aten`) expands it back into the
exact tagged pattern the op-by-op trace gives: same structure, adapter node names, tags,
weight names and ``scaling`` constant (tested); only fx's automatic numbering of the
untagged nodes elsewhere shifts, as the trace has fewer nodes. On a 4-layer
Llama with LoRA on all seven projections this takes ``torch.export`` from 572 to 404
nodes and about 1.2 s to 0.8 s.

A site keeps its own forward (traced op by op) whenever anything differs from the plain
``base(x) + scaling * B(A(x))``: a Conv2d base, a merged or disabled PEFT layer, several
or no active adapters, DoRA or another LoRA variant, LoRA biases, dropout in training mode,
extra forward arguments, mixed dtypes, or a forward hook the op would skip (on the base
layer, ``A``, ``B`` or the dropout, or a global one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.adapters.lora import LoRAAdapter, is_conv1d
from flora_graph.frontend.aten.registry import operand, out_dtype, register
from flora_graph.ir import ComputationNode, Op

if TYPE_CHECKING:
    from flora_graph.frontend.capture import CaptureContext

__all__ = ["lora_linear", "lora_sites_as_op"]


@torch.library.custom_op("flora_graph::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``linear(x, weight, bias) + scaling * linear(linear(x, lora_A), lora_B)``: a LoRA Linear site as one op.

    Args:
        x: ``[..., in]``.
        weight: the base weight ``[out, in]``; bias: ``[out]`` or ``None``.
        lora_A: ``[r, in]``; lora_B: ``[out, r]``.
        scaling: the factor on the low-rank branch.
    """
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * scaling


@lora_linear.register_fake
def _lora_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    # the shape checks F.linear's meta kernels would make on the op-by-op trace
    torch._check(x.shape[-1] == weight.shape[1] == lora_A.shape[1],
                 lambda: f"lora_linear: input features {x.shape[-1]} vs weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}")
    torch._check(lora_B.shape[1] == lora_A.shape[0] and lora_B.shape[0] == weight.shape[0],
                 lambda: f"lora_linear: lora_B {tuple(lora_B.shape)} does not map lora_A {tuple(lora_A.shape)} onto {weight.shape[0]} outputs")
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],), lambda: f"lora_linear: bias {tuple(bias.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _plain_dropout(m: nn.Module) -> bool:
    """Whether ``m`` passes its input through unchanged (an Identity, or a Dropout in eval mode)."""
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training)


def _base_weight(base: nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` weight of a Linear or Conv1D base layer (a Conv1D's is transposed), else ``None``."""
    if type(base) is nn.Linear:
        return base.weight
    if is_conv1d(base) and base.weight.dim() == 2:
        return base.weight.t()  # traced as the same transpose Conv1D's linear form has
    return None


def _hookless(*modules: nn.Module) -> bool:
    """Whether calling the op instead of ``modules`` skips no forward hook (theirs, or a global one)."""
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _same_dtype(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.dtype == x.dtype for t in tensors)


def _ours(m: nn.Module) -> bool:
    cls = type(m)
    return isinstance(m, LoRAAdapter) and cls.forward is LoRAAdapter.forward and cls.lora_forward is LoRAAdapter.lora_forward


def _ours_forward(self: LoRAAdapter, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    base = self.base_layer
    plain = not (args or kwargs or self.is_conv) and _plain_dropout(self.lora_dropout) and _hookless(base, self.lora_dropout)
    weight = _base_weight(base) if plain else None
    if weight is None or not _same_dtype(x, weight, base.bias, self.lora_A, self.lora_B):
        return type(self).forward(self, x, *args, **kwargs)
    return lora_linear(x, weight, base.bias, self.lora_A, self.lora_B, float(self.scaling))


def _peft_adapter(m: nn.Module) -> str | None:
    """The one active adapter of a PEFT LoRA layer whose forward is the plain LoRA Linear, else ``None``."""
    active = getattr(m, "active_adapters", None)
    if getattr(m, "merged", True) or getattr(m, "disable_adapters", True) or not isinstance(active, list | tuple) or len(active) != 1:
        return None
    name = active[0]
    if name not in m.lora_A or name not in m.lora_B or getattr(m, "use_dora", {}).get(name, False):
        return None
    if (getattr(m, "lora_variant", None) or {}).get(name) is not None or (getattr(m, "lora_bias", None) or {}).get(name, False):
        return None
    a, b = m.lora_A[name], m.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    dropout = getattr(m, "lora_dropout", {})
    if name in dropout and not (_plain_dropout(dropout[name]) and _hookless(dropout[name])):
        return None
    if not _hookless(m.base_layer, a, b):
        return None
    scaling = getattr(m, "scaling", {}).get(name)
    return name if isinstance(scaling, int | float) and not isinstance(scaling, bool) else None


def _peft_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else _peft_adapter(self)
    weight = None if name is None else _base_weight(self.base_layer)
    if weight is not None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if _same_dtype(x, weight, self.base_layer.bias, a, b):
            return lora_linear(x, weight, self.base_layer.bias, a, b, float(self.scaling[name]))
    return type(self).forward(self, x, *args, **kwargs)


@contextlib.contextmanager
def lora_sites_as_op(adapters: Mapping[str, nn.Module]) -> Iterator[int]:
    """While the block runs, the eligible adapters in ``adapters`` (path -> module: ours or PEFT
    LoRA layers) call :func:`lora_linear`; yields how many were given the op forward.

    Only an instance attribute is set (and removed after), so the modules' classes and any
    forward already set on an instance are left alone.
    """
    patched = []
    for m in adapters.values():
        if "forward" in vars(m):
            continue
        if _ours(m):
            forward = _ours_forward
        elif isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and _peft_adapter(m) is not None:
            forward = _peft_forward
        else:
            continue
        m.forward = forward.__get__(m)
        patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


def _convert(ctx: CaptureContext, x: Any, weight: Any, bias: Any, lora_A: Any, lora_B: Any, scaling: float) -> ComputationNode:
    """The op as the five tagged nodes an op-by-op trace of the site gives (base, lora_down,
    lora_up, lora_scale, lora_add), each weight's ``Const`` made just before its first reader."""
    r = ctx.realize
    base_inputs = [r(x), r(weight)] + ([r(bias)] if bias is not None else [])
    base = ctx.emit(Op.LINEAR, base_inputs, role="base")
    down = ctx.emit(Op.LINEAR, [r(x), r(lora_A)], role="lora_down")
    up = ctx.emit(Op.LINEAR, [down, r(lora_B)], role="lora_up")
    scaled = ctx.emit(Op.MUL, [up, operand(ctx, scaling, out_dtype(ctx))], role="lora_scale")
    return ctx.emit(Op.ADD, [base, scaled], role="lora_add")


_convert.realizes_args = True  # type: ignore[attr-defined]
register(torch.ops.flora_graph.lora_linear.default)(_convert)
