"""LoRA on a parameter: a mixture of experts' 3-D expert tensors, or a 2-D weight a module reads directly.

PEFT's ``target_parameters`` (which its ``all-linear`` adds where a model's experts are fused 3-D tensors, as in
Qwen3-MoE, OLMoE and gpt-oss in transformers 5) adapts a parameter rather than a layer: expert ``e`` of a
``[experts, out, in]`` tensor gets ``s * B_e @ A_e``, and a 2-D ``[out, in]`` weight (a router's) gets ``s * B @ A``.
:class:`ParamLoRA` is that adapter as a ``torch.nn.utils.parametrize`` parametrization, as PEFT's ``ParamWrapper``
computes it: reading the parameter gives ``W + delta``, so the model's own forward runs unchanged.

The factors keep PEFT's layout per expert: ``A`` ``[experts, r, in]``, ``B`` ``[experts, out, r]`` (a 2-D weight's
``[r, in]`` / ``[out, r]``). A tensor stored ``[experts, in, out]`` (the experts module's ``is_transposed``, as
gpt-oss's) takes the delta transposed. Capture sees ``W + s * MatMul(B, A)`` feeding the layer's product, which the
``adapter-slots`` pass splits into the base product and a low-rank branch on the same input
(:mod:`flora_graph.passes.param_lora`), so the adapter becomes a hot-swappable slot.

The adapter of parameter ``name`` of module ``owner`` is named ``"<owner>.<name>"`` (the parameter's path), as
its slot and its weights in an adapter file (``"<owner>.<name>.lora_A"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from flora_graph.errors import AdapterError

__all__ = ["ParamLoRA", "apply_param_lora", "is_param_path", "param_adapters_of"]


class ParamLoRA(nn.Module):
    """``W -> W + scaling * delta(B, A)`` for a 2-D ``[out, in]`` or 3-D ``[experts, out, in]`` parameter (``[experts,
    in, out]`` with ``transposed``); ``A`` and ``B`` start as PEFT starts them (``A`` Kaiming-uniform, ``B`` zeros)."""

    def __init__(self, shape: Sequence[int], rank: int, alpha: float = -1, *, transposed: bool = False,
                 where: str = "parameter") -> None:
        super().__init__()
        if len(shape) not in (2, 3):
            raise AdapterError(f"{where}: LoRA on a parameter needs a 2-D or 3-D tensor, got shape {tuple(shape)}")
        if not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"{where}: rank must be a positive int, got {rank!r}")
        self.transposed = bool(transposed) and len(shape) == 3
        if len(shape) == 3:
            experts, out, inn = (shape[0], shape[2], shape[1]) if self.transposed else tuple(shape)
            a_shape, b_shape = (experts, rank, inn), (experts, out, rank)
        else:
            out, inn = shape
            a_shape, b_shape = (rank, inn), (out, rank)
        self.rank = rank
        self.scaling = (alpha if alpha > 0 else rank) / rank
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        nn.init.kaiming_uniform_(self.lora_A.view(-1, a_shape[-1]), a=math.sqrt(5))

    @property
    def experts(self) -> int:
        """Experts of a 3-D parameter (``0`` for a 2-D one)."""
        return int(self.lora_A.shape[0]) if self.lora_A.dim() == 3 else 0

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` (per expert), in the parameter's layout."""
        d = torch.matmul(self.lora_B, self.lora_A) * self.scaling
        return d.transpose(1, 2) if self.transposed else d

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def is_param_path(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a parameter of a module of ``model`` (``"<owner>.<name>"``) rather than a module."""
    owner, _, name = path.rpartition(".")
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    return parametrize.is_parametrized(mod, name) or name in dict(mod.named_parameters(recurse=False))


def apply_param_lora(model: nn.Module, paths: Sequence[str], rank: int = 8, alpha: float = -1) -> list[str]:
    """Register a :class:`ParamLoRA` on each parameter ``"<owner>.<name>"`` of ``paths``; return the paths.

    A 3-D parameter of a module with ``is_transposed`` (transformers' experts stored ``[experts, in, out]``) is
    adapted in that layout. All are checked before any is installed: a path that is not a 2-D or 3-D parameter,
    or one adapted already, raises :class:`AdapterError` and leaves ``model`` untouched.
    """
    built = []
    for path in paths:
        owner, _, name = path.rpartition(".")
        if not is_param_path(model, path):
            raise AdapterError(f"{path!r} is not a parameter of {type(model).__name__}")
        mod = model.get_submodule(owner) if owner else model
        if parametrize.is_parametrized(mod, name):
            raise AdapterError(f"parameter {path!r} carries an adapter already")
        param = getattr(mod, name)
        lora = ParamLoRA(tuple(param.shape), rank, alpha, transposed=bool(getattr(mod, "is_transposed", False)),
                         where=f"parameter {path!r}").to(param.dtype)
        built.append((mod, name, lora))
    for mod, name, lora in built:  # unsafe: no trial forward (a whole [experts, out, in] delta) to check the shape
        parametrize.register_parametrization(mod, name, lora, unsafe=True)
    return list(paths)


def param_adapters_of(model: nn.Module) -> dict[str, ParamLoRA]:
    """Parameter path -> :class:`ParamLoRA`, for every parameter of ``model`` carrying one."""
    out = {}
    for owner, mod in model.named_modules():
        for name, plist in getattr(mod, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, ParamLoRA):
                    out[f"{owner}.{name}" if owner else name] = p
    return out
