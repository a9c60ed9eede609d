"""The health monitor: run every health check, fold the results into HealthReports.

Checks run concurrently, each bounded by `check_timeout`; a check that raises or hangs
becomes a ``fail`` result naming it instead of taking the others down. A report is
*sent* (to the listeners: metrics, the master link) every `interval` seconds, and
sooner whenever any check's status changes — checks are re-run every `change_interval`
to notice that, and at once after an apply (`poke`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc
import structlog

from nxmesh.core.interfaces import HealthCheck
from nxmesh.core.model import HealthReport, HealthResult

__all__ = ["HealthMonitor"]

log = structlog.get_logger("nxmesh.agent.health")

HealthListener = Callable[[HealthReport], Awaitable[None] | None]


class HealthMonitor:
    """Run `checks` on a schedule and publish HealthReports on interval and on change."""

    def __init__(
        self,
        checks: Sequence[HealthCheck],
        *,
        agent_id: str = "local",
        interval: float = 15.0,
        change_interval: float | None = None,
        check_timeout: float = 10.0,
    ) -> None:
        self.checks = list(checks)
        self.agent_id = agent_id
        self.interval = interval
        self.change_interval = (
            change_interval if change_interval is not None else min(interval, 5.0)
        )
        self.check_timeout = check_timeout
        self.listeners: list[HealthListener] = []
        self.last_report: HealthReport | None = None
        self.sent = 0
        self._last_signature: tuple[tuple[str, str], ...] | None = None
        self._last_sent = float("-inf")
        self._poke = anyio.Event()

    def subscribe(self, listener: HealthListener) -> None:
        self.listeners.append(listener)

    def poke(self) -> None:
        """Re-run the checks now (after an apply, a restart...)."""
        self._poke.set()

    async def collect(self) -> HealthReport:
        """Run every check once and return the report (does not send it)."""
        slots: list[Sequence[HealthResult]] = [()] * len(self.checks)

        async def one(index: int, check: HealthCheck) -> None:
            try:
                with anyio.fail_after(self.check_timeout):
                    slots[index] = list(await check.run())
            except TimeoutError:
                slots[index] = [_failed(check, f"timed out after {self.check_timeout}s")]
            except Exception as exc:  # a broken check is a failing check, not a crash
                log.exception("health check raised", check=check.name)
                slots[index] = [_failed(check, f"raised {type(exc).__name__}: {exc}")]

        async with anyio.create_task_group() as tg:
            for index, check in enumerate(self.checks):
                tg.start_soon(one, index, check)
        results = tuple(r for slot in slots for r in slot)[:256]
        report = HealthReport(agent_id=self.agent_id, ts=time.time(), results=results)
        self.last_report = report
        return report

    async def tick(self) -> HealthReport:
        """Collect once; send when the interval elapsed or a status changed."""
        report = await self.collect()
        signature = tuple((r.check, r.status) for r in report.results)
        due = time.monotonic() - self._last_sent >= self.interval
        if due or signature != self._last_signature:
            self._last_signature = signature
            self._last_sent = time.monotonic()
            await self._send(report)
        return report

    async def _send(self, report: HealthReport) -> None:
        self.sent += 1
        for listener in self.listeners:
            try:
                result = listener(report)
                if result is not None:
                    await result
            except Exception:
                log.exception("health listener failed")

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Tick every `change_interval` (or when poked) until cancelled."""
        task_status.started()
        while True:
            self._poke = anyio.Event()  # a poke during the tick below is not lost
            await self.tick()
            with anyio.move_on_after(self.change_interval):
                await self._poke.wait()


def _failed(check: HealthCheck, message: str) -> HealthResult:
    return HealthResult(
        check=getattr(check, "name", "unknown") or "unknown", status="fail", message=message
    )
