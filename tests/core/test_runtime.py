"""The runtime: lifespans in order, services in a task group, clean shutdown on both backends."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from nxmesh.core.errors import NxMeshError
from nxmesh.core.markers import hookimpl
from nxmesh.core.pluginmanager import NxMeshPluginManager, get_plugin_manager
from nxmesh.core.runtime import Runtime, Stash, StashKey, run, start_service
from nxmesh.core.settings import Settings

pytestmark = pytest.mark.anyio

BACKENDS = ["asyncio", "trio"]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test here runs on asyncio and on trio."""
    backend: str = request.param
    return backend


class Recorder:
    """A plugin whose lifespan records when it is entered and exited."""

    def __init__(self, name: str, events: list[str], *, cleanup_delay: float = 0.0) -> None:
        self.name = name
        self.events = events
        self.cleanup_delay = cleanup_delay

    @hookimpl
    def nxmesh_lifespan(self, runtime: Runtime) -> Any:
        @asynccontextmanager
        async def lifespan() -> AsyncIterator[None]:
            self.events.append(f"enter {self.name}")
            try:
                yield
            finally:
                # A real await during cleanup: only works if the exit is shielded.
                await anyio.sleep(self.cleanup_delay)
                self.events.append(f"exit {self.name}")

        return lifespan()


def manager(*plugins: object) -> NxMeshPluginManager:
    named = [(f"plugin-{i}", p) for i, p in enumerate(plugins)]
    return get_plugin_manager(autoload=False, plugins=named, environ={})


async def run_app(pm: NxMeshPluginManager, main: Any = None, **kwargs: Any) -> None:
    kwargs.setdefault("handle_signals", False)
    await run(pm, Settings(), main, **kwargs)


class TestLifespans:
    async def test_entered_in_registration_order_and_exited_in_reverse(self) -> None:
        """Lifespans enter in registration order, main runs inside them, they exit in reverse."""
        events: list[str] = []

        async def main(runtime: Runtime) -> None:
            events.append("main")

        pm = manager(Recorder("a", events), Recorder("b", events), Recorder("c", events))
        await run_app(pm, main)
        assert events == ["enter a", "enter b", "enter c", "main", "exit c", "exit b", "exit a"]

    async def test_exited_in_reverse_when_main_raises(self) -> None:
        """An error in main still exits every lifespan and reaches the caller unwrapped."""
        events: list[str] = []

        async def main(runtime: Runtime) -> None:
            raise ValueError("boom")

        pm = manager(Recorder("a", events), Recorder("b", events, cleanup_delay=0.01))
        with pytest.raises(ValueError, match="boom"):
            await run_app(pm, main)
        assert events == ["enter a", "enter b", "exit b", "exit a"]

    async def test_failed_entry_unwinds_entered_lifespans_and_skips_main(self) -> None:
        """A lifespan failing to start exits those already entered; main never runs."""
        events: list[str] = []

        class Broken:
            @hookimpl
            def nxmesh_lifespan(self) -> Any:
                @asynccontextmanager
                async def lifespan() -> AsyncIterator[None]:
                    raise RuntimeError("cannot start")
                    yield  # pragma: no cover

                return lifespan()

        async def main(runtime: Runtime) -> None:
            events.append("main")  # pragma: no cover - must not run

        with pytest.raises(RuntimeError, match="cannot start"):
            await run_app(manager(Recorder("a", events), Broken()), main)
        assert events == ["enter a", "exit a"]

    async def test_none_takes_no_part(self) -> None:
        """A plugin returning None from nxmesh_lifespan is skipped."""
        events: list[str] = []

        class Bystander:
            @hookimpl
            def nxmesh_lifespan(self) -> None:
                events.append("asked")

        await run_app(manager(Bystander(), Recorder("a", events)), _noop)
        assert events == ["asked", "enter a", "exit a"]

    async def test_not_a_context_manager_is_an_error(self) -> None:
        """Returning something that is not an async context manager says what to do."""

        class Wrong:
            @hookimpl
            def nxmesh_lifespan(self) -> object:
                return object()

        with pytest.raises(NxMeshError, match="not an async context manager"):
            await run_app(manager(Wrong()), _noop)

    async def test_cleanup_runs_when_shutdown_cancels(self) -> None:
        """A lifespan awaiting in its cleanup completes even though shutdown is a cancel."""
        events: list[str] = []

        async def main(runtime: Runtime) -> None:
            runtime.shutdown()
            await anyio.sleep_forever()

        await run_app(manager(Recorder("a", events, cleanup_delay=0.02)), main)
        assert events == ["enter a", "exit a"]

    async def test_hanging_cleanup_is_bounded_by_shutdown_timeout(self) -> None:
        """A lifespan whose cleanup never finishes is abandoned after shutdown_timeout."""
        events: list[str] = []

        class Stuck:
            @hookimpl
            def nxmesh_lifespan(self) -> Any:
                @asynccontextmanager
                async def lifespan() -> AsyncIterator[None]:
                    try:
                        yield
                    finally:
                        await anyio.sleep_forever()
                        events.append("unreachable")  # pragma: no cover

                return lifespan()

        with anyio.fail_after(5):  # a shutdown that waits for the stuck lifespan fails here
            await run_app(manager(Recorder("a", events), Stuck()), _noop, shutdown_timeout=0.05)
        assert events == ["enter a", "exit a"]

    async def test_lifespans_share_state_through_the_stash(self) -> None:
        """A value one lifespan stores under a StashKey is visible to later ones and main."""
        key = StashKey[int]("answer")
        seen: list[int] = []

        class Producer:
            @hookimpl
            def nxmesh_lifespan(self, runtime: Runtime) -> Any:
                @asynccontextmanager
                async def lifespan() -> AsyncIterator[None]:
                    runtime.stash[key] = 42
                    yield

                return lifespan()

        async def main(runtime: Runtime) -> None:
            seen.append(runtime.stash[key])

        await run_app(manager(Producer()), main)
        assert seen == [42]


