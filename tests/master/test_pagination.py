"""Cursor pagination of ``GET /agents`` and ``GET /audit`` (and the ``Link`` of
``GET /versions``): pages in key order with a ``rel="next"`` link, limits and cursors
checked, the caller's workspaces filtered in the query, the client following the links —
on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from nxmesh.client.api import Client
from nxmesh.client.credentials import Profile
from nxmesh.core.model import Agent
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.records import AuditEntry
from nxmesh.master.api.paging import encode_cursor
from nxmesh.master.app import build_app
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.sql.backend import SqlStorage
from nxmesh.testing import make_version

from .conftest import CUSTOM_ROLES, Master, make_settings

AGENTS = "/api/v1/agents"
AUDIT = "/api/v1/audit"


def _agent(i: int, workspace: str = "default") -> Agent:
    return Agent(
        id=f"agent-{i:04d}",
        name=f"a{i}",
        workspace=workspace,
        labels={"n": str(i)},
        status="online",
        last_seen=time.time(),
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_master(
    request: pytest.FixtureRequest,
    plugin_manager: NxMeshPluginManager,
    tmp_path: Path,
    template_state: Path,
) -> Iterator[Master]:
    """A master on SQLite, then one on PostgreSQL (its own new database)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("master")
        return
    pm = request.getfixturevalue("pg_plugin_manager")
    url = request.getfixturevalue("pg_database")
    settings = make_settings(
        pm, tmp_path / "pg-state", storage_url=url, **{"auth.roles": CUSTOM_ROLES}
    )
    with TestClient[Litestar](build_app(pm=pm, settings=settings)) as client:
        yield Master(client)


def _fill(master: Master, agents: list[Agent]) -> None:
    async def fill() -> None:
        for agent in agents:
            await master.services.storage.upsert_agent(agent)

    master.call(fill)


def _pages(master: Master, url: str, headers: dict[str, str]) -> list[list[dict[str, Any]]]:
    pages = []
    next_url: str | None = url
    while next_url is not None:
        response = master.client.get(next_url, headers=headers)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        next_url = response.links.get("next", {}).get("url")
    return pages


