"""Finding and signalling an nginx master process: shared by every deployment mode.

nginx is controlled by signals to its master process (what ``nginx -s`` does after
reading the pid file): ``reload`` → SIGHUP (new config, new worker generation, old
workers finish their requests), ``reopen`` → SIGUSR1 (log files), ``quit`` → SIGQUIT
(graceful stop), ``stop`` → SIGTERM (fast stop).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
import psutil

from nxmesh.core.errors import NxMeshError

__all__ = [
    "SIGNALS",
    "NginxControlError",
    "WorkerSet",
    "is_nginx",
    "nginx_environment",
    "nginx_pid_in",
    "nginx_stream_module",
    "nginx_version",
    "orphaned_workers",
    "pid_alive",
    "pid_in_file",
    "process_clock",
    "quit_then_kill",
    "read_pid_file",
    "send_signal",
    "signal_number",
    "stop_orphaned_workers",
    "worker_pids",
    "worker_started",
]

SIGNALS: Mapping[str, signal.Signals] = {
    "reload": signal.SIGHUP,
    "reopen": signal.SIGUSR1,
    "quit": signal.SIGQUIT,
    "stop": signal.SIGTERM,
}


class NginxControlError(NxMeshError):
    """nginx could not be signalled or started: the OS refused (permissions, a missing
    binary, a master that exited). Deployment modes raise it instead of a bare `OSError`,
    so the driver rolls back and the watchdog reports it instead of crashing."""


def nginx_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start nginx with: the agent's own (`environ`, by default
    ``os.environ``) without its ``NXMESH_*`` variables.

    Those are the agent's settings and secrets — ``NXMESH_AGENT__BOOTSTRAP_TOKEN``, a
    storage URL with its password — and nginx needs none of them, while a process's
    environment is readable by anyone who may read its ``/proc/<pid>/environ`` (the same
    user: nginx's workers) and ends up in core dumps.
    """
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if not k.upper().startswith("NXMESH_")}


_NGINX_VERSION = re.compile(r"version: [A-Za-z]+/([0-9][0-9A-Za-z.+-]{0,63})")


def nginx_version(binary: str, *, timeout: float = 10.0) -> str | None:
    """The version `binary` reports (``nginx -v``: "nginx version: nginx/1.22.1" gives
    ``1.22.1``); None when it cannot be run (a sidecar's nginx lives in another
    container) or says something else. Blocking: it runs the binary."""
    said = _nginx_says(binary, "-v", timeout)
    found = None if said is None else _NGINX_VERSION.search(said)
    return found.group(1) if found else None


