"""Fixtures of the CLI-as-API-client tests: a real ``nxmesh master`` process, the CLI.

The master is the reference app started as ``nxmesh master`` on 127.0.0.1:<free port>
with its state (SQLite, keys, the first admin) in a temp directory, once per module; its
log goes to a file the tests read. Each test logs in with its own credentials directory
(``NXMESH_TEST_CONFIG_HOME``) and works in its own workspace, so tests do not see each
other's versions. Agents are written straight into the master's SQLite database (the
transports that enroll real agents are tested elsewhere).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import attrs
import click
import httpx
import pytest
from click.testing import CliRunner, Result

from nxmesh.cli import build_cli
from nxmesh.client import ENV_CONFIG_HOME
from nxmesh.core.interfaces import StorageBackend
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.testing.nginx import free_port

T = TypeVar("T")

# Cheap argon2 costs: production keeps RFC 9106's; these tests log in dozens of times.
FAST_HASHING = {
    "NXMESH_AUTH__ARGON2_TIME_COST": "1",
    "NXMESH_AUTH__ARGON2_MEMORY_KIB": "8",
    "NXMESH_AUTH__ARGON2_PARALLELISM": "1",
}
NXMESH = [sys.executable, "-c", "import sys; from nxmesh.cli import main; main(sys.argv[1:])"]


@attrs.define
class ApiMaster:
    """A running ``nxmesh master`` process."""

    url: str
    state_dir: Path
    log: Path

    @property
    def admin_password(self) -> str:
        return (self.state_dir / "initial-admin-password").read_text().strip()

    def storage(self, fn: Callable[[StorageBackend], Coroutine[Any, Any, T]]) -> T:
        """Run ``await fn(storage)`` on the master's own database, from this process."""
        url = f"sqlite:///{self.state_dir / 'master.db'}"
        pm = get_plugin_manager(autoload=False, environ={})
        backend_cls = ProviderRegistries.collect(pm)["storage"].by_scheme(url)

        async def run() -> T:
            backend = backend_cls(url)
            await backend.open()
            try:
                return await fn(backend)
            finally:
                await backend.aclose()

        return anyio.run(run)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Listening is not ready: the first start makes keys, the database and the admin."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nxmesh master exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"nxmesh master never became ready:\n{log.read_text()}")


@pytest.fixture(scope="module")
def api_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiMaster]:
    """``nxmesh master`` on 127.0.0.1:<free port>, shared by a module's tests."""
    root = tmp_path_factory.mktemp("api-master")
    state, log = root / "state", root / "master.log"
    port = free_port()
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("NXMESH_")}
        | FAST_HASHING
        | {"NXMESH_LOG_FORMAT": "json", "NXMESH_DISABLE_PLUGIN_AUTOLOAD": "1"}
        # Agents would use the WebSocket mounted on the API port; no gRPC port to collide.
        | {"NXMESH_MASTER__TRANSPORTS": "websocket"}
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*NXMESH, "master", "--host", "127.0.0.1", "--port", str(port), "--state-dir",
             str(state)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield ApiMaster(url=url, state_dir=state, log=log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@attrs.define
class Cli:
    """``nxmesh`` run in-process with its own credentials directory."""

    command: click.Group
    config_home: Path
    master: ApiMaster

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(self.command, list(args), input=input, catch_exceptions=False)

    def login(self, username: str = "admin", password: str | None = None, *extra: str) -> Result:
        secret = self.master.admin_password if password is None else password
        return self(
            "login",
            "--url",
            self.master.url,
            "--username",
            username,
            "--password-stdin",
            *extra,
            input=secret + "\n",
        )

    @property
    def credentials(self) -> Path:
        return self.config_home / "nxmesh" / "credentials.json"


@pytest.fixture(scope="module")
def cli_command() -> click.Group:
    """The root group, built once (it loads the plugin manager)."""
    return build_cli([])


@pytest.fixture
def cli(
    cli_command: click.Group,
    api_master: ApiMaster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    """The CLI, not logged in yet, storing credentials under this test's tmp dir."""
    home = tmp_path / "config"
    monkeypatch.setenv(ENV_CONFIG_HOME, str(home))
    return Cli(cli_command, home, api_master)


@pytest.fixture
def workspace(request: pytest.FixtureRequest) -> str:
    """A workspace of this test's own (a valid workspace name made from the test name)."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return ("t-" + name)[:60].rstrip("-")
