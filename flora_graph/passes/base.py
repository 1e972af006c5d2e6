"""What a pass is: ``Graph -> PassResult``, registered by name in :data:`PASSES`.

A pass is a callable ``fn(graph, **options) -> PassResult``; it may edit ``graph`` in place
and return it (as torch.fx passes do; :func:`~flora_graph.passes.optimize` copies the
caller's graph first). Keyword options a pass declares are handed to it by
:class:`~flora_graph.passes.Pipeline` from the options it was given; the rest are not.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from flora_graph.errors import GraphError
from flora_graph.ir import Graph

__all__ = ["PASSES", "PassError", "PassFn", "PassResult", "accepted_options", "get_pass", "register_pass"]


@dataclass
class PassResult:
    """What a pass returns: the (possibly same, edited) graph, whether it changed, and stats.

    ``stats`` is a plain dict; rule-based passes fill ``fired`` (rule -> count) and
    ``refused`` (node name -> ``"rule: why"``), other passes add their own keys.
    """

    graph: Graph
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class PassFn(Protocol):
    """A pass: ``fn(graph, **options) -> PassResult``."""

    def __call__(self, graph: Graph, /, **options: Any) -> PassResult: ...


class PassError(GraphError):
    """A pass raised or left an invalid graph; names the pass and the passes run before it."""

    def __init__(self, message: str, pass_name: str = "", previous: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.previous: list[str] = list(previous)


PASSES: dict[str, PassFn] = {}
"""Every registered pass by name (``"fold-lora-scale"``, ``"dce"``, ...)."""


def register_pass(name: str, *, replace: bool = False) -> Callable[[PassFn], PassFn]:
    """Decorator registering ``fn`` in :data:`PASSES` under ``name``.

    A name registered twice raises ``ValueError`` unless ``replace=True``.
    """

    def deco(fn: PassFn) -> PassFn:
        if name in PASSES and not replace and PASSES[name] is not fn:
            raise ValueError(f"a pass named {name!r} is already registered")
        PASSES[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def get_pass(spec: str | PassFn) -> tuple[str, PassFn]:
    """``(name, fn)`` for a registered name or a callable (named after its registration or ``__name__``)."""
    if isinstance(spec, str):
        if spec not in PASSES:
            raise KeyError(f"unknown pass {spec!r}; registered: {sorted(PASSES)}")
        return spec, PASSES[spec]
    if not callable(spec):
        raise TypeError(f"a pass must be a registered name or a callable, got {spec!r}")
    return getattr(spec, "pass_name", getattr(spec, "__name__", repr(spec))), spec


def accepted_options(fn: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that ``fn`` declares as keyword parameters (all of them for ``**kw``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(options)
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in options.items() if k in names}
