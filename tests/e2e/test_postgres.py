"""The end-to-end rollout on PostgreSQL: a fresh database, two master processes sharing it
(LISTEN/NOTIFY event bus), one agent on each, real nginx.

A version stored through one master reaches the agent connected to the *other* master:
each master pushes to its own agents after learning about the version on the bus.
Needs PostgreSQL on 127.0.0.1:5432 (``NXMESH_TEST_POSTGRES_URL``): skipped locally, a
failure in CI, when it is not there.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from nxmesh.testing.services import missing_service, require_module

from .conftest import Agent, Fleet, Master, site_state, wait_for

pytestmark = [pytest.mark.nginx, pytest.mark.postgres]

ADMIN_URL = os.environ.get(
    "NXMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def database() -> Iterator[str]:
    """A new, empty database for this test, dropped afterwards."""
    psycopg = require_module("psycopg")
    from psycopg import sql
    from sqlalchemy.engine import make_url

    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        missing_service("PostgreSQL on 127.0.0.1:5432")
        raise AssertionError("unreachable") from None  # pragma: no cover
    name = f"nxmesh_e2e_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pg_fleet(database: str, tmp_path: Path, e2e_nginx: str) -> Iterator[Fleet]:
    first = Master(tmp_path / "master-a", storage_url=database, event_bus_url=database)
    second = Master(tmp_path / "master-b", storage_url=database, event_bus_url=database)
    fleet = Fleet(first, [])
    try:
        first.start()
        second.share_keys_with(first)
        second.start()
        for i, master in enumerate((first, second)):
            agent = Agent(tmp_path / f"agent-{i}", f"agent-{i}", f"127.0.0.{i + 2}", master,
                          "websocket" if i else "grpc", e2e_nginx)  # fmt: skip
            fleet.agents.append(agent)
            agent.start(first.token(node=agent.name))
        fleet.extra = [second]

        def enrolled() -> bool:
            return sum(a["status"] == "online" for a in first.agents()) == 2

        wait_for("2 agents to enroll", enrolled, timeout=30, logs=fleet.logs)
        yield fleet
    finally:
        second.kill9()
        fleet.close()


def test_rollout_on_postgres_through_two_masters(pg_fleet: Fleet) -> None:
    """Stored through master A, applied by the agents of master A *and* master B."""
    a = pg_fleet.master
    version = a.put_state(site_state(pg_fleet.web_port, "hello postgres"), "pg")
    view = a.wait_converged(version["number"], agents=2, logs=pg_fleet.logs)
    assert {x["status"]["phase"] for x in view["agents"]} <= {"applied", "noop"}
    pg_fleet.wait_bodies("hello postgres")
    [b] = pg_fleet.extra
    assert b.metric("nxmesh_master_connected_agents", transport="websocket") == 1
    assert b.metric("nxmesh_master_pushes_total", outcome="sent") >= 1