class TestAgentPages:
    def test_pages_in_id_order_until_no_link(self, any_master: Master) -> None:
        """Default 100 per page, by id, every agent exactly once; the last page has no
        Link; an exact multiple of the limit ends with an empty page."""
        _fill(any_master, [_agent(i) for i in reversed(range(250))])
        admin = any_master.headers("admin", subject="admin")
        pages = _pages(any_master, AGENTS, admin)
        assert [len(p) for p in pages] == [100, 100, 50]
        ids = [a["id"] for p in pages for a in p]
        assert ids == [f"agent-{i:04d}" for i in range(250)]

        pages = _pages(any_master, f"{AGENTS}?limit=125", admin)
        assert [len(p) for p in pages] == [125, 125, 0]

    def test_link_keeps_filter_and_limit(self, any_master: Master) -> None:
        _fill(any_master, [_agent(i, "staging" if i % 2 else "default") for i in range(30)])
        admin = any_master.headers("admin", subject="admin")
        first = any_master.client.get(AGENTS, params={"workspace": "staging", "limit": 10},
                                      headers=admin)  # fmt: skip
        link = first.links["next"]["url"]
        assert link.startswith(f"{AGENTS}?")
        assert "workspace=staging" in link
        assert "limit=10" in link
        pages = _pages(any_master, f"{AGENTS}?workspace=staging&limit=10", admin)
        ids = [a["id"] for p in pages for a in p]
        assert ids == [f"agent-{i:04d}" for i in range(1, 30, 2)]

    def test_changes_between_pages_neither_repeat_nor_skip(self, any_master: Master) -> None:
        """The cursor seeks past the last id served: an agent added before it or one
        deleted does not shift the next page."""
        _fill(any_master, [_agent(i) for i in range(0, 40, 2)])
        admin = any_master.headers("admin", subject="admin")
        first = any_master.client.get(AGENTS, params={"limit": 10}, headers=admin)
        served = [a["id"] for a in first.json()]
        _fill(any_master, [_agent(1)])  # sorts before the cursor
        any_master.call(any_master.services.storage.delete_agent, "agent-0020")
        rest = _pages(any_master, first.links["next"]["url"], admin)
        later = [a["id"] for p in rest for a in p]
        assert served == [f"agent-{i:04d}" for i in range(0, 20, 2)]
        assert later == [f"agent-{i:04d}" for i in range(22, 40, 2)]

    def test_only_the_callers_workspaces_and_full_pages(self, any_master: Master) -> None:
        """A caller reading one workspace gets full pages of its agents (filtered in the
        query, not after the limit); a scoped API token is narrowed the same way."""
        _fill(any_master, [_agent(i, "staging" if i % 3 == 0 else "prod") for i in range(60)])
        # The custom role "deployer" reads agents in staging only.
        deployer = any_master.headers("deployer", subject="dep")
        pages = _pages(any_master, f"{AGENTS}?limit=5", deployer)
        ids = [a["id"] for p in pages for a in p]
        assert ids == [f"agent-{i:04d}" for i in range(0, 60, 3)]
        assert all(len(p) == 5 for p in pages[:-1])

        services = any_master.services
        principal_token = services.auth.tokens.issue(
            "viewer", ("viewer@prod",), authenticator="password"
        ).token
        viewer = {"Authorization": f"Bearer {principal_token}"}
        prod = [a["id"] for p in _pages(any_master, AGENTS, viewer) for a in p]
        assert prod == [f"agent-{i:04d}" for i in range(60) if i % 3]

    @pytest.mark.parametrize(
        ("query", "field"),
        [
            ({"limit": 0}, "query.limit"),
            ({"limit": 1001}, "query.limit"),
            ({"limit": "ten"}, "query.limit"),
            ({"cursor": "not base64!"}, "query.cursor"),
            ({"cursor": encode_cursor("no spaces in ids")}, "query.cursor"),
            ({"cursor": "x" * 401}, "query.cursor"),
        ],
    )
    def test_bad_limit_or_cursor_names_the_field(
        self, master: Master, admin: dict[str, str], query: dict[str, Any], field: str
    ) -> None:
        response = master.client.get(AGENTS, params=query, headers=admin)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert [e["path"] for e in response.json()["errors"]] == [field]

    @pytest.mark.parametrize(
        ("method", "url", "field", "message"),
        [
            ("GET", f"{AGENTS}?limit=ten", "query.limit", "must be an integer, got 'ten'"),
            ("GET", f"{AGENTS}?limit=0", "query.limit", "must be at least 1, got '0'"),
            ("GET", f"{AGENTS}/a1/why?version=abc", "query.version", "must be an integer"),
            ("GET", f"{AGENTS}/a1/why", "query.version", "is required"),
            (
                "PUT",
                "/api/v1/workspaces/default/state?dry_run=yes",
                "query.dry_run",
                "must be true or false, got 'yes'",
            ),
        ],
    )
    def test_parameter_errors_say_what_the_value_must_be(
        self, master: Master, admin: dict[str, str], method: str, url: str, field: str,
        message: str,
    ) -> None:  # fmt: skip
        """Parameters Litestar parses get this API's words (not msgspec's "Expected
        `int`, got `str`"), and a missing one is a 422 naming it, like any field."""
        response = master.client.request(method, url, headers=admin, json={})
        assert response.status_code == 422, response.text
        [error] = response.json()["errors"]
        assert error["path"] == field
        assert error["message"].startswith(message)

    def test_openapi_documents_paging(self, master: Master) -> None:
        doc = master.client.get("/openapi.json").json()
        op = doc["paths"][AGENTS]["get"]
        params = {p["name"]: p for p in op["parameters"]}
        assert params["limit"]["schema"]["maximum"] == 1000
        assert "cursor" in params
        assert "Link" in op["responses"]["200"]["headers"]


