"""A real nginx on loopback, in its own prefix, for tests."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import pytest

MINIMAL_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "nxmesh-test\\n"; }}
    }}
}}
"""


_handed_out: set[int] = set()


def refuse_signal(
    monkeypatch: pytest.MonkeyPatch,
    pid: int,
    signum: int = signal.SIGHUP,
    error: type[OSError] = PermissionError,
) -> None:
    """Make the OS refuse `signum` to `pid` as it does for an nginx of another user
    (`PermissionError`) or one that just exited (`ProcessLookupError`); other signals
    and processes are unaffected. Tests run as root, which may signal anything."""
    code = errno.EPERM if error is PermissionError else errno.ESRCH
    real = os.kill

    def kill(target: int, sig: int) -> None:
        if target == pid and sig == signum:
            raise error(code, os.strerror(code))
        real(target, sig)

    monkeypatch.setattr(os, "kill", kill)


@contextlib.contextmanager
def readable_root(
    files: Mapping[str, str] | None = None, *, parent: str = "/srv"
) -> Iterator[Path]:
    """A scratch directory under `parent` holding `files` (relative path → text), which
    nginx's workers, another user, can read (0755 directories, 0644 files; pytest's own
    temporary directories are private); under /srv the model accepts it as a `root`.
    Removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="nxmesh-test-", dir=parent))
    try:
        root.chmod(0o755)
        for name, text in (files or {}).items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            path.write_text(text)
            path.chmod(0o644)
        yield root
    finally:
        shutil.rmtree(root)


def _worker_share() -> tuple[int, int]:
    """(this pytest-xdist worker's index, the number of workers); (0, 1) without xdist.
    Subprocesses of a worker inherit its share through the environment."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return (int(worker) if worker.isdigit() else 0) % count, count


def _port_pool() -> range:
    """Ports below the kernel's ephemeral range (which it hands to ``connect()`` and
    ``bind(0)``), so no outgoing connection takes one between the test choosing it and
    its server binding it; the ephemeral range itself when too little lies below."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(n) for n in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(20000, low) if low >= 24000 else range(low, high + 1)


_POOL = _port_pool()
_pick = random.SystemRandom()  # not the test-seeded `random`: workers would draw alike


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, never one this process was given before.

    Chosen at random below the kernel's ephemeral range and checked with a bind, so the
    kernel's own choices (``bind(0)``, outgoing connections) never meet it. Under
    pytest-xdist each worker takes only the ports of its own residue (port mod workers),
    so two workers are never given the same port either.
    """
    index, count = _worker_share()
    while True:
        port = _pick.randrange(_POOL.start, _POOL.stop)
        port += (index - port) % count  # this worker's residue
        if port >= _POOL.stop or port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


@attrs.define
class NginxInstance:
    """An nginx master process running from `prefix`, listening on 127.0.0.1:`port`."""

    binary: str
    prefix: Path
    port: int = attrs.field(factory=free_port)

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    def write_minimal_conf(self) -> None:
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(MINIMAL_CONF.format(prefix=self.prefix, port=self.port))

    def start(self) -> None:
        if not self.conf.exists():
            self.write_minimal_conf()
        # The binary comes from require_binary/the fixture, never from user input.
        subprocess.run(  # noqa: S603
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self._wait(lambda: self.pid() is not None, "nginx did not write its pid file")
        # The pid file comes before the workers are forked; "running" means serving.
        self._wait(self._has_worker, "nginx started no worker process")

    def _has_worker(self) -> bool:
        from nxmesh.agent.process import worker_pids

        pid = self.pid()
        return pid is not None and any(worker_pids(pid).values())

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT)
        self._wait(lambda: self.pid() is None, "nginx did not stop", fatal=False)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _wait(cond: object, message: str, *, timeout: float = 10.0, fatal: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(cond) and cond():
                return
            time.sleep(0.02)
        if fatal:
            raise TimeoutError(message)
