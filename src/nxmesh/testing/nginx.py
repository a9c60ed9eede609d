"""A real nginx on loopback, in its own prefix, for tests."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, never one this process was given before.

    The kernel may hand the same ephemeral port to two ``bind(0)`` calls when nothing
    listens on it in between (Pebble's directory and the nginx it validates against
    once got the same port), so ports already given out are skipped.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
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