class _Transport(httpx.BaseTransport):
    """The test client's ASGI transport, closable (as `Client.close` expects)."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self.inner = client._transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)


class TestClientFollowsPages:
    def test_list_agents_reads_every_page(self, any_master: Master) -> None:
        """`Client.list_agents` (behind ``nxmesh agents list``) follows the links."""
        _fill(any_master, [_agent(i) for i in range(230)])
        profile = Profile(
            url="http://testserver.local",
            access_token=any_master.token("admin", subject="admin"),
            access_expires_at=time.time() + 3600,
        )
        with Client(profile, transport=_Transport(any_master.client)) as client:
            agents = client.list_agents()
            assert [a.id for a in agents] == [f"agent-{i:04d}" for i in range(230)]
            assert len(client.list_agents("default")) == 230


class TestVersionPages:
    def test_versions_link_pages_back(self, master: Master, admin: dict[str, str]) -> None:
        async def add() -> None:
            for n in range(1, 8):
                await master.services.storage.add_version(make_version(number=n))

        master.call(add)
        url = "/api/v1/workspaces/default/versions?limit=3"
        pages = _pages(master, url, admin)
        assert [[v["number"] for v in p] for p in pages] == [[7, 6, 5], [4, 3, 2], [1]]


class TestAuditPages:
    def test_audit_pages_back_in_append_order(self, any_master: Master) -> None:
        """Newest first, a page at a time with the ``since`` filter kept in the link,
        every entry once; entries appended meanwhile do not shift the pages."""

        async def add(first: int, count: int) -> None:
            for i in range(first, first + count):
                entry = AuditEntry(ts=1000.0 + i, actor="alice", action="test.step")
                await any_master.services.storage.append_audit(entry)

        any_master.call(add, 0, 25)
        admin = any_master.headers("admin", subject="admin")
        first = any_master.client.get(AUDIT, params={"limit": 10, "since": 1003}, headers=admin)
        assert "since=1003" in first.links["next"]["url"]
        any_master.call(add, 100, 3)  # newer than every page still to come
        rest = _pages(any_master, first.links["next"]["url"], admin)
        seen = [e["ts"] for e in first.json()] + [e["ts"] for p in rest for e in p]
        assert seen == [1000.0 + i for i in range(24, 2, -1)]
        assert [len(p) for p in rest] == [10, 2]

    @pytest.mark.parametrize(
        "cursor", ["not base64!", encode_cursor("no spaces in ids"), "x" * 401]
    )
    def test_bad_cursor_names_the_field(
        self, master: Master, admin: dict[str, str], cursor: str
    ) -> None:
        response = master.client.get(AUDIT, params={"cursor": cursor}, headers=admin)
        assert response.status_code == 422, response.text
        assert [e["path"] for e in response.json()["errors"]] == ["query.cursor"]


@pytest.mark.anyio
class TestStoragePages:
    """`SqlStorage.list_agents` with a page: seek, limit, workspace sets."""

    @pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
    async def storage(self, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
        if request.param == "sqlite":
            store: SqlStorage = SqliteStorage(f"sqlite:///{tmp_path}/m.db")
        else:
            from nxmesh_storage_postgres import PostgresStorage

            store = PostgresStorage(request.getfixturevalue("pg_database"))
        await store.open()
        try:
            yield store
        finally:
            await store.aclose()

    async def test_seek_limit_and_workspaces(self, storage: SqlStorage) -> None:
        for i in range(12):
            await storage.upsert_agent(_agent(i, ("a", "b", "c")[i % 3]))
        page = await storage.list_agents(after="agent-0003", limit=4)
        assert [a.id for a in page] == ["agent-0004", "agent-0005", "agent-0006", "agent-0007"]
        page = await storage.list_agents(workspaces={"a", "c"}, limit=100)
        assert [a.id for a in page] == [f"agent-{i:04d}" for i in range(12) if i % 3 != 1]
        assert await storage.list_agents(workspaces=set()) == []
        page = await storage.list_agents("b", workspaces={"a", "b"}, after="agent-0004")
        assert [a.id for a in page] == ["agent-0007", "agent-0010"]
        assert len(await storage.list_agents()) == 12
