"""The health monitor: typed reports from every check, sent on interval and on change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import anyio
import pytest

from nxmesh.agent.harness import NginxStack
from nxmesh.agent.health import HealthMonitor
from nxmesh.core.model import HealthReport, HealthResult
from nxmesh.plugins.health_basic import NginxProcessCheck
from nxmesh.plugins.health_nginx import StubStatusCheck, SystemCheck

pytestmark = pytest.mark.anyio


class _Flip:
    """A check whose status the test sets."""

    name: ClassVar[str] = "flip"

    def __init__(self) -> None:
        self.status = "ok"

    async def run(self) -> Sequence[HealthResult]:
        return [HealthResult(check=self.name, status=self.status)]  # type: ignore[arg-type]


class _Broken:
    name: ClassVar[str] = "broken"

    async def run(self) -> Sequence[HealthResult]:
        raise RuntimeError("probe crashed")


class _Hung:
    name: ClassVar[str] = "hung"

    async def run(self) -> Sequence[HealthResult]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class TestMonitor:
    async def test_a_failing_or_hanging_check_becomes_a_fail_result(self) -> None:
        """A raising check and a hung one are reported as failures; others still run."""
        monitor = HealthMonitor([_Flip(), _Broken(), _Hung()], check_timeout=0.2)
        report = await monitor.collect()
        by_check = {r.check: r for r in report.results}
        assert by_check["flip"].status == "ok"
        assert by_check["broken"].status == "fail"
        assert "probe crashed" in by_check["broken"].message
        assert by_check["hung"].status == "fail"
        assert "timed out" in by_check["hung"].message
        assert report.status == "fail"

    async def test_reports_are_sent_on_change_and_on_interval(self) -> None:
        """A status change is sent at once; an unchanged one only when the interval is due."""
        flip = _Flip()
        monitor = HealthMonitor([flip], interval=3600)
        sent: list[HealthReport] = []
        monitor.subscribe(sent.append)
        await monitor.tick()  # first report: always sent
        await monitor.tick()  # unchanged, interval not due
        flip.status = "warn"
        await monitor.tick()  # changed
        assert [r.status for r in sent] == ["ok", "warn"]
        monitor.interval = 0
        await monitor.tick()  # unchanged but due
        assert len(sent) == 3

    async def test_poke_runs_the_checks_at_once(self) -> None:
        """After poke() a change is noticed without waiting for the change interval."""
        flip = _Flip()
        monitor = HealthMonitor([flip], interval=3600, change_interval=3600)
        sent: list[HealthReport] = []
        monitor.subscribe(sent.append)
        async with anyio.create_task_group() as tg:
            await tg.start(monitor.run)
            with anyio.fail_after(5):
                while not sent:
                    await anyio.sleep(0.01)
            flip.status = "fail"
            monitor.poke()
            with anyio.fail_after(5):
                while len(sent) < 2:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert sent[-1].status == "fail"

    @pytest.mark.nginx
    async def test_report_of_a_real_nginx(self, stack: NginxStack) -> None:
        """Against a serving nginx: process, stub_status and system results, all typed."""
        state = stack.state("hi")
        await stack.driver.apply(stack.update(state), stack.render(state))
        await stack.fetch()
        monitor = HealthMonitor(
            [
                NginxProcessCheck(stack.layout.pid_file),
                StubStatusCheck(port=stack.status_port),
                SystemCheck(pid_file=stack.layout.pid_file),
            ],
            agent_id="agent-1",
        )
        report = await monitor.collect()
        assert report.agent_id == "agent-1"
        by_check = {r.check: r for r in report.results}
        assert by_check["nginx_process"].status == "ok"
        assert by_check["stub_status"].metrics["requests"] >= 1
        assert by_check["stub_status"].metrics["active"] >= 1  # the status request itself
        assert by_check["system"].metrics["nginx_workers"] == 1
