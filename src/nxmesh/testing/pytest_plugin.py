"""The ``nxmesh`` pytest plugin (entry point ``pytest11``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nxmesh.core.pluginmanager import NxMeshPluginManager, get_plugin_manager
from nxmesh.testing.hooks import PluginRegistrar
from nxmesh.testing.nginx import NginxInstance
from nxmesh.testing.services import missing_service, require_binary


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and trio. Without trio installed
    the trio runs are skipped — visibly — and fail in CI (`missing_service`)."""
    backend: str = request.param
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        missing_service("trio (anyio tests run on asyncio and trio)")
    return backend


@pytest.fixture
def make_plugin_manager() -> Callable[..., NxMeshPluginManager]:
    """Build an isolated plugin manager; keyword arguments go to `get_plugin_manager`.

    Third-party autoload is off unless asked for, so a test sees only the built-ins and
    the plugins it passes; the process environment is not read unless ``environ`` is given.
    """

    def factory(*plugins: object, **kwargs: Any) -> NxMeshPluginManager:
        kwargs.setdefault("autoload", False)
        kwargs.setdefault("environ", {})
        named = [(f"test-plugin-{i}", p) for i, p in enumerate(plugins)]
        return get_plugin_manager(plugins=named, **kwargs)

    return factory


@pytest.fixture
def plugin_manager(make_plugin_manager: Callable[..., NxMeshPluginManager]) -> NxMeshPluginManager:
    """A plugin manager with the built-in plugins only."""
    return make_plugin_manager()


@pytest.fixture
def register_plugin(plugin_manager: NxMeshPluginManager) -> Iterator[PluginRegistrar]:
    """``register_plugin(obj)`` registers `obj` on `plugin_manager` for this test only."""
    registrar = PluginRegistrar(plugin_manager)
    yield registrar
    registrar.undo()


@pytest.fixture
def nginx_binary() -> str:
    """Path of the real nginx binary (skipped locally, a failure in CI, when missing)."""
    return require_binary("nginx")


@pytest.fixture
def running_nginx(nginx_binary: str, tmp_path: Path) -> Iterator[NginxInstance]:
    """A real nginx serving 127.0.0.1:<free port> from its own prefix; stopped afterwards."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    instance = NginxInstance(binary=nginx_binary, prefix=prefix)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
