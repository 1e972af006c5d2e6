"""Shared fixtures of the JIT tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from flora_graph.torch_jit import dynamo


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches and the flora_graph backend's counters reset before and after a test."""
    torch._dynamo.reset()
    dynamo.reset_stats()
    yield
    torch._dynamo.reset()
