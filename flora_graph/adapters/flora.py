"""``FloraAdapter``: LoRA whose ``A`` is a seeded random projection (Flora, arXiv:2402.03293).

Inference, merging and graph export follow :class:`LoRAAdapter` exactly. ``A`` starts as a
projection with entries ``N(0, 1/r)`` drawn from a CPU generator seeded by ``seed``, so
the same seed gives the same matrix on every device.

Training (:meth:`FloraAdapter.update_parameters`, the reference design's
``UpdateParameters(lr)``): ``A`` is a fixed random projection and only ``B`` is trained, so
``dL/dB = s * G_W @ A^T`` is the weight gradient compressed by ``A``. ``B`` moves along
its momentum ``M = b1 * M + (1 - b1) * dL/dB`` (bias-corrected), divided by
``sqrt(v)`` when ``use_adaptive_lr``. ``v`` is a per-output-row mean of ``(dL/dB)^2``: every
column of ``dL/dB`` has the same expected square under an i.i.d. projection, so ``v`` is never
projected and stays valid across resamples. Every ``resampling_interval`` steps
(:meth:`FloraAdapter.resample`) the current update ``s * B @ A`` is merged into the base weight
FIRST, ``B`` is reset to zero, ``A`` is redrawn from the next seed and the momentum is
transferred with ``M @ A_old @ A_new^T`` (decompress with the old projection, compress with
the new), so the module's output does not change at a resample. A transfer is unbiased but
adds noise (the momentum's norm grows by about ``sqrt(fan_in / r)``): keep
``momentum_decay ** resampling_interval * sqrt(fan_in / r)`` well below 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from flora_graph.adapters.lora import LoRAAdapter
from flora_graph.errors import AdapterError
from flora_graph.flora.projection import gaussian_projection, stable_seed

__all__ = ["FloraAdapter", "next_projection_seed"]

_EPS = 1e-8


def next_projection_seed(seed: int) -> int:
    """The seed after ``seed`` at a resample: a stable 63-bit hash (same in every process and on every device)."""
    return stable_seed("flora.adapter.resample", seed)


def _check_decay(value: float, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) < 1.0:
        raise AdapterError(f"{where}: {what} must be in [0, 1), got {value!r}")
    return float(value)


class FloraAdapter(LoRAAdapter):
    """A LoRA adapter trained the Flora way.

    Args:
        base_layer, rank, alpha, freeze_base: as :class:`LoRAAdapter`; ``rank <= min(fan_in, out)`` (the rank
            gradients are compressed to).
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
        if isinstance(base_layer, nn.Embedding):  # Flora's plans and optimizer state are laid out for products
            raise AdapterError(f"{where}: FloraAdapter supports Linear, Conv2d, Conv1d and transformers' Conv1D, not "
                               "Embedding (LoRAAdapter takes an embedding)")
        if isinstance(base_layer, nn.Conv2d | nn.Conv1d) and base_layer.groups != 1:  # its update is no product B @ A
            raise AdapterError(f"{where}: FloraAdapter on a grouped convolution (groups={base_layer.groups}) is "
                               "unsupported: Flora's resampling moves B @ A, which a grouped B is not")
        super().__init__(base_layer, rank, alpha, freeze_base, 0.0, module_name=module_name, adapter_name=adapter_name)
        fan_in, out = self.lora_A[0].numel(), self.lora_B.shape[0]
        if rank > min(fan_in, out):  # the rank Flora compresses gradients to: above this it compresses nothing
            raise AdapterError(f"{where}: rank {rank} exceeds min(in={fan_in}, out={out}) = {min(fan_in, out)}")
        self._resampling_interval = resampling_interval
        self.momentum_decay = momentum_decay
        self.second_moment_decay = second_moment_decay
        self.use_adaptive_lr = bool(use_adaptive_lr)
        self._current_step = 0
        # optimizer state of update_parameters: plain tensors, not buffers, so the module's
        # state_dict, export and capture are exactly LoRA's (see training_state())
        self._momentum: torch.Tensor | None = None
        self._second_moment: torch.Tensor | None = None

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
        fan_in = math.prod(self.lora_A.shape[1:])
        return gaussian_projection(seed, self.rank, fan_in).reshape(self.lora_A.shape)

    def reset_lora_parameters(self) -> None:
        """``A`` from the seeded projection, ``B`` zeros."""
        with torch.no_grad():
            self.lora_A.copy_(self.projection(self._seed).to(self.lora_A.dtype))
        nn.init.zeros_(self.lora_B)

    # ------------------------------------------------------------------ training
    def _state_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        out, r = self.lora_B.shape[0], self.rank
        if self._momentum is None:
            self._momentum = torch.zeros(out, r, dtype=torch.float32, device=device)
        if self._second_moment is None:
            self._second_moment = torch.zeros(out, dtype=torch.float32, device=device)
        self._momentum = self._momentum.to(device)
        self._second_moment = self._second_moment.to(device)
        return self._momentum, self._second_moment

    @torch.no_grad()
    def update_parameters(self, lr: float) -> None:
        """One Flora step on ``B`` from its ``.grad``; resamples after every ``resampling_interval`` steps.

        ``A``'s gradient is ignored (``A`` is the projection). An unfrozen base layer takes a
        plain SGD step ``p -= lr * grad``. Gradients are not cleared (call ``zero_grad()``).

        Raises:
            AdapterError: ``lr`` not a finite number ``>= 0``, ``B`` without a gradient, or a
                non-finite gradient (nothing is changed), naming the module.
        """
        where = self._where()
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
            raise AdapterError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
        grad = self.lora_B.grad
        if grad is None:
            raise AdapterError(f"{where}: lora_B has no gradient; call backward() before update_parameters()")
        base = [p for p in self.base_layer.parameters() if not self._freeze_base and p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in [grad, *(p.grad for p in base)]):
            raise AdapterError(f"{where}: non-finite gradient; no parameter or state was changed")
        m, v = self._state_on(grad.device)
        t = self._current_step + 1
        b1, b2 = self.momentum_decay, self.second_moment_decay
        g = grad.detach().float().reshape(m.shape)
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        step = m / (1.0 - b1**t)
        if self.use_adaptive_lr:
            v.mul_(b2).add_(g.square().mean(dim=1), alpha=1.0 - b2)
            step.div_((v / (1.0 - b2**t)).sqrt_().add_(_EPS).unsqueeze(1))
        b = self.lora_B
        b.sub_((step * lr).reshape(b.shape).to(b.dtype))
        for p in base:
            p.sub_(p.grad * lr)
        self._current_step = t
        if t % self._resampling_interval == 0:
            self.resample()

    @torch.no_grad()
    def resample(self) -> None:
        """Merge ``s * B @ A`` into the base weight, zero ``B``, draw the next ``A``, transfer the momentum.

        The output is unchanged (up to rounding of the merged weight). Raises
        ``AdapterError`` when the merged weight is not finite; nothing is changed then.
        """
        w = self.base_layer.weight
        merged = w.float() + self.delta_weight()
        if not torch.isfinite(merged).all() or not torch.isfinite(merged.to(w.dtype)).all():
            raise AdapterError(f"{self._where()}: merged weight at resample is not finite in {w.dtype}")
        seed = next_projection_seed(self._seed)
        a_old = self.lora_A.detach().float().reshape(self.rank, -1)
        a_new = self.projection(seed).to(device=a_old.device).reshape(self.rank, -1)
        w.copy_(merged.to(w.dtype))
        if self._momentum is not None:
            # M lives in B's space (out x r): decompress M @ A_old, compress with A_new^T
            self._momentum.copy_(self._momentum @ (a_old @ a_new.T).to(self._momentum.device))
        self.lora_A.copy_(a_new.reshape(self.lora_A.shape).to(self.lora_A.dtype))
        self.lora_B.zero_()
        self._seed = seed

    def training_state(self) -> dict[str, Any]:
        """Seed, step count, momentum and second moment (plain ints and tensors), for checkpoints.

        With the module's ``state_dict()`` it resumes training exactly
        (``torch.load(..., weights_only=True)`` reads both).
        """
        return {
            "seed": int(self._seed),
            "current_step": int(self._current_step),
            "momentum": None if self._momentum is None else self._momentum.detach().clone(),
            "second_moment": None if self._second_moment is None else self._second_moment.detach().clone(),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state`'s output; a shape that does not fit raises ``AdapterError``."""
        out, r = self.lora_B.shape[0], self.rank
        for key, shape in (("momentum", (out, r)), ("second_moment", (out,))):
            t = state.get(key)
            if t is not None and tuple(t.shape) != shape:
                raise AdapterError(
                    f"{self._where()}: training state {key!r} has shape {tuple(t.shape)}, expected {shape}"
                )
        device = self.lora_B.device
        m, v = state.get("momentum"), state.get("second_moment")
        self._momentum = None if m is None else m.detach().to(device, torch.float32, copy=True)
        self._second_moment = None if v is None else v.detach().to(device, torch.float32, copy=True)
        self._seed = int(state["seed"])
        self._current_step = int(state["current_step"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, resampling_interval={self._resampling_interval}, seed={self._seed}"
