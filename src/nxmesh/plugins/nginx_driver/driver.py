"""`ReloadDriver`: apply a bundle to a running nginx without ever breaking it.

One apply, in order (each stage timed into the report's ``durations``):

1. **verify**   the bundle's files hash to its digest; the digest already live (and its
   tree intact, nginx running) makes the apply a ``noop``.
2. **stage**    write the tree under ``releases/.staging-*``, make it durable, read it
   back and compare digests.
3. **test**     ``nginx -t`` against the staging tree in a scratch prefix, with a
   timeout; its output is kept for the report. Failing here changes nothing: ``failed``.
4. **swap**     journal the swap, then flip ``current`` with one ``rename(2)``.
5. **reload**   ``signal_nginx("reload")`` through the deployment mode (or start nginx
   when it is not running).
6. **confirm**  poll the status server until ``/nxmesh/version`` answers the new config
   digest *and* a worker pid that did not exist before the reload is current; an
   ``[emerg]`` in the error log (a reload nginx refused) ends this early.
7. **watch**    keep reading the error log for a short window for emerg/alert/crit
               (lines about one client's connection aside).

Any failure from stage 4 on flips ``current`` back, reloads nginx, confirms the old
configuration serves again and reports ``rolled_back`` with nginx's own message. A
crash (``kill -9``) at any instant leaves ``current`` on the old or the new tree;
`recover` (run at the next start) undoes a swap that was never confirmed, so nginx and
``current`` agree again.

Tests pause the pipeline between stages with ``NXMESH_TEST_PAUSE_AT=<stage>`` (the
driver touches ``NXMESH_TEST_PAUSE_FILE`` and waits forever, ready to be killed).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Final, Literal

import anyio
import anyio.to_thread
import attrs
import structlog

from nxmesh.agent.events import EventRecorder
from nxmesh.agent.fsutil import read_tree, stand_in
from nxmesh.agent.http import http_get
from nxmesh.agent.layout import NginxLayout
from nxmesh.agent.process import nginx_environment, process_clock, worker_pids, worker_started
from nxmesh.core.bundle import Bundle, bundle_digest
from nxmesh.core.errors import NxMeshError
from nxmesh.core.interfaces import DeploymentMode
from nxmesh.core.model import ApplyReport, PendingApply
from nxmesh.core.settings import Settings
from nxmesh.nginx_check import NginxNotFoundError, find_nginx, nginx_warnings, prepare_prefix
from nxmesh.plugins.nginx_driver.inspect import StatusEndpoint, error_logs, status_endpoint
from nxmesh.plugins.nginx_driver.reach import locked_out_warning
from nxmesh.plugins.nginx_driver.releases import ReleaseStore, sync_filesystem

__all__ = [
    "ENV_PAUSE_AT",
    "ENV_PAUSE_FILE",
    "STAGES",
    "DriverSettings",
    "ReloadDriver",
]

log = structlog.get_logger("nxmesh.agent.driver")

CURRENT_ENTRY = "<current>"
"""The live-files key that stands for a ``current`` link pointing outside ``releases/``
(a name no rendered bundle uses)."""

ENV_PAUSE_AT = "NXMESH_TEST_PAUSE_AT"
ENV_PAUSE_FILE = "NXMESH_TEST_PAUSE_FILE"
STAGES = ("staged", "tested", "swap-prepared", "swapped", "reloaded", "confirmed", "rolled-back")
"""Checkpoints between pipeline stages, in order (``rolled-back``: after the flip back)."""

_TICK = 0.02  # process start times have 10 ms resolution; allow one tick either way
_BAD_LEVELS = re.compile(rb"\[(emerg|alert|crit)\]")
# nginx numbers what it logs about one connection ("4711#4711: *42 SSL_shutdown() failed
# ... client: 198.51.100.7"): a client's doing (a refused client certificate, a broken
# PROXY header), never the configuration's, so it must not roll an apply back.
_CONNECTION_LINE = re.compile(rb"\] \d+#\d+: \*\d+ ")
_EMERG = re.compile(r"\[(emerg|alert|crit)\][^\n]*")
Outcome = Literal["applied", "failed", "rolled_back", "noop"]


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value}")


@attrs.frozen
class DriverSettings:
    """``[plugins.nginx_driver]``: timeouts and housekeeping of the reload driver.

    `debounce` and `min_reload_interval` shape the agent's reload coalescing: updates
    arriving within `debounce` seconds of each other (or during an apply) collapse into
    one apply of the newest, and two reloads are at least `min_reload_interval` apart.
    `status_address`/`status_port` place the rendered status server the driver confirms
    each new worker generation through.
    """

    test_timeout: float = attrs.field(default=30.0, validator=_positive)
    confirm_timeout: float = attrs.field(default=15.0, validator=_positive)
    error_log_window: float = attrs.field(default=0.3, validator=_positive)
    poll_interval: float = attrs.field(default=0.01, validator=_positive)
    keep_releases: int = attrs.field(default=5, validator=attrs.validators.ge(2))
    durable: bool = True
    """fsync (one ``syncfs``) the staged tree before the flip: survives power loss too."""
    debounce: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    min_reload_interval: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    status_address: str = "127.0.0.1"
    """Where the rendered status server listens (loopback: it is for the agent only)."""
    status_port: int = attrs.field(
        default=9480, validator=[attrs.validators.ge(1), attrs.validators.le(65535)]
    )


class _ApplyFailed(Exception):
    """Internal: a stage failed; carries what the report says."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.output = output


