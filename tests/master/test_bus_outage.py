"""The event bus going away: the master outlives it and makes up what it missed.

Two masters share one PostgreSQL database. Master A reaches its event bus through a TCP
proxy the test cuts for longer than ``connect_timeout``, so every resubscription fails
meanwhile (``StorageError`` "not listening", driver errors); its storage stays reachable.
Master B stores a version during the outage: A misses the ``version.created`` event and
must still push the version to its agent once the bus is back."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy.engine import make_url

from nxmesh import hookimpl
from nxmesh.agent_link import AgentLink, Backoff, Endpoint, MemoryCredentialStore
from nxmesh.core.events import Event
from nxmesh.core.protocol import ConfigStatus, ConfigUpdate
from nxmesh.master.app import MasterServices, open_services
from nxmesh.master.orchestration import RolloutOrchestrator
from nxmesh.session_hub import MasterSessionHub
from nxmesh.testing import make_state
from nxmesh.testing.memory_transport import MemoryTransport

from .conftest import make_settings
from .tcpproxy import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

CONNECT_TIMEOUT = 1


class Hooks:
    """An ``nxmesh_on_event`` observer (fed by master A's event dispatcher)."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self._arrived: dict[str, anyio.Event] = {}

    def arrived(self, kind: str) -> anyio.Event:
        """Set once an event of `kind` arrived."""
        return self._arrived.setdefault(kind, anyio.Event())

    @hookimpl
    def nxmesh_on_event(self, event: Event) -> None:
        self.kinds.append(event.kind)
        self.arrived(event.kind).set()


class Failures:
    """Failed subscriptions, as they happen."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self._added = anyio.Event()

    def add(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self._added.set()
        self._added = anyio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.errors) < count:
            await self._added.wait()


def _count_failed_subscriptions(bus: Any, failures: Failures) -> None:
    real = bus.subscribe

    @contextlib.asynccontextmanager
    async def subscribe() -> AsyncIterator[Any]:
        try:
            cm = real()
            events = await cm.__aenter__()
        except Exception as exc:
            failures.add(exc)
            raise
        try:
            yield events
        finally:
            await cm.__aexit__(None, None, None)

    bus.subscribe = subscribe


async def _commit(services: MasterServices, port: int) -> int:
    result = await services.changes.commit(
        "default", lambda _old: make_state(1, port=port), author="tester", message=str(port)
    )
    return result.version.number


async def _update(link: AgentLink, number: int) -> ConfigUpdate:
    """The first update of version `number` (earlier ones, resent, are answered too)."""
    with anyio.fail_after(60):  # a bound, not a timing check
        while True:
            update = await link.updates.receive()
            status = ConfigStatus(version=update.version, digest=update.digest, phase="applied")
            link.send_status(status)
            if update.version == number:
                return update


async def test_master_survives_a_bus_outage_and_pushes_what_it_missed(
    pg_plugin_manager: Any,
    pg_database: str,
    postgres_proxy: TcpProxy,
    tmp_path: Path,
    template_state: Path,
    make_plugin_manager: Any,
) -> None:
    from nxmesh_storage_postgres import plugin

    hooks = Hooks()
    pm_a = make_plugin_manager(plugin, hooks)
    via_proxy = make_url(pg_database).set(host="127.0.0.1", port=postgres_proxy.port)
    # The same keys on both masters (one fleet): copies of one state directory.
    for name in ("a", "b"):
        shutil.copytree(template_state, tmp_path / name)
    timeout = {"plugins.storage_postgres.connect_timeout": CONNECT_TIMEOUT}
    settings_a = make_settings(
        pm_a,
        tmp_path / "a",
        storage_url=pg_database,
        event_bus_url=via_proxy.render_as_string(hide_password=False),
        **timeout,
    )
    settings_b = make_settings(
        pg_plugin_manager, tmp_path / "b", storage_url=pg_database, event_bus_url=pg_database,
        **timeout,
    )  # fmt: skip

    async with (
        open_services(pm_a, settings_a) as a,
        open_services(pg_plugin_manager, settings_b) as b,
        anyio.create_task_group() as tg,
    ):
        # The bus reads [plugins.storage_postgres] as the storage does.
        assert a.bus.settings.connect_timeout == CONNECT_TIMEOUT  # type: ignore[attr-defined]
        failures = Failures()
        _count_failed_subscriptions(a.bus, failures)
        hub = MasterSessionHub(a.enrollment, signing_key=a.signer.verify_key)
        # No periodic reconcile within the test: only the resubscription can catch up.
        orchestrator = RolloutOrchestrator(a, reconcile_interval=3600)
        orchestrator.attach(hub)
        a.orchestrator = orchestrator
        transport = MemoryTransport()
        await tg.start(orchestrator.run)
        await tg.start(a.run_event_dispatch)
        await tg.start(transport.serve, hub.handler("memory"))

        issued = await a.enrollment.create_token()
        link = AgentLink(
            [Endpoint(transport, "memory://")],
            MemoryCredentialStore(),
            bootstrap_token=issued.token,
            name="edge",
            backoff=Backoff(0.01, 0.05),
        )
        tg.start_soon(link.run_forever)
        with anyio.fail_after(10):
            await link.wait_registered()
        assert await _commit(a, 18001) == 1
        await _update(link, 1)

        postgres_proxy.stop()
        # Both subscribers (orchestrator, event hooks) find the bus down, more than once:
        # each failed attempt waited connect_timeout for the listener.
        with anyio.fail_after(60):
            await failures.wait_for(4)
        assert await _commit(b, 18002) == 2  # announced while A is not listening
        postgres_proxy.start()

        await _update(link, 2)
        # The event hooks follow the bus again too.
        arrived = hooks.arrived("after.outage")
        with anyio.fail_after(60):
            while not arrived.is_set():
                # Published before the hooks subscribed again, it is lost (as it should
                # be): published again until one arrives (a retry, not a timing check).
                await b.publish("after.outage", {}, workspace="default")
                with anyio.move_on_after(0.2):
                    await arrived.wait()
        tg.cancel_scope.cancel()
