"""Meta-tests: every hook is documented, typed, tested and in the docs; every module imports
cleanly with warnings as errors."""

from __future__ import annotations

import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nxmesh
from nxmesh.core import hookspecs

ROOT = Path(__file__).resolve().parents[2]
HOOKS = sorted(
    name
    for name, obj in vars(hookspecs).items()
    if name.startswith("nxmesh_") and inspect.isfunction(obj)
)


def _test_sources() -> str:
    files = [
        *ROOT.glob("tests/**/*.py"),
        *ROOT.glob("plugins/*/tests/**/*.py"),
        *ROOT.glob("examples/*/tests/**/*.py"),
    ]
    return "\n".join(p.read_text() for p in files if p.name != Path(__file__).name)


def test_there_are_hooks_for_every_family() -> None:
    """Every family of the architecture table has at least one hook."""
    for family in (
        "addhooks",
        "add_settings",
        "configure",
        "storage",
        "transports",
        "authenticators",
        "renderers",
        "template_paths",
        "deployment_modes",
        "nginx_drivers",
        "health_checks",
        "event_buses",
        "validate_state",
        "lifespan",
        "before_apply",
        "after_apply",
        "on_event",
        "api_routes",
        "cli_commands",
    ):
        assert any(family in hook for hook in HOOKS), family


@pytest.mark.parametrize("name", HOOKS)
class TestEveryHook:
    def test_has_a_reference_docstring(self, name: str) -> None:
        """The docstring documents each parameter, how it is called, and versionadded."""
        func = getattr(hookspecs, name)
        doc = inspect.getdoc(func) or ""
        assert len(doc) > 80, f"{name} needs a real docstring"
        for param in inspect.signature(func).parameters:
            assert f":param {param}:" in doc, f"{name} does not document {param}"
        assert ".. versionadded::" in doc
        assert re.search(r"\b(Collected|firstresult|Historic|Stops at first)\b", doc), (
            f"{name} must say how results are combined"
        )

    def test_is_fully_annotated(self, name: str) -> None:
        """Every parameter and the return value carry annotations."""
        func = getattr(hookspecs, name)
        sig = inspect.signature(func)
        assert sig.return_annotation is not inspect.Signature.empty
        for param in sig.parameters.values():
            assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name})"

    def test_has_a_test(self, name: str) -> None:
        """Some test outside this file uses the hook by name."""
        assert name in _test_sources(), f"no test mentions {name}"

    def test_appears_in_the_docs(self, name: str) -> None:
        """docs/hooks.md documents the hook."""
        assert f"## `{name}" in (ROOT / "docs" / "hooks.md").read_text()


def test_hook_docs_are_up_to_date() -> None:
    """docs/hooks.md is exactly what docs/gen_hooks.py generates from the specs."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_hooks.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Alembic's env.py and revision files are scripts Alembic executes, not importable modules.
NOT_MODULES = (".migrations",)


def _all_modules() -> list[str]:
    names = []
    for module in pkgutil.walk_packages(nxmesh.__path__, "nxmesh."):
        if not any(part in module.name for part in NOT_MODULES):
            names.append(module.name)
    return sorted(names)


def test_every_module_imports_with_warnings_as_errors() -> None:
    """Importing each module of nxmesh and of the plugin distributions raises no warning."""
    plugin_pkgs = [
        "nxmesh_storage_postgres",
        "nxmesh_transport_grpc",
        "nxmesh_deploy_k8s",
        "nxmesh_auth_oauth2",
        "nxmesh_hello",
    ]
    code = (
        "import importlib, pkgutil, sys\n"
        f"names = {_all_modules()!r}\n"
        f"for pkg in {plugin_pkgs!r}:\n"
        "    mod = importlib.import_module(pkg)\n"
        "    names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 20
