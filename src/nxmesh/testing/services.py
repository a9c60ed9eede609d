"""Real services for tests: find them, or fail loudly in CI instead of skipping."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

ENV_CI = "CI"


def in_ci() -> bool:
    """True under CI (``CI`` set and not 0/false), where a missing service is a failure."""
    return os.environ.get(ENV_CI, "").strip().lower() not in ("", "0", "false", "no")


def missing_service(what: str) -> None:
    """Skip locally, fail in CI: CI must never pass by skipping a real-component test."""
    if in_ci():
        pytest.fail(f"{what} is required in CI but missing", pytrace=False)
    pytest.skip(f"{what} not available", allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """Import `name`, or skip/fail like a missing service (`pytest.importorskip` would
    skip in CI too, and CI must never pass by skipping)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_service(f"the Python module {name!r}")
        raise AssertionError("unreachable") from None  # pragma: no cover - skip/fail raised


def require_binary(name: str, *extra_dirs: str) -> str:
    """The path of executable `name` (also looked up in /usr/sbin, /sbin), or skip/fail."""
    path = shutil.which(name) or shutil.which(
        name, path=os.pathsep.join(["/usr/sbin", "/sbin", *extra_dirs])
    )
    if path is None:
        missing_service(f"the {name!r} binary")
        raise AssertionError("unreachable")  # pragma: no cover - skip/fail raised
    return path
