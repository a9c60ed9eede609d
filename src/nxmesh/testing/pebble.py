"""A real ACME server for tests: Pebble, with pebble-challtestsrv as its DNS.

`run_pebble` starts both on loopback, on free ports, from a scratch directory, and stops
them on exit. Pebble's own HTTPS listener gets a throwaway CA made with ``cryptography``
(the Debian package ships no certificate for it); `PebbleServer.ca_bundle` is the file
an ACME client must trust. Every name resolves to 127.0.0.1 through challtestsrv, and
Pebble's validation authority sends HTTP-01 requests to `PebbleServer.http_port`, so a
test points an nginx listener there and Pebble validates through it.

The ``pebble`` fixture (session scope) skips locally and fails in CI when either binary
is missing (`require_binary`). Use it by importing it into a ``conftest.py``::

    from nxmesh.testing.pebble import pebble  # noqa: F401

Environment given to Pebble: no random validation sleeps, no rejected nonces, no
authorization reuse (every order is validated afresh), never "always valid".
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from nxmesh.testing.nginx import free_port
from nxmesh.testing.services import require_binary
from nxmesh.tls import ensure_tls_material

__all__ = ["PEBBLE_ENV", "PebbleServer", "pebble", "run_pebble"]

PEBBLE_ENV = {
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_VA_ALWAYS_VALID": "0",
    "PEBBLE_WFE_NONCEREJECT": "0",
    "PEBBLE_AUTHZREUSE": "0",
}
"""Pebble's knobs for fast, deterministic tests."""

BLOCKED_DOMAIN = "blocked.example.test"
"""A name the fixture's Pebble refuses to issue for (an order failure on demand)."""

_START_TIMEOUT = 15.0


@attrs.frozen
class PebbleServer:
    """A running Pebble and the challtestsrv it resolves names with."""

    directory_url: str
    management_url: str
    ca_bundle: Path
    http_port: int
    dns_port: int
    challtestsrv_url: str
    log_file: Path

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _get(self, url: str) -> bytes:
        # Loopback URLs this module built itself.
        with urllib.request.urlopen(url, context=self._context(), timeout=10) as response:  # noqa: S310
            data: bytes = response.read()
            return data

    def root_pem(self) -> str:
        """The PEM of the root that signs issued certificates (``/roots/0``)."""
        return self._get(f"{self.management_url}/roots/0").decode("ascii")

    def cert_status(self, serial: int) -> dict[str, Any]:
        """Pebble's view of an issued certificate: ``{"Status": "Valid" | "Revoked", ...}``."""
        url = f"{self.management_url}/cert-status-by-serial/{serial:x}"
        status: dict[str, Any] = json.loads(self._get(url))
        return status

    def challtestsrv(self, command: str, body: dict[str, Any]) -> None:
        """POST a JSON command to challtestsrv's management API (``set-txt``, ``clear-txt``)."""
        request = urllib.request.Request(  # noqa: S310 - a loopback http:// URL
            f"{self.challtestsrv_url}/{command}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            response.read()

    def log(self) -> str:
        """What Pebble printed so far (useful in assertion messages)."""
        return self.log_file.read_text(errors="replace")


def _pebble_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1/localhost: (ca file, cert file, key file).

    The master's own issuing code makes them (its CA, a server certificate it signs),
    unencrypted: Pebble reads the key as it is.
    """
    files = ensure_tls_material(directory / "tls", hostnames=("localhost", "127.0.0.1"))
    return files.ca_cert, files.cert, files.key


def _wait_ready(url: str, context: ssl.SSLContext | None, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, context=context, timeout=1) as response:  # noqa: S310
                response.read()
            return
        except urllib.error.HTTPError as exc:  # it answered: up, even when with a 404
            exc.close()
            return
        except OSError:  # URLError is an OSError: not listening yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {_START_TIMEOUT:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def run_pebble(
    workdir: Path,
    *,
    http_port: int | None = None,
    pebble_binary: str = "pebble",
    challtestsrv_binary: str = "pebble-challtestsrv",
    blocked_domains: Sequence[str] = (BLOCKED_DOMAIN,),
) -> Iterator[PebbleServer]:
    """Run challtestsrv and Pebble on loopback until the block exits.

    :param http_port: where Pebble sends HTTP-01 validation requests (default: a free port).
    :param blocked_domains: names Pebble refuses to issue for (``rejectedIdentifier``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = _pebble_tls(workdir)
    acme_port, mgmt_port, dns_port, chall_port = (free_port() for _ in range(4))
    http_port = http_port or free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{mgmt_port}",
            "certificate": str(cert_file),
            "privateKey": str(key_file),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "domainBlocklist": list(blocked_domains),
        }
    }
    config_file = workdir / "pebble-config.json"
    config_file.write_text(json.dumps(config, indent=2))
    log_file = workdir / "pebble.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **PEBBLE_ENV}
    chall_log = (workdir / "challtestsrv.log").open("wb")
    pebble_log = log_file.open("wb")
    # Both binaries come from require_binary or the caller, never from user input.
    challtestsrv = subprocess.Popen(  # noqa: S603
        [
            challtestsrv_binary,
            "-dns01",
            f"127.0.0.1:{dns_port}",
            "-management",
            f"127.0.0.1:{chall_port}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ],
        stdout=chall_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    procs = [challtestsrv]
    try:
        chall_url = f"http://127.0.0.1:{chall_port}"
        _wait_ready(f"{chall_url}/", None, challtestsrv)
        pebble_proc = subprocess.Popen(  # noqa: S603
            [
                pebble_binary,
                "-config",
                str(config_file),
                "-dnsserver",
                f"127.0.0.1:{dns_port}",
            ],
            stdout=pebble_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        procs.append(pebble_proc)
        context = ssl.create_default_context(cafile=str(ca_file))
        directory_url = f"https://127.0.0.1:{acme_port}/dir"
        _wait_ready(directory_url, context, pebble_proc)
        yield PebbleServer(
            directory_url=directory_url,
            management_url=f"https://127.0.0.1:{mgmt_port}",
            ca_bundle=ca_file,
            http_port=http_port,
            dns_port=dns_port,
            challtestsrv_url=chall_url,
            log_file=log_file,
        )
    finally:
        for proc in reversed(procs):
            _stop(proc)
        chall_log.close()
        pebble_log.close()


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleServer]:
    """A Pebble ACME server on loopback for the whole session (skipped locally when missing).

    Point a plain-HTTP nginx listener at ``pebble.http_port`` to serve HTTP-01 challenges.
    """
    pebble_binary = require_binary("pebble")
    challtestsrv_binary = require_binary("pebble-challtestsrv")
    with run_pebble(
        tmp_path_factory.mktemp("pebble"),
        pebble_binary=pebble_binary,
        challtestsrv_binary=challtestsrv_binary,
    ) as server:
        yield server
