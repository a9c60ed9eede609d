"""The standalone deployment mode: nginx and the agent on the same host (or container).

Two ways to run, chosen by ``[plugins.deploy_standalone] supervise``:

``supervise = true`` (default)
    The agent starts nginx as its child, in the foreground::

        nginx -g 'daemon off;' -p <conf_dir>/ -c <conf_dir>/current/nginx.conf

    in its own session (a Ctrl-C meant for the agent does not reach nginx), with stdout
    and stderr appended to ``<prefix>/logs/nginx.stderr.log`` and the agent's environment
    minus its ``NXMESH_*`` variables (settings, the bootstrap token: nginx needs none).
    With ``stop_on_exit`` the agent stops it gracefully (SIGQUIT) when it exits. After an
    agent crash nginx keeps serving; the next agent finds it through the pid file and
    adopts it instead of starting a second one.

``supervise = false``
    Attach to an nginx something else runs (systemd, an init script) and control it the
    way ``nginx -s`` does: read the pid file, send the signal. That nginx must be started
    with ``-p <conf_dir>/ -c <conf_dir>/current/nginx.conf``. When nginx is not running,
    `start_nginx` starts it daemonized (``nginx -p ... -c ...``), as the init script would.

Paths: the pid file is the rendered ``pid`` (``<conf_dir>/logs/nginx.pid`` by default,
``pid_file`` overrides). Signals: reload → SIGHUP, reopen → SIGUSR1, quit → SIGQUIT,
stop → SIGTERM, sent to the master process.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import anyio
import anyio.abc
import attrs
import structlog

from nxmesh import NxMeshError, hookimpl
from nxmesh.agent.layout import NginxLayout
from nxmesh.agent.process import (
    NginxControlError,
    nginx_environment,
    pid_alive,
    read_pid_file,
    send_signal,
    stop_orphaned_workers,
)

if TYPE_CHECKING:
    from nxmesh.core.interfaces import DeploymentMode
    from nxmesh.core.settings import Settings, SettingsRegistry

__all__ = ["SECTION", "StandaloneMode", "StandaloneSettings"]

log = structlog.get_logger("nxmesh.agent.standalone")

SECTION = "deploy_standalone"
_STDERR_TAIL = 2000


@attrs.frozen
class StandaloneSettings:
    """``[plugins.deploy_standalone]``: supervise nginx, or attach to one."""

    supervise: bool = True
    stop_on_exit: bool = True
    pid_file: Path | None = None
    start_timeout: float = 10.0
    stop_timeout: float = 10.0


class StandaloneMode:
    """nginx on this host: a supervised child process, or an existing master by pid file."""

    name: ClassVar[str] = "standalone"
    priority: ClassVar[int] = 0

    def __init__(
        self,
        layout: NginxLayout,
        *,
        nginx_binary: str = "nginx",
        settings: StandaloneSettings | None = None,
    ) -> None:
        self.layout = layout
        self.nginx_binary = nginx_binary
        self.settings = settings or StandaloneSettings()
        self.pid_file = self.settings.pid_file or layout.pid_file
        self.stderr_log = layout.prefix / "logs" / "nginx.stderr.log"
        self._child: anyio.abc.Process | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StandaloneMode:
        section = settings.plugins.get(SECTION)
        return cls(
            NginxLayout.from_settings(settings),
            nginx_binary=settings.agent.nginx_binary,
            settings=section if isinstance(section, StandaloneSettings) else None,
        )

    @classmethod
    def detect(cls) -> bool:
        """True when an nginx binary is installed here (the mode of last resort)."""
        return bool(shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin"))

    @property
    def supervising(self) -> bool:
        """True while nginx runs as this agent's child process."""
        return self._child is not None and self._child.returncode is None

    async def nginx_pid(self) -> int | None:
        if self._child is not None:
            # returncode lags on asyncio (a watcher thread reaps); a zombie is dead too.
            if self._child.returncode is None and pid_alive(self._child.pid):
                return self._child.pid
            await self._reap()
        return await read_pid_file(self.pid_file)

    async def _reap(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            with anyio.move_on_after(5, shield=True):
                await child.aclose()

    def _command(self) -> list[str]:
        # The trailing slash matters: nginx joins -p and relative paths by concatenation.
        return [self.nginx_binary, "-p", f"{self.layout.prefix}/", "-c", str(self.layout.conf_file)]

    async def start_nginx(self) -> None:
        """Start nginx unless one already runs from the pid file (then adopt it)."""
        if await self.nginx_pid() is not None:
            return
        if not self.layout.conf_file.is_file():
            raise NxMeshError(
                f"cannot start nginx: {self.layout.conf_file} does not exist (nothing applied yet)"
            )
        # A master killed outright (SIGKILL, the OOM killer) leaves its workers holding
        # the listening sockets: the new master could not bind them.
        stopped = await anyio.to_thread.run_sync(stop_orphaned_workers, self.pid_file)
        if stopped:
            log.warning("stopped the workers of an nginx master that died", pids=stopped)
        try:
            await anyio.to_thread.run_sync(self.layout.ensure_runtime_dirs)
            if self.settings.supervise:
                await self._spawn_child()
            else:
                await self._start_daemon()
        except OSError as exc:
            # A missing or non-executable binary, an unwritable prefix: say which.
            hint = " (check agent.nginx_binary)" if exc.filename == self.nginx_binary else ""
            raise NginxControlError(f"cannot start nginx {self.nginx_binary}: {exc}{hint}") from exc
        log.info("nginx started", pid=await self.nginx_pid(), supervised=self.settings.supervise)

    async def _spawn_child(self) -> None:
        offset = self.stderr_log.stat().st_size if self.stderr_log.exists() else 0
        with self.stderr_log.open("ab") as out:
            child = await anyio.open_process(
                [*self._command(), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=nginx_environment(),  # never the agent's NXMESH_* settings and secrets
            )
        self._child = child
        with anyio.move_on_after(self.settings.start_timeout):
            while child.returncode is None:
                if await read_pid_file(self.pid_file) == child.pid:
                    return
                await anyio.sleep(0.01)
        output = self._stderr_since(offset)
        if child.returncode is None:
            child.kill()
            await self._reap()
            raise NxMeshError(
                f"nginx did not start within {self.settings.start_timeout}s: {output}"
            )
        await self._reap()
        raise NxMeshError(f"nginx exited at start: {output or 'no output'}")

    async def _start_daemon(self) -> None:
        result = await anyio.run_process(self._command(), check=False, env=nginx_environment())
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode("utf-8", "replace").strip()
            raise NxMeshError(f"nginx failed to start: {output}")
        with anyio.move_on_after(self.settings.start_timeout):
            while await read_pid_file(self.pid_file) is None:  # noqa: ASYNC110 - polls a file
                await anyio.sleep(0.01)
            return
        raise NxMeshError(f"nginx started but wrote no pid file {self.pid_file}")

    def _stderr_since(self, offset: int) -> str:
        try:
            with self.stderr_log.open("rb") as f:
                f.seek(offset)
                return f.read()[-_STDERR_TAIL:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    async def signal_nginx(self, signal_name: str) -> None:
        pid = await self.nginx_pid()
        if pid is None:
            raise NginxControlError(
                f"cannot send {signal_name!r}: no running nginx (pid file {self.pid_file})"
            )
        send_signal(pid, signal_name)

    async def aclose(self) -> None:
        """Stop a supervised nginx when `stop_on_exit` — the child this agent started, or
        the one it adopted through the pid file from an agent that died (under systemd's
        ``KillMode=process`` nothing else stops it); never touch an attached one."""
        child = self._child
        if child is None:
            if self.settings.supervise and self.settings.stop_on_exit:
                with anyio.CancelScope(shield=True):
                    await self._stop_adopted()
            return
        with anyio.CancelScope(shield=True):
            if self.settings.stop_on_exit and child.returncode is None:
                child.send_signal(signal.SIGQUIT)
                with anyio.move_on_after(self.settings.stop_timeout):
                    await child.wait()
                if child.returncode is None:
                    child.kill()
            if self.settings.stop_on_exit or child.returncode is not None:
                await self._reap()
            else:
                # Left running on purpose; the next agent adopts it through the pid file.
                self._child = None

    async def _stop_adopted(self) -> None:
        """Stop an nginx running from this config root that is not our child: gracefully
        (SIGQUIT), fast (SIGTERM) after `stop_timeout`."""
        pid = await read_pid_file(self.pid_file)
        if pid is None:
            return
        for signal_name in ("quit", "stop"):
            try:
                send_signal(pid, signal_name)
            except NginxControlError as exc:
                log.warning("cannot stop the adopted nginx", pid=pid, error=str(exc))
                return
            with anyio.move_on_after(self.settings.stop_timeout):
                while pid_alive(pid):  # noqa: ASYNC110 - not our child: nothing to wait on
                    await anyio.sleep(0.02)
                return
        log.warning("the adopted nginx did not stop", pid=pid)


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, StandaloneSettings)


@hookimpl(trylast=True)
def nxmesh_register_deployment_modes() -> Sequence[type[DeploymentMode]]:
    return [StandaloneMode]
