"""End-to-end fixtures: a real ``nxmesh master`` and real ``nxmesh agent`` processes, each
agent supervising its own real nginx, all on loopback.

* The master runs with its state (SQLite by default, or a fresh PostgreSQL database) in a
  temp directory, its API and WebSocket transport on one free port, gRPC (TLS, its own
  CA) on another. It can be stopped, ``kill -9``-ed and restarted on the same ports.
* Each agent has its own state directory, nginx prefix, status and metrics ports, and
  binds the sites' address-less listeners to its own loopback address (``127.0.0.2``,
  ``127.0.0.3``...) through ``agent.listen_address``, so two nginx serve the same site
  port side by side and each can be fetched on its own.
* Every process runs in its own session and is killed at teardown (its nginx too);
  every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import pytest

from nxmesh.core.model import (
    DesiredState,
    Listener,
    Location,
    Return,
    Site,
    Upstream,
    UpstreamServer,
)
from nxmesh.core.serialization import unstructure
from nxmesh.testing.nginx import free_port
from nxmesh.testing.services import require_binary

T = TypeVar("T")

NXMESH = [sys.executable, "-c", "import sys; from nxmesh.cli import main; main(sys.argv[1:])"]
# Agents run as deployments run them: the `nxmesh-agent` daemon entry point.
NXMESH_AGENT = [
    sys.executable, "-c", "import sys; from nxmesh.agent_daemon import main; main(sys.argv[1:])"
]  # fmt: skip
FAST_HASHING = {"argon2_time_cost": 1, "argon2_memory_kib": 8, "argon2_parallelism": 1}
WORKSPACE = "default"


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float = 20.0,
             interval: float = 0.1, logs: tuple[Path, ...] = ()) -> T:  # fmt: skip
    """Poll `probe` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    tails = "\n".join(f"--- {p.name} ---\n{_tail(p)}" for p in logs)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\n{tails}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """A flat TOML writer: top-level keys, then one table per dict value."""
    top = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"\n[{name}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in table.items())
        for name, table in data.items()
        if isinstance(table, dict)
    ]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NXMESH_")} | {
        "NXMESH_LOG_FORMAT": "json"
    }


