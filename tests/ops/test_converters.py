"""The table rows with ``capture=(overloads...)``: their torch expression captured through those ATen converters.

Such a row tests an op end to end with one line: the converter (capture of ``ref``), the
numpy rule (against ``ref``) and, in its family module, every backend.
"""

from __future__ import annotations

import pytest

from .harness import Case, all_cases, case_id, check_capture

CAPTURED = [c for c in all_cases() if c.capture]


@pytest.mark.parametrize("case", CAPTURED, ids=case_id)
def test_captured_expression_matches_torch(case: Case) -> None:
    check_capture(case)


def test_some_rows_are_captured() -> None:
    assert CAPTURED
