"""Lazy package exports: keep ``import package`` cheap for processes that never use it.

Every plugin's entry-point module is imported at start-up by every process (an agent
loads the PostgreSQL and ACME plugins too), so a package ``__init__`` that eagerly
imports SQLAlchemy or ``acme`` costs each agent tens of megabytes. Packages declare
their public names here and the defining module is imported on first attribute access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for `package` (PEP 562).

    :param exports: public name → module (absolute, or relative to `package` with ``.``).
    """

    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # cache: later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        # Everything the module defines too: pluggy finds hook implementations by dir().
        return sorted({*importlib.import_module(package).__dict__, *exports})

    return __getattr__, __dir__
