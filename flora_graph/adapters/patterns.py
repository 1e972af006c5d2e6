"""Regular expressions from adapter configs, compiled with a typed error and matched with a time bound.

PEFT configs carry regexes: ``target_modules`` / ``exclude_modules`` given as one string
(matched against the whole module path) and the keys of ``rank_pattern`` / ``alpha_pattern``
(PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)``). Such a file is
input, so a key may be invalid (``"("``) or catastrophic (``"(.|.)*Z"`` backtracks 2^n steps
on an n-character path with Python's ``re``, minutes for a 30-character path).

:class:`BoundedPattern` compiles a pattern with :mod:`re` (so exactly the patterns PEFT
accepts are accepted, and an invalid one is an :class:`AdapterError` naming the config key)
and matches it with the ``regex`` package, whose matcher takes a ``timeout``. Matching time
is counted per pattern across every module path it is tried on, within
:data:`MATCH_BUDGET_S`; a pattern that runs past it is refused with an ``AdapterError``
naming it, instead of hanging the loader. For the patterns ``re`` accepts, ``regex`` (in its
default ``VERSION0`` mode) matches the same strings; the few constructs it compiles
differently from ``re`` are refused by name rather than matched without a bound.

Compiling is bounded too: ``regex`` unrolls counted repeats, so nested ones cost their
product (``((a{1000}){1000}){10}`` took 7 s and 3 GB); a pattern whose nested repeat counts
multiply past :data:`MAX_REPEAT_PRODUCT` (never needed to name module paths) is refused
before it is compiled, as is one longer than :data:`MAX_PATTERN_CHARS`.
"""

from __future__ import annotations

import re
import re._constants as _sre
import re._parser as _sre_parser
import time
from typing import Any

import regex

from flora_graph.errors import AdapterError

__all__ = ["MATCH_BUDGET_S", "BoundedPattern", "compile_pattern"]

MATCH_BUDGET_S = 1.0
"""Seconds one config pattern may spend matching, summed over all the module paths it is tried on."""

MAX_PATTERN_CHARS = 10_000
MAX_REPEAT_PRODUCT = 10_000
"""The largest product of the counts of nested repeats (``{m,n}``; ``*`` counts as its minimum) a pattern may have."""

_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)


def _repeat_product(items: Any, mult: int = 1) -> int:
    """The largest product of nested repeat counts in a parsed (``re._parser``) pattern."""
    worst = mult
    for op, av in items:
        subs: list[Any] = []
        inner = mult
        if op in _REPEATS:
            lo, hi, sub = av
            inner = mult * max(lo if hi == _sre.MAXREPEAT else hi, 1)
            subs = [sub]
        elif op is _sre.SUBPATTERN:
            subs = [av[-1]]
        elif op is _sre.BRANCH:
            subs = list(av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            subs = [av[1]]
        elif op is _sre.GROUPREF_EXISTS:
            subs = [b for b in av[1:] if b is not None]
        elif op is _sre.ATOMIC_GROUP:
            subs = [av]
        worst = max(worst, inner)
        for sub in subs:
            if worst > MAX_REPEAT_PRODUCT:
                return worst
            worst = max(worst, _repeat_product(sub, inner))
    return worst


class BoundedPattern:
    """One config regex: ``re``-valid, matched by ``regex`` within a shared time budget.

    ``where`` names the pattern in errors (the config file and key).
    """

    def __init__(self, pattern: str, where: str, *, wrap: str = "{}", budget_s: float = MATCH_BUDGET_S) -> None:
        if not isinstance(pattern, str):
            raise AdapterError(f"{where}: a pattern must be a string, got {type(pattern).__name__} {pattern!r}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise AdapterError(f"{where}: pattern of {len(pattern)} characters is longer than {MAX_PATTERN_CHARS}")
        self.pattern = pattern
        self.where = where
        self.budget_s = budget_s
        self._left = budget_s
        source = wrap.format(pattern)
        try:
            re.compile(source)
            product = _repeat_product(_sre_parser.parse(source))
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise AdapterError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from None
        if product > MAX_REPEAT_PRODUCT:
            raise AdapterError(f"{where}: {pattern!r} nests counted repeats (up to {product} and more) past "
                               f"{MAX_REPEAT_PRODUCT}, too costly to compile; simplify it")
        try:
            self._compiled: Any = regex.compile(source, flags=regex.VERSION0)
        except (regex.error, RecursionError, OverflowError, ValueError) as exc:
            raise AdapterError(f"{where}: {pattern!r} uses a construct the bounded matcher cannot compile ({exc}); "
                               "simplify it") from None

    def _run(self, method: str, text: str) -> Any:
        if self._left <= 0:
            self._timeout(text)
        start = time.perf_counter()
        try:
            found = getattr(self._compiled, method)(text, timeout=self._left)
        except TimeoutError:
            self._timeout(text)
        except RecursionError:
            raise AdapterError(f"{self.where}: {self.pattern!r} is too deeply nested to match against {text!r}") from None
        self._left -= time.perf_counter() - start
        return found

    def _timeout(self, text: str) -> None:
        self._left = 0.0
        raise AdapterError(f"{self.where}: pattern {self.pattern!r} takes more than {self.budget_s:g} s to match "
                           f"module paths (last tried on {text!r}); it backtracks catastrophically, simplify it")

    def match(self, text: str) -> bool:
        """``re.match`` semantics (anchored at the start)."""
        return self._run("match", text) is not None

    def fullmatch(self, text: str) -> bool:
        """``re.fullmatch`` semantics."""
        return self._run("fullmatch", text) is not None

    def match_group(self, text: str, group: str) -> str | None:
        """The named ``group`` of ``re.match`` semantics (anchored at the start); ``None`` without a match."""
        found = self._run("match", text)
        return None if found is None else found.group(group)


def compile_pattern(pattern: Any, where: str, *, wrap: str = "{}") -> BoundedPattern:
    """:class:`BoundedPattern` of ``wrap.format(pattern)``; :class:`AdapterError` naming ``where`` if it is invalid."""
    return BoundedPattern(pattern, where, wrap=wrap)
