"""The watchdog: keep nginx running the configuration the agent applied.

Two loops, both recorded as events:

**Drift** — every `drift_interval` the digest of the live tree (the files under
``current``, read from disk) is compared with the last-known-good bundle. It holds the
applier's lock while it looks, so an apply in progress pauses it and the apply's own
writes are never taken for drift. A difference is reported with a file-level unified
diff (``drift.detected``); policy ``revert`` (default) then re-applies the last-known-good
bundle through the same pipeline (a fresh release, ``nginx -t``, flip, reload —
``drift.reverted``), policy ``report`` leaves the files alone.

**Liveness** — every `check_interval` the deployment mode is asked for nginx's pid.
When nginx died (``nginx.died``) it is restarted with exponential backoff: the n-th
restart within `reset_after` seconds of the previous one waits
``backoff_initial * 2**(n-1)`` seconds (capped at `backoff_max`). After
`breaker_threshold` failed or repeated restarts within `breaker_window` the circuit
breaker opens (``breaker.open``): no restart is attempted for `breaker_cooldown`
seconds, then one trial restart (half-open) either closes it or opens it again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Literal

import anyio
import anyio.abc
import anyio.to_thread
import attrs
import structlog

from nxmesh.agent.applier import Applier
from nxmesh.agent.events import EventRecorder
from nxmesh.agent.fsutil import describe_special
from nxmesh.core.bundle import bundle_digest, is_private_key_file
from nxmesh.core.errors import NxMeshError
from nxmesh.core.interfaces import DeploymentMode, NginxDriver

__all__ = ["BackoffPolicy", "Drift", "Watchdog", "file_diff"]

log = structlog.get_logger("nxmesh.agent.watchdog")

MAX_DIFF = 64 * 1024
MAX_DIFF_FILE = 128 * 1024
"""Files larger than this (either side) are reported as differing, not line-diffed:
difflib is superlinear in lines (a much-changed 20,000-line map took ~10 s)."""


@attrs.frozen
class BackoffPolicy:
    """Restart pacing and the circuit breaker (seconds)."""

    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    reset_after: float = 60.0
    breaker_threshold: int = 5
    breaker_window: float = 300.0
    breaker_cooldown: float = 600.0


@attrs.frozen
class Drift:
    """The live tree differs from the last-known-good bundle."""

    expected: str
    actual: str
    changed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    diff: str


def file_diff(expected: Mapping[str, bytes], actual: Mapping[str, bytes]) -> str:
    """A unified diff, file by file, from the expected tree to the live one.

    CPU-bound (pure Python): async callers run it in a worker thread.
    """
    from difflib import unified_diff  # here: only drift needs it

    out: list[str] = []
    for path in sorted(set(expected) | set(actual)):
        a, b = expected.get(path), actual.get(path)
        if a == b:
            continue
        if b is not None and (what := describe_special(b)) is not None:
            out.append(f"{path} is {what} the bundle does not contain\n")
            continue
        if is_private_key_file(path, a) or is_private_key_file(path, b):
            out.append(f"Private key file {path} differs (not shown)\n")
            continue
        size = max(len(a or b""), len(b or b""))
        if size > MAX_DIFF_FILE:
            out.append(f"File {path} differs ({size} bytes, too large to diff)\n")
            continue
        old = [] if a is None else a.decode("utf-8", "replace").splitlines(keepends=True)
        new = [] if b is None else b.decode("utf-8", "replace").splitlines(keepends=True)
        from_name = f"expected/{path}" if a is not None else "/dev/null"
        to_name = f"live/{path}" if b is not None else "/dev/null"
        for line in unified_diff(old, new, from_name, to_name):
            out.append(line if line.endswith("\n") else line + "\n")
        if sum(map(len, out)) > MAX_DIFF:
            out.append("... (diff truncated)\n")
            break
    return "".join(out)[: MAX_DIFF + 64]


class Watchdog:
    """Watch the live tree for drift and nginx for death; act on both.

    :param applier: owns the last-known-good bundle and the apply lock.
    :param driver: reads the live tree.
    :param mode: finds and starts nginx.
    :param drift_interval: seconds between drift checks.
    :param drift_policy: ``revert`` or ``report``.
    :param check_interval: seconds between nginx liveness checks.
    """

    def __init__(
        self,
        applier: Applier,
        driver: NginxDriver,
        mode: DeploymentMode,
        *,
        events: EventRecorder | None = None,
        drift_interval: float = 30.0,
        drift_policy: Literal["revert", "report"] = "revert",
        check_interval: float = 1.0,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        self.applier = applier
        self.driver = driver
        self.mode = mode
        self.events = events or applier.events
        self.drift_interval = drift_interval
        self.drift_policy = drift_policy
        self.check_interval = check_interval
        self.backoff = backoff or BackoffPolicy()
        self.nginx_up: bool | None = None
        self._restarts: deque[float] = deque()
        self._streak = 0
        self._last_restart = float("-inf")
        self._next_attempt = 0.0
        self._breaker_until: float | None = None
        self._down_since: float | None = None

    @property
    def breaker_open(self) -> bool:
        return self._breaker_until is not None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run both loops until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drift_loop)
            tg.start_soon(self._liveness_loop)
            task_status.started()

    # -- drift --------------------------------------------------------------------------

    async def _drift_loop(self) -> None:
        while True:
            await anyio.sleep(self.drift_interval)
            try:
                await self.check_drift()
            except Exception:  # a failed check is logged; the watchdog keeps watching
                log.exception("drift check failed")

    async def check_drift(self) -> Drift | None:
        """Compare the live tree with the last-known-good bundle; act on a difference."""
        async with self.applier.lock:  # an apply in progress pauses the check
            entry = self.applier.current
            if entry is None:
                return None
            live = await self.driver.live_files()
            actual = bundle_digest(live) if live is not None else "none"
            if actual == entry.bundle.digest:
                return None
            live = live or {}
            expected = entry.bundle.files
            # Off the event loop: the lock is held, but metrics, health and the master
            # link keep being served while a large tree is diffed.
            diff = await anyio.to_thread.run_sync(file_diff, expected, live)
            drift = Drift(
                expected=entry.bundle.digest,
                actual=actual,
                changed=tuple(
                    sorted(p for p in expected.keys() & live.keys() if expected[p] != live[p])
                ),
                added=tuple(sorted(live.keys() - expected.keys())),
                removed=tuple(sorted(expected.keys() - live.keys())),
                diff=diff,
            )
            self.events.record(
                "drift.detected",
                policy=self.drift_policy,
                expected=drift.expected,
                actual=drift.actual,
                changed=list(drift.changed),
                added=list(drift.added),
                removed=list(drift.removed),
                diff=drift.diff,
            )
            if self.drift_policy == "revert":
                try:
                    report = await self.applier.apply_entry_locked(entry, force=True)
                except (NxMeshError, OSError) as exc:  # reported; retried next interval
                    log.exception("drift revert failed")
                    self.events.record("drift.revert_failed", outcome="failed", message=str(exc))
                    return drift
                kind = "drift.reverted" if report.outcome == "applied" else "drift.revert_failed"
                self.events.record(kind, outcome=report.outcome, message=report.message)
            return drift

    # -- liveness -----------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        while True:
            try:
                await self.check_nginx()
            except Exception:  # a failed check is logged; the watchdog keeps watching
                log.exception("nginx liveness check failed")
            await anyio.sleep(self.check_interval)

    async def check_nginx(self) -> bool | None:
        """Look at nginx once; restart it when it died. Returns whether it is up."""
        if self.applier.applying:
            return self.nginx_up  # an apply may be (re)starting it right now
        if await self.driver.live_digest() is None:
            return None  # nothing applied yet: nothing to keep running
        pid = await self.mode.nginx_pid()
        now = time.monotonic()
        if pid is not None:
            if self.nginx_up is not True:  # first sight, or back after a death
                self.events.record("nginx.up", pid=pid)
            self.nginx_up = True
            self._down_since = None
            if self._streak and now - self._last_restart > self.backoff.reset_after:
                self._streak = 0  # stayed up long enough: forgive earlier restarts
            return True
        if self.nginx_up is not False:
            self.events.record("nginx.died")
            self._down_since = now
        self.nginx_up = False
        await self._maybe_restart(now)
        return self.nginx_up

    async def _maybe_restart(self, now: float) -> None:
        policy = self.backoff
        while self._restarts and now - self._restarts[0] > policy.breaker_window:
            self._restarts.popleft()
        trial = False
        if self._breaker_until is not None:
            if now < self._breaker_until:
                return
            trial = True  # half-open: one attempt decides
            self.events.record("breaker.half_open")
        elif len(self._restarts) >= policy.breaker_threshold:
            self._open_breaker()
            return
        elif now < self._next_attempt:
            return
        self._restarts.append(now)
        self._last_restart = now
        self._streak += 1
        try:
            async with self.applier.lock:
                await self.mode.start_nginx()
        except (NxMeshError, OSError) as exc:  # OSError: a mode that let the OS error out
            ok, message = False, str(exc)
        else:
            ok, message = True, ""
        delay = min(policy.backoff_initial * 2 ** (self._streak - 1), policy.backoff_max)
        self._next_attempt = time.monotonic() + delay
        if ok:
            self.nginx_up = True
            self.events.record("nginx.restarted", attempt=self._streak, next_delay=delay)
            if trial:
                self._breaker_until = None
                self._restarts.clear()
                self.events.record("breaker.closed")
            return
        self.events.record(
            "nginx.restart_failed", attempt=self._streak, next_delay=delay, message=message
        )
        if trial or len(self._restarts) >= policy.breaker_threshold:
            self._open_breaker()

    def _open_breaker(self) -> None:
        self._breaker_until = time.monotonic() + self.backoff.breaker_cooldown
        self.events.record(
            "breaker.open", cooldown=self.backoff.breaker_cooldown, restarts=len(self._restarts)
        )
