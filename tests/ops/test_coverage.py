"""The op tables are complete: every op has its rules, a doc and a case in its family's table.

Adding an op touches one family module of :mod:`flora_graph.ops` (schema, numpy, ONNX and torch
rules) and one row of ``tests/ops/test_<family>.py``; these tests say which row is missing.
"""

from __future__ import annotations

import pytest

from flora_graph.ir import Op, OpGroup
from flora_graph.ops import FAMILIES, OPS

from .harness import TESTED_FAMILIES, Case, build, family_tables


def ops_of(case: Case) -> set[Op]:
    """The non-leaf ops of ``case``'s graph."""
    return {n.op for n in build(case).nodes} - OpGroup.Leaf


def test_every_op_is_defined_once_with_callable_rules_and_a_doc() -> None:
    assert set(OPS) == set(Op) - OpGroup.Leaf
    for op, d in OPS.items():
        assert d.op is op and d.family in FAMILIES, (op, d.family)
        for rule in ("numpy", "onnx", "torch"):
            assert callable(getattr(d, rule)), (op, rule)
        assert isinstance(d.schema.doc, str) and d.schema.doc.strip(), f"{op.value}: schema without a doc"


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_family_table_covers_its_ops_and_only_its_ops(family: str) -> None:
    cases = family_tables()[family]
    mine = {op for op, d in OPS.items() if d.family == family}
    assert len({c.id for c in cases}) == len(cases), f"{family}: duplicate case ids"
    covered: set[Op] = set()
    for case in cases:
        ops = ops_of(case)
        assert ops & mine, f"case {case.id!r} in tests/ops/test_{family}.py tests no {family} op: {sorted(o.value for o in ops)}"
        covered |= ops
    missing = sorted(op.value for op in mine - covered)
    assert not missing, f"ops of family {family!r} without a case in tests/ops/test_{family}.py: {missing}"


def test_every_op_has_a_case() -> None:
    covered = {op for cases in family_tables().values() for c in cases for op in ops_of(c)}
    assert covered == {op for op, d in OPS.items() if d.family in TESTED_FAMILIES}  # adapters: test_adapters_family.py
    ids = [c.id for cases in family_tables().values() for c in cases]
    assert len(set(ids)) == len(ids), "case ids must be unique across the family tables"
