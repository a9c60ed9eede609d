"""The database going away answers 503 ``storage-unavailable`` with ``Retry-After``, for
reads and writes, on PostgreSQL (the server behind a proxy the test cuts) and SQLite (a
real driver error); nothing is half-applied and the master recovers by itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from nxmesh.core.serialization import unstructure
from nxmesh.master.app import build_app
from nxmesh.master.problems import STORAGE_RETRY_AFTER
from nxmesh.testing import make_state

from .conftest import Master, make_settings
from .tcpproxy import TcpProxy

STATE = "/api/v1/workspaces/default/state"
VERSIONS = "/api/v1/workspaces/default/versions"


def _state(port: int) -> dict[str, Any]:
    body: dict[str, Any] = unstructure(make_state(port=port))
    return body


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == str(STORAGE_RETRY_AFTER)
    problem = response.json()
    assert problem["type"] == "urn:nxmesh:problem:storage-unavailable"
    assert problem["status"] == 503
    assert problem["detail"].startswith("storage unavailable")
    assert problem["request_id"] == response.headers["x-request-id"]


@pytest.fixture
def pg_master(
    pg_plugin_manager: Any, pg_database: str, postgres_proxy: TcpProxy, tmp_path: Path
) -> Iterator[Master]:
    """A master whose PostgreSQL is reached through `postgres_proxy`."""
    url = make_url(pg_database).set(host="127.0.0.1", port=postgres_proxy.port)
    settings = make_settings(
        pg_plugin_manager,
        tmp_path / "state",
        storage_url=url.render_as_string(hide_password=False),
        **{"plugins.storage_postgres.connect_timeout": 2},
    )
    with TestClient[Litestar](build_app(pm=pg_plugin_manager, settings=settings)) as client:
        yield Master(client)


@pytest.mark.postgres
class TestPostgresDown:
    def test_reads_and_writes_answer_503_then_recover(
        self, pg_master: Master, postgres_proxy: TcpProxy, pg_database: str
    ) -> None:
        """While the database is unreachable every request that needs it is a 503 with
        Retry-After (not a 500); the failed write left nothing behind; once the database
        is back, the same master serves again without a restart."""
        c, admin = pg_master.client, pg_master.headers("admin", subject="admin")
        assert c.put(STATE, json=_state(8080), headers=admin).status_code == 200
        before = c.get(VERSIONS, headers=admin).json()
        assert [v["number"] for v in before] == [1]
        made = c.post("/api/v1/auth/tokens", json={"name": "ci", "scopes": ["config:read"]},
                      headers=admin)  # fmt: skip
        assert made.status_code == 201, made.text
        api_token = {"Authorization": f"Bearer {made.json()['token']}"}

        postgres_proxy.stop()
        # Authenticating an API token reads the database too.
        assert_unavailable(c.get(VERSIONS, headers=api_token))
        assert_unavailable(c.get(VERSIONS, headers=admin))
        assert_unavailable(c.get("/api/v1/agents", headers=admin))
        assert_unavailable(c.put(STATE, json=_state(9090), headers=admin))
        assert_unavailable(c.post(f"{VERSIONS}/1/rollback", headers=admin))

        # Nothing of the refused writes reached the database.
        engine = create_engine(make_url(pg_database).set(drivername="postgresql+psycopg"))
        try:
            with engine.connect() as conn:
                count = conn.exec_driver_sql("SELECT count(*) FROM config_versions").scalar()
        finally:
            engine.dispose()
        assert count == 1

        postgres_proxy.start()
        assert c.get(VERSIONS, headers=admin).json() == before
        created = c.put(STATE, json=_state(9090), headers=admin)
        assert created.status_code == 200, created.text
        assert created.json()["version"]["number"] == 2


class TestSqliteDriverError:
    def test_driver_connection_error_is_503(
        self, master: Master, admin: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A real driver error (SQLite cannot open its file) is mapped the same way, for a
        read and for a write."""
        broken = create_engine(f"sqlite:///{tmp_path}/missing-dir/master.db")

        async def unreachable(*_args: Any, **_kwargs: Any) -> Any:
            with broken.connect():  # raises OperationalError: unable to open database file
                raise AssertionError("unreachable")

        storage = master.services.storage
        monkeypatch.setattr(storage, "list_versions", unreachable)
        monkeypatch.setattr(storage, "add_version", unreachable)
        assert_unavailable(master.client.get(VERSIONS, headers=admin))
        assert_unavailable(master.client.put(STATE, json=_state(8080), headers=admin))
        monkeypatch.undo()
        assert master.client.get(VERSIONS, headers=admin).json() == []

    def test_other_errors_stay_500(
        self, master: Master, admin: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Only storage failures are 503; a bug is still a 500 without Retry-After."""

        async def bug(*_args: Any, **_kwargs: Any) -> Any:
            raise KeyError("oops")

        monkeypatch.setattr(master.services.storage, "list_versions", bug)
        response = master.client.get(VERSIONS, headers=admin)
        assert response.status_code == 500
        assert "retry-after" not in response.headers
