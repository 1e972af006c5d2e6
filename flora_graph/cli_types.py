"""Argument types shared by every ``flora-graph`` subcommand (argparse ``type=`` callables).

Torch-free and imported by the CLI modules of every layer (``flora_graph.cli``,
``flora_graph.training.cli``), so one definition serves them all.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["int_at_least"]


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
