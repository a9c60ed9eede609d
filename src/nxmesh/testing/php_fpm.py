"""A real FastCGI application server for tests: PHP-FPM (Debian's ``php-fpm``).

`run_php_fpm` starts one pool listening on a unix socket in a scratch directory (or on
a loopback port), with two workers and php.ini's defaults (``cgi.fix_pathinfo=1``, as
most installations have it), and stops it on exit. The ``php_fpm`` fixture (module
scope) skips locally and fails in CI when the binary is missing (`require_binary`);
import it into a ``conftest.py``::

    from nxmesh.testing.php_fpm import php_fpm  # noqa: F401

Tests running as root get workers running as root (``--allow-to-run-as-root``): the
scripts they read live in directories nginx's workers read too.
"""

from __future__ import annotations

import contextlib
import glob
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from nxmesh.testing.nginx import readable_root
from nxmesh.testing.services import missing_service

__all__ = ["PhpFpm", "find_php_fpm", "php_fpm", "run_php_fpm"]

_START_TIMEOUT = 15.0


@attrs.frozen
class PhpFpm:
    """A running PHP-FPM pool."""

    address: str
    """Its address as an upstream server names it: ``unix:/path.sock`` or ``host:port``."""
    log: Path
    """PHP-FPM's error log (workers' output included), for a failing test to show."""


def find_php_fpm() -> str:
    """The PHP-FPM binary (Debian names it by version: ``/usr/sbin/php-fpm8.2``)."""
    for pattern in ("/usr/sbin/php-fpm", "/usr/sbin/php-fpm[0-9]*", "/usr/local/sbin/php-fpm"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
    missing_service("PHP-FPM (Debian package php-fpm)")
    raise AssertionError("unreachable")  # pragma: no cover - skip/fail raised


def _connects(address: str) -> bool:
    family, where = (
        (socket.AF_UNIX, address.removeprefix("unix:"))
        if address.startswith("unix:")
        else (socket.AF_INET, (address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1])))
    )
    with socket.socket(family) as s, contextlib.suppress(OSError):
        s.connect(where)
        return True
    return False


@contextlib.contextmanager
def run_php_fpm(workdir: Path, binary: str, *, port: int | None = None) -> Iterator[PhpFpm]:
    """PHP-FPM serving from `workdir`'s pool: on 127.0.0.1:`port`, else on a unix socket
    under /run (short enough for ``sun_path``, and a path the model accepts)."""
    with contextlib.ExitStack() as stack:
        if port is None:  # nginx's workers must reach the socket
            listen = str(stack.enter_context(readable_root(parent="/run")) / "fpm.sock")
        else:
            listen = f"127.0.0.1:{port}"
        yield stack.enter_context(_serving(workdir, binary, listen))


@contextlib.contextmanager
def _serving(workdir: Path, binary: str, listen: str) -> Iterator[PhpFpm]:
    """PHP-FPM listening on `listen` (a socket path or ``host:port``) until exit."""
    log = workdir / "php-fpm.log"
    address = f"unix:{listen}" if listen.startswith("/") else listen
    config = workdir / "php-fpm.conf"
    config.write_text(
        f"[global]\nerror_log = {log}\ndaemonize = no\npid = {workdir / 'php-fpm.pid'}\n"
        f"[test]\nlisten = {listen}\nlisten.mode = 0666\npm = static\npm.max_children = 2\n"
        "catch_workers_output = yes\nclear_env = yes\n"
    )
    proc = subprocess.Popen(  # noqa: S603 - a fixed binary and our own config
        [binary, "--nodaemonize", "--allow-to-run-as-root", "--fpm-config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _connects(address):
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else "(no log)"
                raise RuntimeError(f"PHP-FPM did not start (exit {proc.returncode}):\n{text}")
            time.sleep(0.05)
        yield PhpFpm(address=address, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck master
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def php_fpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhpFpm]:
    """A PHP-FPM pool on a unix socket for a test module (skipped locally when missing)."""
    with run_php_fpm(tmp_path_factory.mktemp("php-fpm"), find_php_fpm()) as server:
        yield server
