"""Fixtures of the master tests: a real master (SQLite in a tmp dir) behind Litestar's
TestClient, and helpers to act as users with given roles."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from nxmesh.core.pluginmanager import NxMeshPluginManager, get_plugin_manager
from nxmesh.core.records import User
from nxmesh.core.settings import Settings, load_settings
from nxmesh.master.app import MasterServices, build_app
from nxmesh.testing.services import missing_service

from .tcpproxy import TcpProxy

T = TypeVar("T")

# Cheap argon2 costs: these tests hash hundreds of passwords; production keeps RFC 9106's.
FAST_HASHING = {
    "auth.argon2_time_cost": 1,
    "auth.argon2_memory_kib": 8,
    "auth.argon2_parallelism": 1,
}
CUSTOM_ROLES = {
    "deployer": ["config:read", "config:write", "agent:read@staging", "event:read"],
    "helpdesk": ["user:read", "user:write"],  # manages users, holds nothing else
}


def make_settings(pm: NxMeshPluginManager, state_dir: Path, **overrides: object) -> Settings:
    """Settings for a master whose state lives in `state_dir`."""
    return load_settings(
        pm,
        environ={},
        overrides={"state_dir": str(state_dir), **FAST_HASHING, **overrides},
    )


class Master:
    """A running master app and ways to call it as someone."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self.client = client

    @property
    def services(self) -> MasterServices:
        services: MasterServices = self.client.app.state.services
        return services

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine function on the app's event loop (storage calls...)."""
        return self.client.blocking_portal.call(fn, *args)

    def token(self, *roles: str, subject: str = "tester") -> str:
        """An access token for `subject` holding `roles` (no user record needed)."""
        issued = self.services.auth.tokens.issue(subject, roles, authenticator="password")
        return issued.token

    def headers(self, *roles: str, subject: str = "tester") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(*roles, subject=subject)}"}

    def add_user(self, username: str, password: str, *roles: str, disabled: bool = False) -> User:
        services = self.services
        user = User(
            username=username,
            password_hash=services.auth.passwords.hash(password),
            roles=roles,
            disabled=disabled,
        )
        self.call(services.storage.put_user, user)
        return user

    def admin_password(self) -> str:
        return (self.services.state_dir / "initial-admin-password").read_text().strip()


@pytest.fixture(scope="session")
def template_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory after a first start (keys, migrated database, admin), made once.

    Copying it is several times faster than a first start (RSA key, migrations), and the
    tests that are about the first start make their own.
    """
    pm = get_plugin_manager(autoload=False, environ={})
    state = tmp_path_factory.mktemp("template") / "state"
    with TestClient(build_app(pm=pm, settings=make_settings(pm, state))):
        pass
    return state


@pytest.fixture
def master_settings(
    plugin_manager: NxMeshPluginManager, tmp_path: Path, template_state: Path
) -> Settings:
    shutil.copytree(template_state, tmp_path / "state")
    return make_settings(plugin_manager, tmp_path / "state", **{"auth.roles": CUSTOM_ROLES})


@pytest.fixture
def master(plugin_manager: NxMeshPluginManager, master_settings: Settings) -> Iterator[Master]:
    """A fresh master on asyncio with its own state directory."""
    app = build_app(pm=plugin_manager, settings=master_settings)
    with TestClient(app) as client:
        yield Master(client)


@pytest.fixture
def admin(master: Master) -> dict[str, str]:
    """Headers of an admin."""
    return master.headers("admin", subject="admin")


# -- PostgreSQL ---------------------------------------------------------------------------

PG_ADMIN_URL = os.environ.get(
    "NXMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    """An autocommit connection to the maintenance database (skip/fail without one)."""
    import psycopg

    try:
        conn = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        missing_service("PostgreSQL on 127.0.0.1:5432")
        raise AssertionError("unreachable") from None  # pragma: no cover
    with conn:
        yield conn


@pytest.fixture
def pg_database(pg_admin: Any) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database for this test only."""
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"nxmesh_master_{secrets.token_hex(6)}"
    pg_admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        pg_admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def pg_plugin_manager(make_plugin_manager: Callable[..., NxMeshPluginManager]) -> Any:
    """Built-ins plus the PostgreSQL storage plugin."""
    from nxmesh_storage_postgres import plugin

    return make_plugin_manager(plugin)


@pytest.fixture
def postgres_proxy() -> Iterator[TcpProxy]:
    """A TCP proxy in front of the real PostgreSQL (127.0.0.1:5432) that a test can cut
    (`TcpProxy.stop`) and restore (`start`): a database outage without stopping it."""
    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.start()
    yield proxy
    proxy.stop()