class TestServices:
    async def test_service_started_by_a_lifespan_is_cancelled_before_it_exits(self) -> None:
        """A background service is cancelled at shutdown, before its lifespan's cleanup."""
        events: list[str] = []

        async def service(*, task_status: anyio.abc.TaskStatus[str]) -> None:
            task_status.started("ready")
            try:
                await anyio.sleep_forever()
            finally:
                events.append("service stopped")

        class WithService:
            @hookimpl
            def nxmesh_lifespan(self, runtime: Runtime) -> Any:
                @asynccontextmanager
                async def lifespan() -> AsyncIterator[None]:
                    events.append(await runtime.task_group.start(service))
                    yield
                    events.append("lifespan exit")

                return lifespan()

        await run_app(manager(WithService()), _noop)
        assert events == ["ready", "service stopped", "lifespan exit"]

    async def test_start_service_returns_the_started_value(self) -> None:
        """start_service waits for readiness and hands back what the service reported."""
        got: list[object] = []

        async def listener(port: int, *, task_status: anyio.abc.TaskStatus[int]) -> None:
            task_status.started(port + 1)
            await anyio.sleep_forever()

        async def main(runtime: Runtime) -> None:
            got.append(await start_service(runtime, listener, 8000))

        await run_app(manager(), main)
        assert got == [8001]

    async def test_crashing_service_stops_the_application(self) -> None:
        """A service error cancels main, exits lifespans and reaches the caller."""
        events: list[str] = []

        async def flaky(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            await anyio.sleep(0.01)
            raise OSError("connection lost")

        async def main(runtime: Runtime) -> None:
            await start_service(runtime, flaky)
            try:
                await anyio.sleep_forever()
            finally:
                events.append("main cancelled")

        with pytest.raises(OSError, match="connection lost"):
            await run_app(manager(Recorder("a", events)), main)
        assert events == ["enter a", "main cancelled", "exit a"]

    async def test_task_group_is_closed_after_run(self) -> None:
        """Starting a service after shutdown is an error, not an orphan task."""
        kept: list[Runtime] = []

        async def main(runtime: Runtime) -> None:
            assert runtime.running
            kept.append(runtime)

        await run_app(manager(), main)
        assert not kept[0].running
        with pytest.raises(NxMeshError, match="not running"):
            _ = kept[0].task_group


class TestShutdown:
    async def test_runtime_shutdown_stops_a_run_without_main(self) -> None:
        """Without main, run waits until shutdown() and then returns normally."""
        events: list[str] = []

        class Stopper:
            @hookimpl
            def nxmesh_lifespan(self, runtime: Runtime) -> Any:
                @asynccontextmanager
                async def lifespan() -> AsyncIterator[None]:
                    async def stop_soon() -> None:
                        await anyio.sleep(0.01)
                        runtime.shutdown()

                    runtime.task_group.start_soon(stop_soon)
                    yield

                return lifespan()

        with anyio.fail_after(5):
            await run_app(manager(Recorder("a", events), Stopper()))
        assert events == ["enter a", "exit a"]

    async def test_cancellation_from_the_caller_propagates(self) -> None:
        """Cancelling the caller's scope cancels run, cleans up, and is not swallowed."""
        events: list[str] = []
        reached_after_run = False

        async def cancel_once_entered(scope: anyio.CancelScope) -> None:
            # Wait for the lifespan rather than a fixed delay: under load a short
            # deadline could fire before the app has entered anything.
            while "enter a" not in events:
                await anyio.sleep(0.001)
            scope.cancel()

        with anyio.fail_after(10), anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_entered, scope)
                await run_app(manager(Recorder("a", events)))
                reached_after_run = True
        assert scope.cancelled_caught
        assert not reached_after_run
        assert events == ["enter a", "exit a"]

    async def test_a_lifespan_cannot_swallow_cancellation(self) -> None:
        """A lifespan that suppresses exceptions still lets the caller's cancellation through."""

        class Swallower:
            async def __aenter__(self) -> None:
                return None

            async def __aexit__(self, *exc_info: object) -> bool:
                return True

        class Plugin:
            @hookimpl
            def nxmesh_lifespan(self) -> Swallower:
                return Swallower()

        reached_after_run = False
        with anyio.move_on_after(0.05) as scope:
            await run_app(manager(Plugin()))
            reached_after_run = True
        assert scope.cancelled_caught
        assert not reached_after_run


