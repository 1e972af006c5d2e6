"""Kill a writer at a commit boundary: a forked child runs it with :data:`flora_graph.storage._fault_hook`
set to ``os._exit`` at the n-th boundary, as a ``kill -9`` there would (no ``finally``, no cleanup)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from flora_graph import storage

KILLED = 77


def boundaries(write: Callable[[], object]) -> list[str]:
    """The labels of the boundaries ``write()`` passes, in order (``write`` runs here, to completion)."""
    labels: list[str] = []
    storage._fault_hook = labels.append
    try:
        write()
    finally:
        storage._fault_hook = None
    return labels


def kill_at(write: Callable[[], object], index: int) -> None:
    """Run ``write()`` in a forked child that dies (``os._exit``) at its ``index``-th boundary."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            seen = [0]

            def hook(label: str) -> None:
                if seen[0] == index:
                    os._exit(KILLED)
                seen[0] += 1

            storage._fault_hook = hook
            write()
            code = 0
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED, f"the writer was not killed at boundary #{index}"


def hidden(folder: Path) -> list[str]:
    """Hidden entries (temporaries) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))
