"""Reload coalescing: many updates in, few applies out, the newest always wins.

Updates are *submitted* (cheap, never blocks) and *applied* by one background task:

- an update arriving while an apply runs waits for it, and only the newest waiting one
  is applied next — intermediate versions are skipped (``superseded``);
- after the first update of a burst the task waits until `debounce` seconds pass with
  no newer one (but never longer than `max_delay`), so a burst of twenty pushes costs
  one reload;
- two applies start at least `min_interval` apart: a reload rate limit that bounds how
  many old worker generations can be draining at once (each lives at most the rendered
  ``worker_shutdown_timeout``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
import anyio.abc
import structlog

from nxmesh.core.model import ApplyReport

__all__ = ["Coalescer"]

log = structlog.get_logger("nxmesh.agent.coalescer")

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Collapse submitted updates into applies of the newest one.

    Items are usually `PendingApply` objects; the agent app submits (update, source)
    pairs so a state-file update is applied as one.

    :param apply: runs one apply.
    :param debounce: quiet time after the last submission before applying.
    :param min_interval: minimum seconds between the starts of two applies.
    :param max_delay: a steady stream of updates is applied at least this often.
    """

    def __init__(
        self,
        apply: Callable[[T], Awaitable[ApplyReport]],
        *,
        debounce: float = 0.05,
        min_interval: float = 0.5,
        max_delay: float | None = None,
    ) -> None:
        self._apply = apply
        self.debounce = debounce
        self.min_interval = min_interval
        self.max_delay = max_delay if max_delay is not None else max(1.0, 20 * debounce)
        self._pending: T | None = None
        self._seq = 0
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._last_start = float("-inf")
        self.submitted = 0
        self.superseded = 0
        self.applied = 0
        self.last_report: ApplyReport | None = None

    def submit(self, update: T) -> None:
        """Queue `update`; a queued older one is dropped (it would be replaced anyway)."""
        if self._pending is not None:
            self.superseded += 1
        self._pending = update
        self._seq += 1
        self.submitted += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    @property
    def pending(self) -> T | None:
        return self._pending

    async def wait_idle(self) -> None:
        """Return once nothing is queued or being applied."""
        await self._idle.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply queued updates until cancelled."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self._settle()
            update, self._pending = self._pending, None
            if update is None:
                continue
            self._last_start = time.monotonic()
            try:
                self.last_report = await self._apply(update)
                self.applied += 1
            except Exception:  # one broken update must not stop every later one
                log.exception("apply crashed", update=repr(update)[:200])
            if self._pending is None:
                self._idle.set()
            else:
                self._wake.set()

    async def _settle(self) -> None:
        """Wait out the debounce window and the reload rate limit."""
        first = time.monotonic()
        while True:
            seen = self._seq
            await anyio.sleep(self.debounce)
            if self._seq == seen or time.monotonic() - first >= self.max_delay:
                break
        wait = self._last_start + self.min_interval - time.monotonic()
        if wait > 0:
            await anyio.sleep(wait)
