"""``FloraAdapter``: LoRA whose ``A`` is a seeded random projection (Flora, arXiv:2402.03293).

Inference, merging and graph export follow :class:`LoRAAdapter` exactly. ``A`` starts as a
projection with entries ``N(0, 1/r)`` drawn from a CPU generator seeded by ``seed``, so
the same seed gives the same matrix on every device. The training behaviour (resampling
``A`` every ``resampling_interval`` steps after merging the accumulated update, with the
configured momentum and second-moment decays) belongs to the training path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flora_graph.adapters.lora import LoRAAdapter
from flora_graph.errors import AdapterError

__all__ = ["FloraAdapter"]


def _check_decay(value: float, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) < 1.0:
        raise AdapterError(f"{where}: {what} must be in [0, 1), got {value!r}")
    return float(value)


class FloraAdapter(LoRAAdapter):
    """A LoRA adapter trained the Flora way.

    Args:
        base_layer, rank, alpha, freeze_base: as :class:`LoRAAdapter`.
        resampling_interval: steps between projection resamples, ``>= 1``.
        momentum_decay: first-moment decay, in ``[0, 1)``.
        second_moment_decay: second-moment decay, in ``[0, 1)``.
        use_adaptive_lr: scale updates by the second moment (Adam/Adafactor style).
        seed: seed of the projection generator (CPU, device independent).

    Raises:
        AdapterError: any argument out of range, naming the module.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float = -1,
        resampling_interval: int = 1000,
        momentum_decay: float = 0.9,
        second_moment_decay: float = 0.999,
        use_adaptive_lr: bool = True,
        freeze_base: bool = True,
        seed: int = 42,
        *,
        module_name: str = "",
        adapter_name: str = "default",
    ) -> None:
        where = f"module {module_name or type(base_layer).__name__!r}"
        if isinstance(resampling_interval, bool) or not isinstance(resampling_interval, int) or resampling_interval < 1:
            raise AdapterError(f"{where}: resampling_interval must be an int >= 1, got {resampling_interval!r}")
        momentum_decay = _check_decay(momentum_decay, "momentum_decay", where)
        second_moment_decay = _check_decay(second_moment_decay, "second_moment_decay", where)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise AdapterError(f"{where}: seed must be an int, got {seed!r}")
        self._seed = seed
        super().__init__(base_layer, rank, alpha, freeze_base, 0.0, module_name=module_name, adapter_name=adapter_name)
        self._resampling_interval = resampling_interval
        self.momentum_decay = momentum_decay
        self.second_moment_decay = second_moment_decay
        self.use_adaptive_lr = bool(use_adaptive_lr)
        self._current_step = 0

    @property
    def resampling_interval(self) -> int:
        """Steps between projection resamples."""
        return self._resampling_interval

    @property
    def current_step(self) -> int:
        """Training steps taken so far."""
        return self._current_step

    @property
    def seed(self) -> int:
        """Seed of the current projection."""
        return self._seed

    def projection(self, seed: int) -> torch.Tensor:
        """The ``[r, fan_in]`` projection for ``seed``: entries ``N(0, 1/r)``, CPU generator."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        fan_in = math.prod(self.lora_A.shape[1:])
        a = torch.randn(self.rank, fan_in, generator=gen, dtype=torch.float32) / math.sqrt(self.rank)
        return a.reshape(self.lora_A.shape)

    def reset_lora_parameters(self) -> None:
        """``A`` from the seeded projection, ``B`` zeros."""
        with torch.no_grad():
            self.lora_A.copy_(self.projection(self._seed).to(self.lora_A.dtype))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, resampling_interval={self._resampling_interval}, seed={self._seed}"