@attrs.define
class _Clock:
    started: float = attrs.field(factory=time.monotonic)
    durations: dict[str, float] = attrs.field(factory=dict)
    _mark: float = attrs.field(factory=time.monotonic)

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.durations[stage] = round(now - self._mark, 6)
        self._mark = now

    def total(self) -> dict[str, float]:
        return {**self.durations, "total": round(time.monotonic() - self.started, 6)}


async def _checkpoint(stage: str) -> None:
    """Tests only: stop here (forever) when ``NXMESH_TEST_PAUSE_AT`` names this stage."""
    if os.environ.get(ENV_PAUSE_AT) != stage:
        return
    marker = os.environ.get(ENV_PAUSE_FILE)
    if marker:
        await anyio.Path(marker).write_text(stage)
    await anyio.sleep_forever()


class _LogTail:
    """New lines of nginx's error logs since the tail was opened."""

    def __init__(self, paths: list[Path]) -> None:
        self.offsets: dict[Path, int] = {}
        for path in dict.fromkeys(paths):
            try:
                self.offsets[path] = path.stat().st_size
            except OSError:
                self.offsets[path] = 0
        self.lines: list[str] = []

    def read(self) -> list[str]:
        """Lines added since the last read (also appended to `lines`)."""
        new: list[str] = []
        for path, offset in self.offsets.items():
            try:
                with path.open("rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < offset:  # rotated or truncated: start over
                        offset = 0
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # only whole lines; the rest next time
            self.offsets[path] = offset + end
            new += data[:end].decode("utf-8", "replace").splitlines()
        self.lines += new
        return new

    def bad(self) -> list[str]:
        """Lines at emerg/alert/crit level read so far, but those about one client's
        connection (`_CONNECTION_LINE`)."""
        return [
            line
            for line in self.lines
            if _BAD_LEVELS.search(encoded := line.encode()) and not _CONNECTION_LINE.search(encoded)
        ]

    @property
    def text(self) -> str:
        """The lines read so far for a report, repeats collapsed (`collapse_repeats`)."""
        return "\n".join(collapse_repeats(self.lines))


_LOG_TIME: Final = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")


def collapse_repeats(lines: list[str]) -> list[str]:
    """`lines` with each run of lines that differ only in their timestamp kept once,
    marked with how many there were: nginx retries a failed bind() five times, half a
    second apart, and logs each attempt."""
    out: list[str] = []
    for _, group in itertools.groupby(lines, key=lambda line: _LOG_TIME.sub("", line, count=1)):
        run = list(group)
        out.append(run[0] if len(run) == 1 else f"{run[0]} (logged {len(run)} times)")
    return out


def _retrying_bind(lines: list[str]) -> bool:
    """True while nginx is in its bind() retry loop (it gives up with "still could not")."""
    failed = any("bind() to" in line and "[emerg]" in line for line in lines)
    return failed and not any("still could not bind()" in line for line in lines)


def _nginx_message(output: str) -> str:
    """The line of nginx's output worth a headline: its first emerg/alert/crit."""
    match = _EMERG.search(output)
    if match:
        return match.group(0)
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class ReloadDriver:
    """The built-in nginx driver: stage, ``nginx -t``, atomic swap, reload, confirm, roll back.

    :param mode: how nginx is found, signalled and started.
    :param layout: the config root (``current``, ``releases/``) and nginx's prefix.
    :param nginx_binary: the nginx executable used for ``nginx -t``.
    :param agent_id: written into every report.
    :param settings: timeouts and housekeeping.
    :param events: where applies and rollbacks are recorded.
    """

    name: ClassVar[str] = "reload"

    def __init__(
        self,
        mode: DeploymentMode,
        layout: NginxLayout,
        *,
        nginx_binary: str = "nginx",
        agent_id: str = "local",
        settings: DriverSettings | None = None,
        events: EventRecorder | None = None,
        extra_logs: tuple[Path, ...] = (),
    ) -> None:
        self.mode = mode
        self.layout = layout
        self.nginx_binary = nginx_binary
        self.agent_id = agent_id
        self.settings = settings or DriverSettings()
        self.events = events or EventRecorder()
        self.store = ReleaseStore(layout.conf_dir)
        self.extra_logs = extra_logs
        self._lock = anyio.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        mode: DeploymentMode,
        agent_id: str = "local",
        events: EventRecorder | None = None,
    ) -> ReloadDriver:
        """The driver the agent builds: `settings` give the layout, binary and knobs."""
        section = settings.plugins.get("nginx_driver")
        stderr_log = getattr(mode, "stderr_log", None)
        return cls(
            mode,
            NginxLayout.from_settings(settings),
            nginx_binary=settings.agent.nginx_binary,
            agent_id=agent_id,
            settings=section if isinstance(section, DriverSettings) else None,
            events=events,
            extra_logs=(stderr_log,) if isinstance(stderr_log, Path) else (),
        )

    # -- the protocol -------------------------------------------------------------------

    @property
    def applying(self) -> bool:
        """True while an apply (or a recovery) holds the driver."""
        return self._lock.locked()

    async def live_digest(self) -> str | None:
        name = self.store.current_name()
        return None if name is None else self.store.digest_of(name)

    async def live_files(self) -> Mapping[str, bytes] | None:
        name = self.store.current_name()
        if name is not None:
            return await anyio.to_thread.run_sync(self.store.files_of, name)
        target = self.store.current_target()
        if target is None:
            return None
        # ``current`` was re-pointed (or replaced) by hand: nginx loads a tree that is no
        # release, which is drift whatever it holds; a revert flips it back.
        return {CURRENT_ENTRY: stand_in(f"current -> {target}, outside releases/")}

    async def apply(
        self, update: PendingApply, bundle: Bundle, *, force: bool = False
    ) -> ApplyReport:
        """Run the pipeline for `bundle`; `force` rewrites and reloads even when it is live."""
        async with self._lock:
            started_at = time.time()
            clock = _Clock()
            outcome, message, output = await self._apply(update, bundle, clock, force=force)
            report = ApplyReport(
                agent_id=self.agent_id,
                version=update.version,
                digest=update.digest,
                outcome=outcome,
                message=message,
                nginx_output=output,
                durations=clock.total(),
                started_at=started_at,
                finished_at=time.time(),
            )
        if outcome != "noop":
            self.events.record(
                f"apply.{outcome}",
                version=update.version,
                digest=update.digest,
                bundle=bundle.digest,
                message=message,
                seconds=report.durations.get("total", 0.0),
            )
        return report

    async def recover(self) -> str | None:
        """Undo a swap a crash interrupted; clean staging leftovers. Run once at start.

        Returns what was done, or None when there was nothing to recover.
        """
        async with self._lock:
            removed = await anyio.to_thread.run_sync(self.store.cleanup_stale)
            journal = await anyio.to_thread.run_sync(self.store.read_journal)
            if journal is None:
                return f"removed {len(removed)} leftover(s)" if removed else None
            current = self.store.current_name()
            # A torn journal says a swap was in flight but not from where: keep the live
            # tree (it is whole either way) and only make nginx agree with it.
            previous = journal.get("previous") if "previous" in journal else current
            if isinstance(previous, str) and not self.store.path_of(previous).is_dir():
                previous = None
            # A first apply over a tree the agent did not write (a sidecar's bootstrap
            # release) journals where ``current`` pointed: that tree is what goes back.
            foreign = journal.get("previous_target") if previous is None else None
            foreign = foreign if isinstance(foreign, str) and foreign else None
            if foreign is not None:
                if self.store.current_target() != foreign:
                    await anyio.to_thread.run_sync(self.store.point_to_target, foreign)
            elif current != previous:
                await anyio.to_thread.run_sync(self.store.point_to, previous)
            pid = await self.mode.nginx_pid()
            if pid is not None and (previous is not None or foreign is not None):
                # nginx may have loaded (or be loading) the unconfirmed tree: load the
                # old one again and wait until it serves, so nginx and ``current`` agree.
                try:
                    await self._reload_and_confirm(previous, pid)
                except (_ApplyFailed, NxMeshError, OSError) as exc:
                    log.warning("recovery reload not confirmed", reason=str(exc))
            elif pid is not None:
                # A cold start was interrupted: nginx runs a tree that was never confirmed
                # and there is none older to go back to.
                try:
                    await self.mode.signal_nginx("quit")
                except (NxMeshError, OSError) as exc:
                    log.warning("recovery could not stop nginx", reason=str(exc))
            await anyio.to_thread.run_sync(self.store.clear_journal)
            what = f"interrupted apply of {str(journal.get('next'))[:12]} undone; " + (
                f"current is {_describe(previous, foreign)} again"
                if previous or foreign
                else "no tree is live"
            )
            self.events.record("apply.recovered", previous=previous, next=journal.get("next"))
            return what

    # -- the pipeline -------------------------------------------------------------------

    async def _apply(
        self, update: PendingApply, bundle: Bundle, clock: _Clock, *, force: bool
    ) -> tuple[Outcome, str, str]:
        if bundle_digest(bundle.files) != bundle.digest:
            return "failed", "bundle files do not match the bundle digest", ""
        previous = self.store.current_name()
        pid = await self.mode.nginx_pid()
        if not force and previous is not None and self.store.digest_of(previous) == bundle.digest:
            intact = await anyio.to_thread.run_sync(self.store.intact, previous)
            if intact and pid is not None:
                clock.lap("verify")
                message = "this configuration is already live"
                if (warning := await self._locked_out(self.store.path_of(previous))) is not None:
                    message += f"; warning: {warning}"
                return "noop", message, ""
        clock.lap("verify")

        # Stage and test: nothing live changes, a failure only cleans up. An intact
        # release of this digest (an older version again, a cold start) is reused.
        reuse = (
            None if force else await anyio.to_thread.run_sync(self.store.find_intact, bundle.digest)
        )
        if reuse is not None:
            name = reuse
            ok, output, inspected = await self._test_and_inspect(
                self.store.path_of(name), bundle, previous, fresh=False
            )
            output = output.replace(f"{self.store.path_of(name)}/", "")
            clock.lap("test")
            if not ok:
                return "failed", f"nginx -t failed: {_nginx_message(output)}", output
            warned = nginx_warnings(output)
            assert not isinstance(inspected, OSError)
            endpoint, logs = inspected
        else:
            try:
                name, staging = await anyio.to_thread.run_sync(
                    functools.partial(self.store.write, bundle, durable=False)
                )
            except OSError as exc:
                return "failed", f"cannot write the staging tree: {exc}", ""
            try:
                clock.lap("stage")
                await _checkpoint("staged")
                ok, output, inspected = await self._test_and_inspect(staging, bundle, previous)
                output = output.replace(f"{staging}/", "")  # name files as the bundle does
                clock.lap("test")
                if not ok:
                    return "failed", f"nginx -t failed: {_nginx_message(output)}", output
                warned = nginx_warnings(output)
                if isinstance(inspected, OSError):
                    return "failed", f"the staged tree is not what was written: {inspected}", ""
                endpoint, logs = inspected
                await _checkpoint("tested")
                await anyio.to_thread.run_sync(self.store.commit, staging, name)
            finally:
                if staging.exists():
                    await anyio.to_thread.run_sync(_rmtree, staging)

        release = self.store.path_of(name)
        tail = _LogTail(logs)
        before = worker_pids(pid) if pid is not None else {}
        # No release of ours is live, but ``current`` may still lead somewhere: a sidecar's
        # bootstrap tree its nginx runs, a link set by hand. That is what a failed first
        # apply goes back to: nginx is never left without a ``current``.
        foreign = self._foreign_target() if previous is None else None

        # Swap: from here on every failure must restore `previous` (or `foreign`).
        if name != previous:
            journal = {"previous": previous, "next": name, "ts": time.time()}
            if foreign is not None:
                journal["previous_target"] = foreign
            await anyio.to_thread.run_sync(self.store.write_journal, journal)
            prepared = await anyio.to_thread.run_sync(self.store.prepare_link, name)
            await _checkpoint("swap-prepared")
            await anyio.to_thread.run_sync(self.store.flip, prepared)
        os.utime(release)  # "newest" for pruning is "most recently made live"
        clock.lap("swap")
        await _checkpoint("swapped")

        started = confirmed = signalled = False
        reload_started = time.monotonic()
        since = process_clock()
        try:
            if pid is None:
                started = True
                await self._start_nginx()
            else:
                await self.mode.signal_nginx("reload")
            signalled = True
            clock.lap("reload")
            await _checkpoint("reloaded")
            await self._confirm(endpoint, before, tail, since)
            confirmed = True
            self._reloaded("ok", time.monotonic() - reload_started)
            clock.lap("confirm")
            await self._watch(tail)
            clock.lap("watch")
            await _checkpoint("confirmed")
        except (_ApplyFailed, NxMeshError, OSError) as exc:
            # NxMeshError: the mode could not signal or start nginx (OSError: a third-party
            # mode that let the OS error through).
            failure = exc if isinstance(exc, _ApplyFailed) else _ApplyFailed(str(exc))
            if not confirmed:
                self._reloaded("failed", time.monotonic() - reload_started)
            if name == previous:  # nothing was swapped: nginx cannot run the live tree
                return "failed", f"{failure.message}", failure.output or tail.text
            return await self._rollback(
                previous,
                tail,
                failure,
                started=started,
                failed=name,
                signalled=signalled,
                foreign=foreign,
            )
        except anyio.get_cancelled_exc_class():
            # Shutting down mid-apply: put the confirmed tree back before leaving, so
            # the next start finds nginx and ``current`` in agreement.
            with anyio.move_on_after(self.settings.confirm_timeout, shield=True):
                await self._rollback(
                    previous, tail, _ApplyFailed("cancelled"), started=started, foreign=foreign
                )
            raise

        await anyio.to_thread.run_sync(self.store.clear_journal)
        protect = {name} | ({previous} if previous else set())
        await anyio.to_thread.run_sync(self.store.prune, self.settings.keep_releases, protect)
        # The rendered bundle's digest ("config"), not the version's state digest.
        message = f"serving config {bundle.digest[:12]}"
        if warned:  # passed, but nginx said something an operator should read
            message += f"; nginx -t warned: {' | '.join(warned)}"
        if (warning := await self._locked_out(release)) is not None:
            log.warning("nginx.workers_locked_out", detail=warning)
            message += f"; warning: {warning}"
        return "applied", message, tail.text

    async def _locked_out(self, release: Path) -> str | None:
        """Whether the live workers cannot reach `release` or the temp directory (see
        `reach`): nginx serves, but each request opening a file there answers 500."""
        pid = await self.mode.nginx_pid()
        if pid is None:
            return None
        workers = [w for w, current in worker_pids(pid).items() if current]
        directories = [release, self.layout.temp_root]
        return await anyio.to_thread.run_sync(locked_out_warning, workers, directories)

    async def _test_and_inspect(
        self, staging: Path, bundle: Bundle, previous: str | None, *, fresh: bool = True
    ) -> tuple[bool, str, tuple[StatusEndpoint | None, list[Path]] | OSError]:
        """``nginx -t`` on the staging tree and, alongside it (hiding their cost): make
        the files durable, read them back against the digest (a `fresh` tree only), find
        the status endpoint and the error logs to watch."""
        result: dict[str, tuple[bool, str]] = {}
        found: list[tuple[StatusEndpoint | None, list[Path]] | OSError] = []

        async def test() -> None:
            result["test"] = await self._nginx_test(staging / "nginx.conf")

        def check() -> None:
            if fresh and self.settings.durable:
                files = [staging / rel for rel in bundle.files]
                sync_filesystem(staging, files)
            try:
                if fresh:
                    self.store.check_tree(staging, bundle.digest)
            except OSError as exc:
                found.append(exc)
                return
            found.append(
                (status_endpoint(staging, bundle.files), self._log_paths(staging, previous))
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(test)
            await anyio.to_thread.run_sync(check)
        return (*result["test"], found[0])

    async def _nginx_test(self, conf: Path) -> tuple[bool, str]:
        """``nginx -t`` on `conf` in place, with a throwaway ``-p`` prefix.

        The scratch prefix is prepared as `nxmesh.nginx_check` prepares its own (the
        runtime dirs the rendered relative paths need); unlike `check_bundle` the tree
        is tested where it is staged, so the bytes tested are the bytes that go live.
        """
        try:
            binary = await anyio.to_thread.run_sync(find_nginx, self.nginx_binary)
        except NginxNotFoundError as exc:
            return False, f"[emerg] {exc}"
        with tempfile.TemporaryDirectory(prefix="nxmesh-nginx-t-") as scratch:
            await anyio.to_thread.run_sync(prepare_prefix, Path(scratch))
            command = [binary, "-t", "-p", f"{scratch}/", "-c", str(conf), "-e", "stderr"]
            with anyio.move_on_after(self.settings.test_timeout) as scope:
                proc = await anyio.run_process(
                    command,
                    stdin=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    check=False,
                    env=nginx_environment(),
                )
            if scope.cancelled_caught:
                return False, f"[emerg] nginx -t did not finish in {self.settings.test_timeout}s"
        return proc.returncode == 0, proc.stdout.decode("utf-8", "replace").strip()

    def _log_paths(self, release: Path, previous: str | None) -> list[Path]:
        paths = [self.layout.error_log, *self.extra_logs]
        paths += error_logs(release, self.layout.prefix)
        if previous is not None:
            paths += error_logs(self.store.path_of(previous), self.layout.prefix)
        return list(dict.fromkeys(paths))

    async def _start_nginx(self) -> None:
        await anyio.to_thread.run_sync(self.layout.ensure_runtime_dirs)
        await self.mode.start_nginx()

    async def _confirm(
        self,
        endpoint: StatusEndpoint | None,
        before: Mapping[int, bool],
        tail: _LogTail,
        since: float,
    ) -> None:
        """Wait until a new worker generation serves `endpoint.expected`; raise otherwise.

        `before` are the workers seen before the reload signal, sent at `since`.
        """
        deadline = time.monotonic() + self.settings.confirm_timeout
        last = ""
        while True:
            tail.read()
            pid = await self.mode.nginx_pid()
            if pid is None:
                raise _ApplyFailed("nginx exited during the reload", tail.text)
            workers = worker_pids(pid)
            # A worker of the new generation: not there before the signal, and started
            # after it (a generation from an earlier, interrupted reload is not ours).
            fresh = [
                p
                for p, current in workers.items()
                if current and p not in before and worker_started(p) >= since - _TICK
            ]
            bad = tail.bad()
            # nginx retries a failed bind() for ~2.5 s before giving up on a reload; until
            # it has given up (or succeeded), rolling back would race its late success.
            if bad and not (
                _retrying_bind(tail.lines) and not fresh and time.monotonic() < deadline
            ):
                raise _ApplyFailed(f"nginx failed on the new configuration: {bad[0]}", tail.text)
            # Old workers stop accepting when they turn "shutting down"; until then a
            # request may still land on the previous generation.
            lingering = [p for p, current in workers.items() if current and p not in fresh]
            if not fresh:
                last = "no new worker process yet"
            elif lingering:
                last = f"{len(lingering)} old worker(s) still accepting"
            elif endpoint is None or not endpoint.expected:
                return
            else:
                try:
                    response = await http_get(
                        endpoint.host, endpoint.port, endpoint.version_path, timeout=1.0
                    )
                except (OSError, TimeoutError) as exc:
                    last = f"status server {endpoint.host}:{endpoint.port} unreachable: {exc}"
                else:
                    answer = response.text.strip()
                    if response.status == 200 and answer == endpoint.expected:
                        return
                    last = (
                        f"status server answers {answer[:16]!r}, "
                        f"waiting for {endpoint.expected[:16]!r}"
                    )
            if time.monotonic() > deadline:
                raise _ApplyFailed(
                    f"the new worker generation was not confirmed within "
                    f"{self.settings.confirm_timeout}s ({last})",
                    tail.text,
                )
            await anyio.sleep(self.settings.poll_interval)

    async def _watch(self, tail: _LogTail) -> None:
        """Read the error log for `error_log_window` seconds; emerg/alert/crit fails."""
        deadline = time.monotonic() + self.settings.error_log_window
        while True:
            tail.read()
            bad = tail.bad()
            if bad:
                raise _ApplyFailed(f"nginx logged an error after the reload: {bad[0]}", tail.text)
            if time.monotonic() >= deadline:
                return
            await anyio.sleep(min(0.05, self.settings.error_log_window))

    async def _rollback(
        self,
        previous: str | None,
        tail: _LogTail,
        failure: _ApplyFailed,
        *,
        started: bool,
        failed: str | None = None,
        signalled: bool = True,
        foreign: str | None = None,
    ) -> tuple[Outcome, str, str]:
        """Restore `previous` as the live tree and the generation nginx serves; then
        delete the `failed` release. `signalled` False: the reload signal was refused, so
        nginx still serves `previous` and only ``current`` goes back. With no `previous`
        release, `foreign` is where ``current`` pointed before (a tree the agent did not
        write, such as a sidecar's bootstrap release): the link goes back there."""
        output = failure.output or tail.text
        # Shielded: a cancellation mid-rollback must not leave the new tree half-live.
        with anyio.CancelScope(shield=True):
            try:
                if previous is None and foreign is not None:
                    await anyio.to_thread.run_sync(self.store.point_to_target, foreign)
                else:
                    await anyio.to_thread.run_sync(self.store.point_to, previous)
                await _checkpoint("rolled-back")
                await self._restore_generation(
                    previous, started=started, signalled=signalled, foreign=foreign is not None
                )
                await anyio.to_thread.run_sync(self.store.clear_journal)
            except (_ApplyFailed, NxMeshError, OSError) as exc:
                log.exception("rollback failed")
                return "failed", f"{failure.message}; rolling back failed too: {exc}", output
        if failed is not None and failed != previous:  # a refused tree is never reused
            # ... unless ``current`` is back on it by another path (a hand-made link)
            back_on_it = foreign is not None and (
                (self.store.root / foreign).resolve() == self.store.path_of(failed).resolve()
            )
            if not back_on_it:
                await anyio.to_thread.run_sync(_rmtree, self.store.path_of(failed))
        what = _describe(previous, foreign) if previous or foreign else "no configuration"
        return "rolled_back", f"{failure.message}; rolled back to {what}", output

    async def _restore_generation(
        self, previous: str | None, *, started: bool, signalled: bool = True, foreign: bool = False
    ) -> None:
        """Make nginx serve `previous` again (reload and confirm it); `foreign`: there is
        no previous release, ``current`` leads back to a tree the agent did not write."""
        restorable = previous is not None or foreign
        pid = await self.mode.nginx_pid()
        if pid is None:
            if restorable and not started:
                await self._start_nginx()  # it died during the apply: bring the old one back
            return
        if not restorable:
            if started:  # we started it on the failed tree and there is nothing older
                await self.mode.signal_nginx("quit")
            return
        if not signalled and not started:
            return  # the reload never reached nginx: its generation still runs `previous`
        # Once nginx got the reload signal, whether it kept the old generation cannot be
        # told in time: a refused config keeps the old workers, but a new generation
        # that dies at start (a failing chdir) still retires them 100 ms later. Loading
        # the previous tree again and confirming it covers both.
        await self._reload_and_confirm(previous, pid)

    async def _reload_and_confirm(self, name: str | None, pid: int) -> None:
        """Reload nginx (master `pid`) and wait until release `name` serves — with None,
        the tree ``current`` leads to (one the agent did not write: a status server may
        not be in it, then a new worker generation alone confirms)."""
        tree = self.store.current_link if name is None else self.store.path_of(name)
        files = await anyio.to_thread.run_sync(read_tree, tree)
        endpoint = await anyio.to_thread.run_sync(status_endpoint, tree, files)
        before = worker_pids(pid)
        since = process_clock()
        await self.mode.signal_nginx("reload")
        await self._confirm(endpoint, before, _LogTail([]), since)

    def _foreign_target(self) -> str | None:
        """Where a ``current`` symlink leads when it is no release of ours, else None."""
        if self.store.current_name() is not None or not self.store.current_link.is_symlink():
            return None
        return self.store.current_target()

    def _reloaded(self, result: str, seconds: float) -> None:
        # Metrics and history listen to these: one per reload nginx was asked for.
        self.events.record(f"reload.{result}", seconds=round(seconds, 6))


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _describe(previous: str | None, foreign: str | None) -> str:
    """How a report names the tree that serves again: a release by its short digest, a
    tree the agent did not write by where ``current`` leads."""
    if previous is not None:
        return f"config {previous[:12]}"
    return f"{foreign} (not written by the agent)"
