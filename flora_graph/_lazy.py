"""The one lazy-import mechanism: public names resolved from their submodule on first use.

A package that must stay light to import (``import flora_graph`` does not import torch)
lists ``{public name: "module.path"}`` and installs :func:`lazy_exports`'s ``__getattr__``
and ``__dir__``; the first access imports the module and caches the value in the package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` resolving each name of ``exports`` from its module.

    ``exports`` maps a public name to the absolute module that defines it. A name not listed
    raises ``AttributeError`` as a plain module would.
    """
    namespace = import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
