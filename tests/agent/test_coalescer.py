"""Reload coalescing: bursts collapse into few applies of the newest update."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest

from nxmesh.agent.applier import Applier
from nxmesh.agent.coalescer import Coalescer
from nxmesh.agent.harness import NginxStack
from nxmesh.config.versions import state_digest
from nxmesh.core.model import ApplyReport, PendingApply
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.testing.factories import make_state

pytestmark = pytest.mark.anyio


def _update(version: int) -> PendingApply:
    state = make_state(1)
    return PendingApply(version=version, digest=state_digest(state), state=state)


class _Recorder:
    """The apply function under the coalescer: records versions, takes `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.versions: list[int] = []
        self.started: list[float] = []
        self.busy = anyio.Event()

    async def __call__(self, update: PendingApply) -> ApplyReport:
        self.started.append(time.monotonic())
        self.versions.append(update.version)
        self.busy.set()
        await anyio.sleep(self.delay)
        return ApplyReport(
            agent_id="a", version=update.version, digest=update.digest, outcome="applied"
        )


async def _run(coalescer: Coalescer, body: object) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(coalescer.run)
        await body()  # type: ignore[operator]
        tg.cancel_scope.cancel()


class TestCoalescer:
    async def test_a_burst_is_one_apply_of_the_newest(self) -> None:
        """Twenty updates inside the debounce window make one apply, of the last."""
        record = _Recorder()
        coalescer = Coalescer(record, debounce=0.05, min_interval=0)

        async def burst() -> None:
            for version in range(1, 21):
                coalescer.submit(_update(version))
                await anyio.lowlevel.checkpoint()
            await coalescer.wait_idle()

        await _run(coalescer, burst)
        assert record.versions == [20]
        assert coalescer.superseded == 19

    async def test_updates_during_an_apply_collapse_into_the_next(self) -> None:
        """While an apply runs, later updates wait and only the newest of them runs next."""
        record = _Recorder(delay=0.2)
        coalescer = Coalescer(record, debounce=0.01, min_interval=0)

        async def during() -> None:
            coalescer.submit(_update(1))
            await record.busy.wait()
            for version in range(2, 7):
                coalescer.submit(_update(version))
            await coalescer.wait_idle()

        await _run(coalescer, during)
        assert record.versions == [1, 6]

    async def test_reloads_are_rate_limited(self) -> None:
        """Two applies start at least min_interval apart even when updates come faster."""
        record = _Recorder()
        coalescer = Coalescer(record, debounce=0.0, min_interval=0.3)

        async def spaced() -> None:
            coalescer.submit(_update(1))
            await coalescer.wait_idle()
            coalescer.submit(_update(2))
            await coalescer.wait_idle()

        await _run(coalescer, spaced)
        assert record.versions == [1, 2]
        assert record.started[1] - record.started[0] >= 0.3

    async def test_a_steady_stream_is_still_applied(self) -> None:
        """Updates closer together than the debounce do not starve: max_delay forces one."""
        record = _Recorder()
        coalescer = Coalescer(record, debounce=0.05, min_interval=0, max_delay=0.2)

        async def stream() -> None:
            with anyio.move_on_after(0.6):
                version = 0
                while True:
                    version += 1
                    coalescer.submit(_update(version))
                    await anyio.sleep(0.02)
            assert record.versions  # applied while the stream was still flowing

        await _run(coalescer, stream)

    async def test_a_crashing_apply_does_not_stop_later_ones(self) -> None:
        """An exception in one apply is logged; the next update is applied normally."""
        calls: list[int] = []

        async def flaky(update: PendingApply) -> ApplyReport:
            calls.append(update.version)
            if update.version == 1:
                raise RuntimeError("boom")
            return ApplyReport(agent_id="a", version=2, digest=update.digest, outcome="applied")

        coalescer = Coalescer(flaky, debounce=0, min_interval=0)

        async def two() -> None:
            coalescer.submit(_update(1))
            await coalescer.wait_idle()
            coalescer.submit(_update(2))
            await coalescer.wait_idle()

        await _run(coalescer, two)
        assert calls == [1, 2]


@pytest.mark.nginx
class TestBurstAgainstRealNginx:
    async def test_twenty_updates_cost_at_most_two_reloads(
        self, stack: NginxStack, plugin_manager: NxMeshPluginManager
    ) -> None:
        """A burst of 20 versions (some during an apply) reloads nginx at most twice."""
        applier = Applier(plugin_manager, stack.driver, stack.renderer, events=stack.events)
        coalescer = Coalescer(applier.apply, debounce=0.05, min_interval=0.1)
        updates = [stack.update(stack.state(f"v{i}")) for i in range(1, 21)]

        async def burst() -> None:
            for i, update in enumerate(updates):
                coalescer.submit(update)
                # Half the burst arrives quickly, the rest while the first apply runs.
                await anyio.sleep(0 if i < 10 else 0.01)
            await coalescer.wait_idle()

        await _run(coalescer, burst)
        reloads = stack.events.events("reload")
        assert 1 <= len(reloads) <= 2
        assert all(e.kind == "reload.ok" for e in reloads)
        assert await stack.body() == "v20"
        assert coalescer.last_report is not None
        assert coalescer.last_report.version == 20