class TestSignals:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_signal_to_self_stops_run_cleanly(self, backend: str, signum: int) -> None:
        """SIGTERM/SIGINT make run return normally after every lifespan exited."""
        events: list[str] = []

        async def main(runtime: Runtime) -> None:
            events.append("main")
            os.kill(os.getpid(), signum)
            await anyio.sleep_forever()

        pm = manager(Recorder("a", events))
        anyio.run(functools.partial(run, pm, Settings(), main), backend=backend)
        assert events == ["enter a", "main", "exit a"]

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_default_handler_restored_after_run(self, backend: str) -> None:
        """After run returns, SIGTERM has its previous handler again."""
        before = signal.getsignal(signal.SIGTERM)
        anyio.run(functools.partial(run, manager(), Settings(), _noop), backend=backend)
        assert signal.getsignal(signal.SIGTERM) is before


class TestStash:
    def test_typed_keys_store_and_return_values(self) -> None:
        """Values come back under their own key; a missing key raises or gives the default."""
        stash = Stash()
        count, name = StashKey[int]("count"), StashKey[str]("name")
        stash[count] = 3
        assert stash[count] == 3
        assert count in stash
        assert name not in stash
        assert stash.get(name, "none") == "none"
        assert stash.setdefault(name, "x") == "x"
        with pytest.raises(KeyError):
            stash[StashKey[int]("count")]  # same name, different key


async def _noop(runtime: Runtime) -> None:
    """A main that returns at once."""
