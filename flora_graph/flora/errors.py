"""Typed errors of the Flora library (optimizer and accumulator), under :class:`flora_graph.errors.FloraGraphError`."""

from __future__ import annotations

from flora_graph.errors import FloraGraphError

__all__ = ["NonFiniteGradientError", "OptimizerError"]


class OptimizerError(FloraGraphError, ValueError):
    """An optimizer or accumulator was configured or used wrongly (names the parameter or option).

    Also a ``ValueError``, so code that catches torch's own argument errors catches it too.
    """


class NonFiniteGradientError(OptimizerError):
    """A gradient holds NaN or inf; ``names`` lists the parameters at fault. No state was changed."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = list(names)

    def __reduce__(self):  # picklable across process pools: rebuild with both arguments
        return (type(self), (str(self), self.names))
