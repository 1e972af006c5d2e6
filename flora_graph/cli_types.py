"""Argument types shared by every ``flora-graph`` subcommand (argparse ``type=`` callables).

Torch-free and imported by the CLI modules of every layer (``flora_graph.cli``,
``flora_graph.training.cli``), so one definition serves them all.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["float_in", "int_at_least"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int ``>= low``, refused by the parser (exit 2, naming the option) otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = float("inf"), *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``), refused by
    the parser (exit 2, naming the option) otherwise."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high == float('inf') else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text}")
        return value

    return parse
