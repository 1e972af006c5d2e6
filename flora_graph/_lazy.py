"""The one lazy-import mechanism: modules imported on first use, never at import time.

A package that must stay light to import (``import flora_graph`` does not import torch)
lists ``{public name: "module.path"}`` and installs :func:`lazy_exports`'s ``__getattr__``
and ``__dir__``; the first access imports the module and caches the value in the package.
:func:`import_on_demand` is the same step for registries whose entries live in modules
that register themselves when imported (the built-in backends of ``runtimes.compile``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["import_on_demand", "lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` resolving each name of ``exports`` from its module.

    ``exports`` maps a public name to the absolute module that defines it. A name not listed
    raises ``AttributeError`` as a plain module would.
    """
    namespace = import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_on_demand(exports[name]), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__


def import_on_demand(module: str) -> Any:
    """Import ``module`` (absolute) now, on first use of what it defines; return it."""
    return import_module(module)
