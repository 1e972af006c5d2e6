"""The string choices of :class:`~flora_graph.training.trainer.TrainConfig`, importable without torch (the CLI uses them)."""

from __future__ import annotations

__all__ = ["ACCUMULATORS", "FLORA_UPDATES", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("flora", "adam", "adafactor", "lora-adam", "flora-adapter")
ACCUMULATORS = ("auto", "compressed", "full")
SCHEDULES = ("cosine", "constant")
FLORA_UPDATES = ("scaled", "lift", "paper")  # flora_graph.flora.options.UPDATES, without importing torch (a test keeps them equal)