def _nginx_says(binary: str, flag: str, timeout: float) -> str | None:
    """What ``<binary> <flag>`` prints (nginx writes to stderr); None when it cannot run
    or exits with an error."""
    try:
        # The binary is the agent's own setting (agent.nginx_binary), never remote input.
        result = subprocess.run(  # noqa: S603
            [binary, flag],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=nginx_environment(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stderr + result.stdout if result.returncode == 0 else None


_STREAM_MODULES: dict[str, str | None] = {}


def nginx_stream_module(binary: str, *, timeout: float = 10.0) -> str | None:
    """The ``load_module`` path of `binary`'s stream module when nginx has it as a dynamic
    module (``nginx -V`` shows ``--with-stream=dynamic``: Debian's
    ``libnginx-mod-stream``): ``ngx_stream_module.so`` under ``--modules-path``, else
    under ``<--prefix>/modules``. None when nginx has it built in, has none, or cannot be
    run here (a sidecar's nginx in another container; nginx.org's image has it built
    in). Blocking: it runs the binary, once per binary that answers (a run that failed
    is tried again next time; the agent reads its render settings once, at start).

    Where the module file is missing (the package not installed), ``nginx -t`` of a
    bundle with streams says so, naming the file, and nothing is applied.
    """
    if binary in _STREAM_MODULES:
        return _STREAM_MODULES[binary]
    said = _nginx_says(binary, "-V", timeout)
    if said is None:
        return None
    options = said.split()
    module = None
    if "--with-stream=dynamic" in options:
        found = dict(o.partition("=")[::2] for o in options if o.startswith("--") and "=" in o)
        modules = (
            found.get("--modules-path")
            or found.get("--prefix", "/usr/local/nginx").rstrip("/") + "/modules"
        )
        module = modules.rstrip("/") + "/ngx_stream_module.so"
    _STREAM_MODULES[binary] = module
    return module


def signal_number(name: str) -> signal.Signals:
    """The signal for an nginx signal name; `NxMeshError` naming it when unknown."""
    try:
        return SIGNALS[name]
    except KeyError:
        raise NxMeshError(
            f"unknown nginx signal {name!r}; use one of {', '.join(SIGNALS)}"
        ) from None


def send_signal(pid: int, signal_name: str) -> None:
    """Send nginx signal `signal_name` to master `pid`; `NginxControlError` when refused."""
    signum = signal_number(signal_name)
    try:
        os.kill(pid, signum)
    except OSError as exc:
        hint = (
            "; the agent must run as nginx's user or root"
            if isinstance(exc, PermissionError)
            else ""
        )
        raise NginxControlError(
            f"cannot send {signal_name!r} ({signum.name}) to nginx pid {pid}: {exc}{hint}"
        ) from exc


def pid_alive(pid: int) -> bool:
    """True when a process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def read_pid_file(path: Path) -> int | None:
    """The live nginx pid in nginx's pid file, or None (missing, garbage, stale).

    A pid file that outlived a reboot may name an unrelated process by now: a pid whose
    process is not nginx counts as stale, so it is never signalled.
    """
    return await anyio.to_thread.run_sync(nginx_pid_in, path)


def nginx_pid_in(path: Path) -> int | None:
    """`read_pid_file`, blocking: the pid in `path` when it is a live nginx, else None."""
    pid = pid_in_file(path)
    return pid if pid is not None and pid_alive(pid) and is_nginx(pid) else None


def pid_in_file(path: Path) -> int | None:
    """The pid written in `path` (blocking), running or not; None when the file is
    missing or holds no positive number. `nginx_pid_in` for the live nginx."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def quit_then_kill(procs: list[psutil.Process], *, timeout: float) -> None:
    """SIGQUIT `procs` (nginx's graceful stop: listening sockets closed at once, requests
    finished), then SIGKILL what is left after `timeout` seconds. A process that exited
    meanwhile, or refuses the signal (another user's), is skipped. Blocking: run it in a
    thread from async code."""
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        alive = [proc for proc in procs if pid_alive(proc.pid)]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        # A zombie holds no socket: gone enough (whoever adopted it reaps it when it likes).
        deadline = time.monotonic() + timeout
        while any(pid_alive(proc.pid) for proc in alive) and time.monotonic() < deadline:
            time.sleep(0.01)


def is_nginx(pid: int) -> bool:
    """True when process `pid` is an nginx (or cannot be inspected: another user's)."""
    try:
        proc = psutil.Process(pid)
        return "nginx" in proc.name() or "nginx" in " ".join(proc.cmdline()[:1])
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


WorkerSet = frozenset[int]


def process_clock() -> float:
    """Now, on the clock of `worker_started` (psutil's: boot time + time since boot).

    ``time.time()`` would be off by up to a second: the kernel's boot time is whole
    seconds, and process start times are counted from it.
    """
    since_boot = time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))
    return psutil.boot_time() + since_boot


def worker_started(pid: int) -> float:
    """When process `pid` started, on `process_clock` (10 ms resolution); 0 when unknown."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def worker_pids(master_pid: int) -> dict[int, bool]:
    """Worker pid → True when it is still *current* (not "is shutting down").

    Old workers linger after a reload until their connections finish
    (``worker_shutdown_timeout`` bounds it); nginx renames their title, which is how a
    new generation is told apart from the old one.
    """
    try:
        children = psutil.Process(master_pid).children()
    except psutil.Error:
        return {}
    found: dict[int, bool] = {}
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "worker process" in cmdline:
            found[child.pid] = "shutting down" not in cmdline
    return found


def orphaned_workers(master_pid: int) -> list[psutil.Process]:
    """The nginx processes left behind by master `master_pid` after it died (SIGKILL, the
    OOM killer): its workers (and cache processes) outlive it, still holding its
    listening sockets, so a new master cannot bind them and they keep serving the old
    configuration. They are found by their process group, which is the dead master's pid
    (a master leads its own group, daemon or supervised; its children inherit it), and
    only while that master is gone; a process of the group that is not nginx is left
    alone (the pid may have been reused)."""
    if pid_alive(master_pid):
        return []
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if os.getpgid(proc.pid) != master_pid or proc.pid == master_pid:
                continue
        except OSError:
            continue
        title = " ".join(proc.info["cmdline"] or ())
        if "nginx" in (proc.info["name"] or "") and title.startswith("nginx: "):
            found.append(proc)
    return found


def stop_orphaned_workers(pid_file: Path, *, timeout: float = 5.0) -> list[int]:
    """Stop what `orphaned_workers` finds for the (dead) master named in `pid_file`:
    SIGQUIT (they close the listening sockets at once and finish their requests), then
    SIGKILL what is left after `timeout` seconds. Returns their pids. Blocking: run it
    in a thread."""
    master = pid_in_file(pid_file)
    if master is None:
        return []
    orphans = orphaned_workers(master)
    quit_then_kill(orphans, timeout=timeout)
    return [proc.pid for proc in orphans]