@attrs.define(eq=False)
class Process:
    """One child process in its own session, output in `log`."""

    name: str
    args: list[str]
    log: Path
    cwd: Path
    env: dict[str, str] = attrs.field(factory=_clean_env)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """``kill -9`` (the process only: a supervised nginx is left to `Agent.stop`)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None


@attrs.define(eq=False)
class Master:
    """``nxmesh master`` with its state in `root`, on fixed free ports across restarts."""

    root: Path
    storage_url: str = ""
    event_bus_url: str = "memory://"
    api_port: int = attrs.field(factory=free_port)
    grpc_port: int = attrs.field(factory=free_port)
    api_tls: bool = False
    process: Process = attrs.field(init=False)
    _token: str | None = None

    def __attrs_post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "master.toml"
        write_toml(
            config,
            {
                "state_dir": self.state_dir,
                "storage_url": self.storage_url,
                "event_bus_url": self.event_bus_url,
                "log_format": "json",
                "master": {
                    "api_host": "127.0.0.1",
                    "api_port": self.api_port,
                    "grpc_port": self.grpc_port,
                    "transports": ["grpc", "websocket"],
                    "heartbeat_interval": 5.0,
                    "api_tls": self.api_tls,
                },
                "auth": FAST_HASHING,
            },
        )
        self.process = Process(
            "master", [*NXMESH, "--config", str(config), "master"], self.root / "master.log",
            self.root,
        )  # fmt: skip

    @property
    def state_dir(self) -> Path:
        return self.root / "master"

    @property
    def url(self) -> str:
        return f"{'https' if self.api_tls else 'http'}://127.0.0.1:{self.api_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What the API client trusts: the master's own CA when the API serves HTTPS."""
        return ssl.create_default_context(cafile=self.ca_file) if self.api_tls else True

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def share_keys_with(self, other: Master) -> None:
        """Masters sharing a database share its keys: the master key (secrets at rest),
        the version-signing key (agents pin it), the API token key and the transport CA."""
        import shutil

        self.state_dir.mkdir(parents=True, exist_ok=True)
        for name in ("master.key", "signing.key", "signing.pub", "api-jwt.key"):
            shutil.copy2(other.state_dir / name, self.state_dir / name)
        shutil.copytree(other.state_dir / "tls", self.state_dir / "tls", dirs_exist_ok=True)
        shutil.copy2(other.state_dir / "initial-admin-password",
                     self.state_dir / "initial-admin-password")  # fmt: skip

    def start(self) -> None:
        self.process.start()
        wait_for("the master's API", self._ready, timeout=30, logs=(self.process.log,))
        # The agent plane starts right after the API: its CA and gRPC listener.
        wait_for("the master's agent transports", self._plane_ready, timeout=15,
                 logs=(self.process.log,))  # fmt: skip

    def _ready(self) -> bool:
        if not self.process.alive():
            pytest.fail(f"nxmesh master exited:\n{_tail(self.process.log)}")
        if self.api_tls and not self.ca_file.exists():
            return False
        return httpx.get(f"{self.url}/readyz", timeout=2, verify=self.verify).status_code == 200

    def _plane_ready(self) -> bool:
        return "agent transports ready" in self.process.log.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        self.process.stop()

    def kill9(self) -> None:
        self.process.kill()

    # -- the API -------------------------------------------------------------------------

    def _login(self) -> str:
        password = (self.state_dir / "initial-admin-password").read_text().strip()
        response = httpx.post(
            f"{self.url}/api/v1/auth/login",
            json={"username": "admin", "password": password},
            timeout=10,
            verify=self.verify,
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._token is None:
            self._token = self._login()
        response = httpx.request(
            method,
            f"{self.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=15,
            verify=self.verify,
            **kwargs,
        )
        if response.status_code == 401:  # a restarted master keeps its keys; expired?
            self._token = self._login()
            return self.api(method, path, **kwargs)
        if response.status_code >= 400:
            pytest.fail(f"{method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    def token(self, **labels: str) -> str:
        body = {"labels": labels, "ttl": 600}
        created = self.api("POST", f"/workspaces/{WORKSPACE}/bootstrap-tokens", json=body)
        token: str = created["token"]
        return token

    def put_state(self, state: DesiredState, message: str = "e2e") -> dict[str, Any]:
        result: dict[str, Any] = self.api(
            "PUT", f"/workspaces/{WORKSPACE}/state", json=unstructure(state),
            params={"message": message},
        )  # fmt: skip
        return result["version"]  # type: ignore[no-any-return]

    def rollback(self, number: int) -> dict[str, Any]:
        result = self.api("POST", f"/workspaces/{WORKSPACE}/versions/{number}/rollback")
        return result["version"]  # type: ignore[no-any-return]

    def rollout(self, number: int) -> dict[str, Any]:
        view: dict[str, Any] = self.api("GET", f"/workspaces/{WORKSPACE}/versions/{number}/rollout")
        return view

    def agents(self) -> list[dict[str, Any]]:
        agents: list[dict[str, Any]] = self.api("GET", "/agents", params={"workspace": WORKSPACE})
        return agents

    def statuses(self, agent_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api("GET", f"/agents/{agent_id}/status")
        return found

    def metrics(self) -> str:
        if self._token is None:
            self._token = self._login()
        response = httpx.get(
            f"{self.url}/metrics",
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=10,
            verify=self.verify,
        )
        response.raise_for_status()
        return response.text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``/metrics`` (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        key = f"{name}{{{want}}}" if want else name
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            if sample == key:
                return float(value)
        return 0.0

    def wait_converged(self, number: int, *, agents: int, timeout: float = 30.0,
                       logs: tuple[Path, ...] = ()) -> dict[str, Any]:  # fmt: skip
        def converged() -> dict[str, Any] | None:
            view = self.rollout(number)
            done = view["converged"] and len(view["agents"]) == agents
            return view if done else None

        return wait_for(f"version {number} to converge on {agents} agents", converged,
                        timeout=timeout, logs=(self.process.log, *logs))  # fmt: skip


@attrs.define(eq=False)
class Agent:
    """``nxmesh agent`` supervising its own nginx, bound to its own loopback address."""

    root: Path
    name: str
    address: str
    master: Master
    transport: str
    nginx_binary: str
    status_port: int = attrs.field(factory=free_port)
    metrics_port: int = attrs.field(factory=free_port)
    process: Process = attrs.field(init=False)
    config: Path = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "agent.toml"
        m = self.master
        master_url = f"grpcs://127.0.0.1:{m.grpc_port}" if self.transport == "grpc" else m.url
        write_toml(
            self.config,
            {
                "state_dir": self.state_dir,
                "log_format": "json",
                "agent": {
                    "name": self.name,
                    "master_url": master_url,
                    "transports": [self.transport],
                    "ca_file": m.ca_file,
                    "deployment_mode": "standalone",
                    "conf_dir": self.conf_dir,
                    "nginx_binary": self.nginx_binary,
                    "metrics_port": self.metrics_port,
                    "listen_address": self.address,
                    "drift_interval": 60.0,
                    "health_interval": 2.0,
                    "labels": {"e2e": "yes", "node": self.name},
                },
                "plugins.nginx_driver": {
                    "status_port": self.status_port,
                    "error_log_window": 0.05,
                    "debounce": 0.02,
                    "min_reload_interval": 0.0,
                },
            },
        )
        self.process = Process(
            self.name, [*NXMESH_AGENT, "--config", str(self.config)],
            self.root / "agent.log", self.root,
        )  # fmt: skip

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def conf_dir(self) -> Path:
        return self.root / "nginx"

    @property
    def credentials(self) -> Path:
        return self.state_dir / "agent" / "credentials.json"

    @property
    def agent_id(self) -> str:
        data: dict[str, Any] = json.loads(self.credentials.read_text())
        return str(data["agent_id"])

    def start(self, token: str | None = None) -> None:
        if token is not None:
            token_file = self.root / "bootstrap-token"
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            self.process.args = [*NXMESH_AGENT, "--config", str(self.config),
                                 "--bootstrap-token-file", str(token_file)]  # fmt: skip
        else:
            self.process.args = [*NXMESH_AGENT, "--config", str(self.config)]
        self.process.start()

    def stop(self) -> None:
        """SIGTERM: the agent stops its nginx; a leftover nginx is stopped by pid file."""
        self.process.stop()
        self.stop_nginx()

    def kill(self) -> None:
        self.process.kill()

    def nginx_pid(self) -> int | None:
        try:
            pid = int((self.conf_dir / "logs" / "nginx.pid").read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def stop_nginx(self) -> None:
        pid = self.nginx_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.nginx_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.nginx_pid() is not None:
            os.kill(pid, signal.SIGKILL)

    def fetch(self, port: int, path: str = "/") -> httpx.Response:
        return httpx.get(f"http://{self.address}:{port}{path}", headers={"Host": "localhost"},
                         timeout=5)  # fmt: skip

    def body(self, port: int) -> str | None:
        try:
            response = self.fetch(port)
        except httpx.HTTPError:
            return None
        return response.text.strip() if response.status_code == 200 else None


def site_state(port: int, body: str, *, broken: bool = False) -> DesiredState:
    """One site on `port` (no address: each agent binds its own) answering `body`.

    `broken` adds an upstream whose host does not resolve: the master accepts it (it is
    well-formed), ``nginx -t`` on the agents refuses it.
    """
    upstreams = (
        (Upstream(name="ghost", servers=(UpstreamServer(address="no-such-host.invalid:80"),)),)
        if broken
        else ()
    )
    return DesiredState(
        workspace=WORKSPACE,
        sites=(
            Site(
                name="web",
                server_names=("localhost",),
                listeners=(Listener(port=port, default_server=True),),
                locations=(Location(path="/", return_=Return(code=200, body=body)),),
            ),
        ),
        upstreams=upstreams,
    )


@pytest.fixture(scope="session")
def e2e_nginx() -> str:
    """The nginx binary (skipped locally, a failure in CI, when missing)."""
    return require_binary("nginx")


@attrs.define(eq=False)
class Fleet:
    """A master and its agents; `close` kills everything."""

    master: Master
    agents: list[Agent]
    web_port: int = attrs.field(factory=free_port)
    extra: list[Master] = attrs.field(factory=list)
    """Other master processes sharing the master's database."""

    @property
    def logs(self) -> tuple[Path, ...]:
        return (
            self.master.process.log,
            *(m.process.log for m in self.extra),
            *(a.process.log for a in self.agents),
        )

    def wait_bodies(self, body: str, timeout: float = 20.0) -> None:
        for agent in self.agents:
            wait_for(f"{agent.name} to serve {body!r}", lambda a=agent: a.body(self.web_port)
                     == body, timeout=timeout, logs=self.logs)  # fmt: skip

    def close(self) -> None:
        for agent in self.agents:
            agent.process.kill()
        self.master.kill9()
        for agent in self.agents:
            agent.stop_nginx()


def make_fleet(root: Path, nginx: str, transport: str, *, agents: int = 2,
               storage_url: str = "") -> Iterator[Fleet]:  # fmt: skip
    """Start a master and `agents` enrolled agents over `transport`; kill all afterwards."""
    master = Master(root, storage_url=storage_url)
    fleet = Fleet(master, [])
    try:
        master.start()
        for i in range(agents):
            agent = Agent(root / f"agent-{i}", f"agent-{i}", f"127.0.0.{i + 2}", master,
                          transport, nginx)  # fmt: skip
            fleet.agents.append(agent)
            agent.start(master.token(node=agent.name))

        def enrolled() -> bool:
            online = [a for a in master.agents() if a["status"] == "online"]
            return len(online) == agents

        wait_for(f"{agents} agents to enroll over {transport}", enrolled, timeout=30,
                 logs=fleet.logs)  # fmt: skip
        yield fleet
    finally:
        fleet.close()
