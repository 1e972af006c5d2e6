"""Rules as data: a small pattern language, ``Rule(name, pattern, rewrite, check)``, ``RuleSet``.

A :class:`Pat` describes a node (tinygrad's ``UPat``): an op or a set of ops (``None``: any),
input sub-patterns, a binding ``name``, a predicate on the node, ``static=True`` for "a
weight" (a ``Const`` or an expression of ``Const`` nodes). ``Add``/``Mul`` inputs match in
either order. A name bound twice must bind the same node, so ``x`` appearing in two
branches means "the same input node". ``p | q`` tries alternatives in order.

A :class:`Rule`'s ``check`` returns a :class:`MatchResult`; ``MatchResult().fail("why")``
refuses the match and the reason is recorded. :meth:`RuleSet.apply` runs the rules over a
graph to a fixed point and reports counts of rules fired and reasons of refusals.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flora_graph.ir import ComputationNode, Graph, Op, OpGroup
from flora_graph.passes.base import PassResult
from flora_graph.passes.rewrite import RewriteContext

__all__ = ["Match", "MatchResult", "Pat", "Rule", "RuleSet"]

Bindings = dict[str, ComputationNode]


class Pat:
    """A node pattern; see the module docstring. ``extra=True`` lets the node have more inputs than listed."""

    __slots__ = ("alts", "extra", "inputs", "name", "ops", "pred", "static")

    def __init__(self, op: Op | Iterable[Op] | None = None, inputs: Sequence[Pat] | None = None, *,
                 name: str | None = None, pred: Callable[[ComputationNode], bool] | None = None,
                 static: bool = False, extra: bool = False) -> None:
        self.ops = None if op is None else frozenset([op] if isinstance(op, Op) else op)
        self.inputs = None if inputs is None else tuple(inputs)
        self.name, self.pred, self.static, self.extra = name, pred, static, extra
        self.alts: tuple[Pat, ...] = ()

    @classmethod
    def any(cls, name: str | None = None) -> Pat:
        """Any node, bound to ``name``."""
        return cls(name=name)

    @classmethod
    def weight(cls, name: str | None = None, pred: Callable[[ComputationNode], bool] | None = None) -> Pat:
        """A static node (``Const`` or an expression of ``Const`` nodes)."""
        return cls(name=name, pred=pred, static=True)

    def __or__(self, other: Pat) -> Pat:
        alt = Pat()
        alt.alts = (*(self.alts or (self,)), *(other.alts or (other,)))
        return alt

    def root_ops(self) -> frozenset[Op] | None:
        """Ops a matching root can have (``None``: any)."""
        if not self.alts:
            return self.ops
        sets = [a.root_ops() for a in self.alts]
        return None if any(s is None for s in sets) else frozenset().union(*sets)  # type: ignore[arg-type]

    def match(self, node: ComputationNode, static: set[ComputationNode] | None = None,
              bindings: Bindings | None = None) -> Iterator[Bindings]:
        """Every way ``node`` matches (bindings dicts); ``static`` is the set of weight nodes."""
        yield from self._match(node, dict(bindings or {}), static or set())

    def _match(self, node: ComputationNode, b: Bindings, static: set[ComputationNode]) -> Iterator[Bindings]:
        if self.alts:
            for a in self.alts:
                yield from a._match(node, b, static)
            return
        if (self.ops is not None and node.op not in self.ops) or (self.static and node not in static):
            return
        if self.pred is not None and not self.pred(node):
            return
        if self.name is not None:
            if self.name in b:
                if b[self.name] is not node:
                    return
            else:
                b = {**b, self.name: node}
        if self.inputs is None:
            yield b
            return
        n = len(self.inputs)
        if len(node.inputs) < n or (len(node.inputs) > n and not self.extra):
            return
        orders = [node.inputs[:n]]
        if n == 2 and len(node.inputs) == 2 and node.op in OpGroup.Commutative:
            orders.append(node.inputs[::-1])
        for ins in orders:
            yield from _match_seq(self.inputs, ins, b, static)

    def __repr__(self) -> str:
        if self.alts:
            return " | ".join(map(repr, self.alts))
        op = "*" if self.ops is None else "|".join(sorted(o.value for o in self.ops))
        ins = "" if self.inputs is None else "(" + ", ".join(map(repr, self.inputs)) + ")"
        return f"{op}{ins}{'@' + self.name if self.name else ''}"


def _match_seq(pats: Sequence[Pat], nodes: Sequence[ComputationNode], b: Bindings,
               static: set[ComputationNode]) -> Iterator[Bindings]:
    if not pats:
        yield b
        return
    for b1 in pats[0]._match(nodes[0], b, static):
        yield from _match_seq(pats[1:], nodes[1:], b1, static)


@dataclass
class Match:
    """A successful pattern match: the root and the bound nodes; ``extra`` carries data from check to rewrite."""

    root: ComputationNode
    bindings: Bindings
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ComputationNode:
        return self.bindings[name]

    def get(self, name: str) -> ComputationNode | None:
        """The node bound to ``name``, or ``None``."""
        return self.bindings.get(name)


class MatchResult:
    """Outcome of a check: truthy on success; ``.fail("why")`` makes it falsy and records why."""

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None

    def fail(self, reason: str) -> MatchResult:
        """Refuse the match, recording ``reason``; returns ``self``."""
        self.reason = reason
        return self

    def __bool__(self) -> bool:
        return self.reason is None

    def __repr__(self) -> str:
        return "MatchResult(ok)" if self else f"MatchResult(fail: {self.reason})"


Check = Callable[[Match, RewriteContext], MatchResult]
Rewrite = Callable[[Match, RewriteContext], "ComputationNode | None"]


@dataclass(frozen=True)
class Rule:
    """``pattern`` -> ``rewrite(match, ctx)``, when ``check`` accepts.

    ``rewrite`` returns the root's replacement, or ``None`` after recording its own edits
    with ``ctx.replace`` (a rule that replaces several nodes); no edit means no match.
    """

    name: str
    pattern: Pat
    rewrite: Rewrite
    check: Check | None = None
    doc: str = ""

    def try_match(self, node: ComputationNode, ctx: RewriteContext) -> tuple[Match | None, str | None]:
        """The first match of ``node`` that ``check`` accepts, else ``(None, reason of the first refusal)``."""
        reason = None
        for b in self.pattern.match(node, ctx.static):
            m = Match(node, b)
            res = self.check(m, ctx) if self.check is not None else MatchResult()
            if res:
                return m, None
            reason = reason or res.reason
        return None, reason


class RuleSet:
    """Rules applied together to a fixed point (tinygrad's ``PatternMatcher`` + ``graph_rewrite``)."""

    def __init__(self, rules: Iterable[Rule], max_iterations: int = 32) -> None:
        self.rules = list(rules)
        self.max_iterations = max_iterations
        self._by_op: dict[Op | None, list[Rule]] = {}
        for r in self.rules:
            ops = r.pattern.root_ops()
            for op in [None] if ops is None else sorted(ops, key=lambda o: o.value):
                self._by_op.setdefault(op, []).append(r)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(self.rules + other.rules, max(self.max_iterations, other.max_iterations))

    def _candidates(self, op: Op) -> list[Rule]:
        return self._by_op.get(op, []) + self._by_op.get(None, [])

    def apply(self, graph: Graph, options: Mapping[str, Any] | None = None) -> PassResult:
        """Rewrite ``graph`` in place to a fixed point; stats: ``fired``, ``refused``, ``iterations``, ``converged``."""
        t0 = time.perf_counter()
        fired: Counter[str] = Counter()
        refused: dict[str, str] = {}
        stats: dict[str, Any] = {}
        converged, iterations = False, 0
        for iterations in range(1, self.max_iterations + 1):  # noqa: B007 - reported after the loop
            ctx = RewriteContext(graph, options, stats)
            touched: set[ComputationNode] = set()
            for node in list(graph.nodes):
                for rule in self._candidates(node.op):
                    m, why = rule.try_match(node, ctx)
                    if m is None:
                        if why is not None:
                            refused[node.name] = f"{rule.name}: {why}"
                        continue
                    bound = {n for n in m.bindings.values() if n.op not in OpGroup.Leaf} | {node}
                    if bound & touched:
                        continue  # overlaps a rewrite of this sweep: retried in the next one
                    before = ctx.pending
                    new = rule.rewrite(m, ctx)  # the root's replacement, or edits made through ctx.replace
                    if new is not None:
                        ctx.replace(node, new)
                    if ctx.pending == before:
                        continue
                    touched |= bound
                    fired[rule.name] += 1
                    refused.pop(node.name, None)
                    break
            if not ctx.commit():
                converged = True
                break
        stats.update(fired=dict(fired), refused=refused, iterations=iterations, converged=converged,
                     time_s=time.perf_counter() - t0)
        return PassResult(graph, bool(fired), stats)
