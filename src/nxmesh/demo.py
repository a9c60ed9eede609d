"""``nxmesh demo``: the whole product on one machine, on loopback, in one directory.

`run_demo` starts, in ``<dir>`` (``./.nxmesh-demo`` by default):

1. a tiny backend app (a thread serving "hello from the backend");
2. ``nxmesh master`` on embedded SQLite (``<dir>/master``), logged in as the first admin;
3. ``nxmesh agent`` enrolled with a bootstrap token, supervising a real nginx in its own
   prefix (``<dir>/nginx``, standalone mode);

then applies ``examples/quickstart/site.yaml`` (its ports rewritten to the demo's, every
listener on 127.0.0.1), follows the rollout until the agent reports the version's digest,
fetches the page *through nginx*, applies a change (a new response header and a new
location), shows the rendered diff and the rollout again, and fetches the page once more
to show the change live. By default everything is then stopped and the directory
removed; with ``keep_running`` it all stays up until Ctrl-C (or SIGTERM).

Every child runs in its own session with its output in ``<dir>/*.log``; any failure —
nginx missing, a port taken, a child dying, a timeout — stops every child (the agent
stops its nginx; a leftover nginx is stopped through its pid file) and raises
`DemoError` with what to do, keeping the directory so the logs can be read.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import attrs
import yaml

from nxmesh.core.errors import NxMeshError

if TYPE_CHECKING:
    from rich.console import Console

    from nxmesh.client import Client, CredentialStore

__all__ = [
    "DEFAULT_DIR",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "demo_state",
    "run_demo",
]

DEFAULT_DIR: Final = Path(".nxmesh-demo")
MARKER: Final = ".nxmesh-demo"
"""File that marks a directory as made by the demo (only such a directory is wiped)."""
WORKSPACE: Final = "default"
SITE_HOST: Final = "shop.example.com"
BACKEND_TEXT: Final = "hello from the backend"
CHANGE_HEADER: Final = "X-NxMesh-Demo"
DEMO_PROFILE: Final = "demo"
"""With ``keep_running``: the CLI profile holding the demo's admin login (removed after)."""
NXMESH: Final = (
    sys.executable,
    "-c",
    "import sys; from nxmesh.cli import main; main(sys.argv[1:])",
)
QUICKSTART: Final = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "site.yaml"

# The quickstart site, for installs without the repository's examples/ directory.
_FALLBACK_SITE: Final = """\
workspace: default
upstreams:
  - name: app
    servers:
      - address: 127.0.0.1:8000
    lb_method: least_conn
    keepalive: 16
sites:
  - name: shop
    server_names: [shop.example.com, www.shop.example.com]
    listeners:
      - port: 80
        default_server: true
    headers:
      - name: X-Frame-Options
        value: SAMEORIGIN
    locations:
      - path: /
        upstream: app
        proxy_headers:
          - name: X-Shop-Frontend
            value: nginx
      - path: /healthz
        match: exact
        return:
          code: 200
          body: ok
"""


class DemoError(NxMeshError):
    """The demo could not run; the message says why and what to do."""


@attrs.frozen(kw_only=True)
class DemoOptions:
    """What ``nxmesh demo`` is asked to do. Port 0 picks a free port."""

    directory: Path = DEFAULT_DIR
    web_port: int = 8080
    api_port: int = 8470
    backend_port: int = 8000
    site_file: Path | None = None
    nginx_binary: str = "nginx"
    keep_running: bool = False
    timeout: float = 60.0
    """Seconds each wait (master ready, agent enrolled, rollout) may take."""


@attrs.frozen(kw_only=True)
class DemoResult:
    """What the demo showed: the page before and after the change, and the versions."""

    directory: Path
    api_url: str
    site_url: str
    versions: tuple[int, ...]
    agent_id: str
    digest: str
    before: dict[str, Any]
    after: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "api_url": self.api_url,
            "site_url": self.site_url,
            "versions": list(self.versions),
            "agent_id": self.agent_id,
            "digest": self.digest,
            "before": self.before,
            "after": self.after,
            "rolled_out": True,
        }


# ---------------------------------------------------------------------------------------
# The desired state
# ---------------------------------------------------------------------------------------


def demo_state(site_file: Path | None, *, web_port: int, backend_port: int) -> dict[str, Any]:
    """The quickstart state with the demo's ports: every listener on 127.0.0.1:`web_port`,
    every upstream server on 127.0.0.1:`backend_port`."""
    path = site_file or (QUICKSTART if QUICKSTART.is_file() else None)
    try:
        text = path.read_text() if path is not None else _FALLBACK_SITE
    except OSError as exc:
        raise DemoError(f"cannot read {path}: {exc.strerror}") from None
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise DemoError(f"{path}: not a desired-state document")
    data["workspace"] = WORKSPACE
    for upstream in data.get("upstreams") or ():
        for server in upstream.get("servers") or ():
            server["address"] = f"127.0.0.1:{backend_port}"
    for site in data.get("sites") or ():
        for listener in site.get("listeners") or ():
            listener["port"] = web_port
            listener["address"] = "127.0.0.1"
    return data


def changed_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The demo's change: a response header on every site and a ``/hello`` location."""
    new: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(state)))
    for site in new.get("sites") or ():
        site.setdefault("headers", []).append(
            {"name": CHANGE_HEADER, "value": "rolled-out-by-nxmesh", "always": True}
        )
        site.setdefault("locations", []).append(
            {
                "path": "/hello",
                "match": "exact",
                "return": {"code": 200, "body": "hello from nginx, configured by NxMesh"},
            }
        )
    return new


# ---------------------------------------------------------------------------------------
# Ports, processes, the backend
# ---------------------------------------------------------------------------------------


class _FreePorts:
    """Distinct free ports on 127.0.0.1, each held bound until `close`.

    Bound and closed one at a time, the kernel may hand the same port out twice: the
    demo's gRPC listener once got the port its backend app already had.
    """

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def hold(self) -> socket.socket:
        """A new socket, closed with the others."""
        s = socket.socket()
        self._held.append(s)
        return s

    def take(self) -> int:
        s = self.hold()
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port

    def close(self) -> None:
        for s in self._held:
            s.close()


def claim_port(port: int, what: str, option: str, free: _FreePorts) -> int:
    """`port` when it is free on 127.0.0.1 (0: any free port), held by `free` so no
    other role gets it; `DemoError` when taken."""
    if port == 0:
        return free.take()
    s = free.hold()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        raise DemoError(
            f"port {port} ({what}) is already in use on 127.0.0.1; stop what uses it, "
            f"or pick another with {option} N (0 picks any free port)"
        ) from None
    return port


class _Backend(http.server.BaseHTTPRequestHandler):
    """The demo's "application": answers every GET with a line of text."""

    def do_GET(self) -> None:
        via = self.headers.get("X-Shop-Frontend", "nothing (direct)")
        body = f"{BACKEND_TEXT} (path {self.path}, proxied by {via})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: the demo prints what matters


@attrs.define
class Child:
    """A child process in its own session, its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], log: Path, cwd: Path) -> Child:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NXMESH_")}
        env.update(NXMESH_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        with log.open("ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and fixed args
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops us in order
            )
        return cls(name, proc, log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text[-lines:])

    def died(self) -> DemoError:
        return DemoError(
            f"{self.name} exited with status {self.proc.returncode}; the end of "
            f"{self.log}:\n{self.tail()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL for the whole session after `timeout` seconds."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _stop_nginx_by_pid_file(pid_file: Path) -> None:
    """Stop an nginx a crashed run left behind (only if the pid really is an nginx)."""
    import psutil

    from nxmesh.agent.process import nginx_pid_in, quit_then_kill

    pid = nginx_pid_in(pid_file)
    if pid is None:
        return
    with contextlib.suppress(psutil.NoSuchProcess):  # exited meanwhile
        quit_then_kill([psutil.Process(pid)], timeout=10)


def _wait(what: str, check: Callable[[], Any], *, timeout: float, children: list[Child]) -> Any:
    """Poll `check` until it returns something truthy; fail fast when a child died."""
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            if not child.alive():
                raise child.died()
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            logs = ", ".join(str(c.log) for c in children)
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}; see {logs}")
        time.sleep(0.1)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_toml(path: Path, data: Mapping[str, Any]) -> None:
    """A small TOML writer for the demo's settings files: top-level scalars, then one
    table per top-level mapping (nested mappings inline)."""
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for key, table in data.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@attrs.define
class _Ports:
    web: int
    api: int
    backend: int
    status: int
    metrics: int
    grpc: int


@contextlib.contextmanager
def _demo_directory(directory: Path) -> Iterator[IO[str]]:
    """Make (or reuse) the demo directory, locked for this run; wipe an earlier run's."""
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()) and not (directory / MARKER).exists():
        raise DemoError(
            f"{directory} exists and was not made by nxmesh demo; pick another with --dir"
        )
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / MARKER).open("a+")
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(
                f"another nxmesh demo is running in {directory}; stop it (Ctrl-C) first"
            ) from None
        _stop_nginx_by_pid_file(directory / "nginx" / "logs" / "nginx.pid")
        for entry in directory.iterdir():
            if entry.name == MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        yield lock
    finally:
        lock.close()


def _transports() -> tuple[str, ...]:
    """gRPC (TLS, the master's CA pinned) when its plugin is installed, then WebSocket
    (built in, mounted on the API's port): the agent tries them in this order."""
    from nxmesh.core.pluginmanager import get_plugin_manager
    from nxmesh.core.registry import ProviderRegistries

    names = ProviderRegistries.collect(get_plugin_manager())["transport"].names()
    return tuple(name for name in ("grpc", "websocket") if name in names)


class _Demo:
    """One demo run: its children, the backend, and what it printed."""

    def __init__(self, options: DemoOptions, out: Console, directory: Path) -> None:
        self.options = options
        self.out = out
        self.dir = directory
        self.children: list[Child] = []
        self.backend: http.server.ThreadingHTTPServer | None = None
        self.client: Client | None = None
        self.stored_profile: CredentialStore | None = None
        self.transports = _transports()

    # -- steps --------------------------------------------------------------------------

    def say(self, text: str, style: str | None = None) -> None:
        self.out.print(text, style=style)

    def step(self, text: str) -> None:
        self.out.print(f"\n==> {text}", style="bold")

    def check_nginx(self) -> str:
        from nxmesh.nginx_check import NginxNotFoundError, find_nginx

        try:
            return find_nginx(self.options.nginx_binary)
        except NginxNotFoundError as exc:
            raise DemoError(
                f"{exc}. The demo runs a real nginx: install it (Debian/Ubuntu: "
                "apt-get install nginx-light, or run ./scripts/demo.sh as root, which does), "
                "or name the binary with --nginx PATH"
            ) from None

    def claim_ports(self) -> _Ports:
        o = self.options
        named: dict[int, str] = {}  # port given → the option that gave it
        for port, option in (
            (o.web_port, "--web-port"),
            (o.api_port, "--api-port"),
            (o.backend_port, "--backend-port"),
        ):
            if port and port in named:
                raise DemoError(
                    f"{named[port]} and {option} both name port {port}; give each its own"
                )
            named[port] = option
        free = _FreePorts()
        try:
            ports = _Ports(
                web=claim_port(o.web_port, "the site served by nginx", "--web-port", free),
                api=claim_port(o.api_port, "the master API", "--api-port", free),
                backend=claim_port(o.backend_port, "the backend app", "--backend-port", free),
                status=free.take(),
                metrics=free.take(),
                grpc=free.take(),
            )
        finally:
            free.close()
        return ports

    def start_backend(self, port: int) -> None:
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Backend)
        except OSError as exc:
            raise DemoError(f"cannot start the backend on 127.0.0.1:{port}: {exc}") from None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="demo-backend", daemon=True).start()
        self.backend = server

    def start_master(self, ports: _Ports) -> str:
        config = self.dir / "master.toml"
        write_toml(
            config,
            {
                "state_dir": str(self.dir / "master"),
                "log_format": "json",
                "master": {
                    "api_host": "127.0.0.1",
                    "api_port": ports.api,
                    "grpc_port": ports.grpc,
                    "transports": list(self.transports),
                },
            },
        )
        master = Child.start(
            "nxmesh master",
            [*NXMESH, "--config", str(config), "master"],
            self.dir / "master.log",
            self.dir,
        )
        self.children.append(master)
        url = f"http://127.0.0.1:{ports.api}"
        from nxmesh.client import Client, Profile

        probe = Client(Profile(url=url), timeout=5.0)
        try:
            _wait(
                "the master to be ready",
                probe.ready,
                timeout=self.options.timeout,
                children=[master],
            )
        finally:
            probe.close()
        return url

    def login(self, url: str) -> Client:
        from nxmesh.client import Client, Profile

        password_file = self.dir / "master" / "initial-admin-password"
        client = Client(Profile(url=url))
        client.login("admin", password_file.read_text().strip())
        self.client = client
        return client

    def agent_config(self, ports: _Ports, nginx: str) -> Path:
        """The agent's settings: every master endpoint in order, the master's CA pinned."""
        endpoints = {
            "grpc": f"grpcs://127.0.0.1:{ports.grpc}",
            "websocket": f"ws://127.0.0.1:{ports.api}/agent",
        }
        config = self.dir / "agent.toml"
        write_toml(
            config,
            {
                "state_dir": str(self.dir / "agent"),
                "log_format": "json",
                "agent": {
                    "name": "demo-agent",
                    "endpoints": [endpoints[name] for name in self.transports],
                    "ca_file": str(self.master_ca),
                    "deployment_mode": "standalone",
                    "conf_dir": str(self.dir / "nginx"),
                    "nginx_binary": nginx,
                    "metrics_port": ports.metrics,
                    "health_interval": 5.0,
                    "labels": {"demo": "true"},
                },
                "plugins.nginx_driver": {"status_port": ports.status},
            },
        )
        return config

    @property
    def master_ca(self) -> Path:
        """The CA the master's gRPC certificate comes from (agents pin it)."""
        return self.dir / "master" / "tls" / "ca.pem"

    def wait_agent_plane(self) -> None:
        """The agent transports start right after the API: wait for the master's CA."""
        if "grpc" in self.transports:
            _wait(
                "the master's agent transports",
                self.master_ca.exists,
                timeout=self.options.timeout,
                children=self.children,
            )

    def start_agent(self, config: Path, args: list[str]) -> Child:
        agent = Child.start(
            "nxmesh agent",
            [*NXMESH, "--config", str(config), "agent", *args],
            self.dir / "agent.log",
            self.dir,
        )
        self.children.append(agent)
        return agent

    def enroll_agent(self, client: Client, config: Path) -> Child:
        """Start the agent with a fresh single-use bootstrap token (in a 0600 file)."""
        token = client.create_bootstrap_token(WORKSPACE, labels={"demo": "true"}, ttl=600)
        token_file = self.dir / "bootstrap-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token.token + "\n")
        # A token in argv would be visible to every user in `ps`: pass the file instead.
        return self.start_agent(config, ["--bootstrap-token-file", str(token_file)])

    def wait_enrolled(self, client: Client) -> str:
        def online() -> str | None:
            for agent in client.list_agents(WORKSPACE):
                if agent.status == "online":
                    return agent.id
            return None

        agent_id: str = _wait(
            "the agent to enroll and connect",
            online,
            timeout=self.options.timeout,
            children=self.children,
        )
        return agent_id

    def apply(self, client: Client, state: Mapping[str, Any], message: str) -> int:
        from nxmesh.cli.client_support import print_diff

        preview = client.dry_run(WORKSPACE, state)
        for line in preview.summary.splitlines():
            self.say(f"  {line}")
        if preview.base_version is not None:
            print_diff(self.out, preview.bundle_diff)
        result = client.put_state(
            WORKSPACE, state, message=message, expected_version=preview.base_version or 0
        )
        self.say(f"stored as version {result.number} ({result.digest[:12]})", "green")
        return result.number

    def rollout(self, client: Client, version: int) -> str:
        from nxmesh.cli.rollout_cmd import watch_rollout

        snapshot = watch_rollout(
            client,
            WORKSPACE,
            version,
            out=self.out,
            timeout=self.options.timeout,
            interval=0.2,
            min_agents=1,
        )
        for child in self.children:
            if not child.alive():
                raise child.died()
        if snapshot is None:
            raise DemoError(f"workspace {WORKSPACE!r} has no version {version}")
        if snapshot.failed or not snapshot.converged or not snapshot.agents:
            detail = "; ".join(f"{a.agent_id}: {a.detail}" for a in snapshot.agents)
            log = self.dir / "agent.log"
            raise DemoError(
                f"version {version} did not roll out ({detail or 'no agent'}); see {log}"
            )
        return snapshot.digest

    def fetch(self, port: int, path: str = "/") -> dict[str, Any]:
        import httpx

        url = f"http://127.0.0.1:{port}{path}"
        last: Exception | None = None
        for _ in range(50):
            try:
                response = httpx.get(url, headers={"Host": SITE_HOST}, timeout=5.0)
            except httpx.HTTPError as exc:
                last = exc
                time.sleep(0.1)
                continue
            shown = {
                k: v
                for k, v in response.headers.items()
                if k.lower().startswith("x-") or k.lower() in ("server", "content-type")
            }
            return {
                "url": url,
                "status": response.status_code,
                "headers": shown,
                "body": response.text.strip(),
            }
        raise DemoError(f"nginx did not answer {url}: {last}")

    def show_page(self, page: Mapping[str, Any]) -> None:
        self.say(f"$ curl -i -H 'Host: {SITE_HOST}' {page['url']}", "dim")
        self.say(f"HTTP {page['status']}")
        for key, value in page["headers"].items():
            style = "green" if key.lower() == CHANGE_HEADER.lower() else None
            self.say(f"{key}: {value}", style)
        self.say("")
        self.say(page["body"], "bold")

    def keep_running(self) -> None:
        """Serve until Ctrl-C or SIGTERM, with the demo's login stored as profile ``demo``."""
        from nxmesh.client import CredentialStore

        store = CredentialStore.default()
        if self.client is not None:
            store.put(DEMO_PROFILE, self.client.profile)
            self.stored_profile = store
        self.say(
            f"\neverything keeps running; try: nxmesh versions list --profile {DEMO_PROFILE}"
            f"  |  nxmesh rollout status --profile {DEMO_PROFILE}",
        )
        self.say("press Ctrl-C to stop and clean up", "bold")
        _wait_for_signal(self)

    # -- teardown -----------------------------------------------------------------------

    def stop(self) -> None:
        """Agent first (it stops its nginx), then the master, then the backend."""
        if self.client is not None:
            self.client.close()
        if self.stored_profile is not None:
            with contextlib.suppress(NxMeshError):
                self.stored_profile.remove(DEMO_PROFILE)
        for child in reversed(self.children):
            child.stop()
        _stop_nginx_by_pid_file(self.dir / "nginx" / "logs" / "nginx.pid")
        if self.backend is not None:
            self.backend.shutdown()
            self.backend.server_close()


def _wait_for_signal(demo: _Demo) -> None:
    """Serve until Ctrl-C or SIGTERM; a child dying ends the wait with its error."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            for child in demo.children:
                if not child.alive():
                    raise child.died()
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(
    options: DemoOptions,
    out: Console,
    *,
    on_ready: Callable[[DemoResult], None] | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring); `out` receives the narration.

    `on_ready` is called once the change is live (before waiting, with `keep_running`).
    The directory is removed afterwards unless the demo failed (its logs are kept).
    """
    with _demo_directory(options.directory):
        directory = options.directory.resolve()
        demo = _Demo(options, out, directory)
        ok = False
        try:
            result = _run(demo, directory)
            if on_ready is not None:
                on_ready(result)
            if options.keep_running:
                demo.keep_running()
            ok = True
        finally:
            if demo.children or demo.backend is not None:
                out.print("\n==> stopping the agent (and its nginx), the master and the backend")
            demo.stop()
            if not ok:
                logs = sorted(p.relative_to(directory) for p in directory.rglob("*.log"))
                if logs:
                    names = ", ".join(map(str, logs))
                    out.print(f"logs kept in {directory}: {names}", style="yellow")
                else:  # it failed before anything ran: nothing to read there
                    out.print(f"nothing had started; {directory} kept", style="yellow")
        for entry in directory.iterdir():
            if entry.name != MARKER:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    with contextlib.suppress(OSError):
        (directory / MARKER).unlink()
        directory.rmdir()
    out.print(f"stopped; {directory} removed")
    return result


def _run(demo: _Demo, directory: Path) -> DemoResult:
    options = demo.options
    demo.step("checking the machine")
    nginx = demo.check_nginx()
    ports = demo.claim_ports()
    demo.say(f"nginx: {nginx}; ports: site {ports.web}, API {ports.api}, backend {ports.backend}")

    demo.step(f"starting the backend app on 127.0.0.1:{ports.backend}")
    demo.start_backend(ports.backend)

    demo.step("starting the master (embedded SQLite)")
    api_url = demo.start_master(ports)
    client = demo.login(api_url)
    demo.say(f"master API: {api_url} (docs: {api_url}/docs); logged in as admin")

    state = demo_state(options.site_file, web_port=ports.web, backend_port=ports.backend)
    site_copy = directory / "site.yaml"
    site_copy.write_text(
        "# examples/quickstart/site.yaml with the demo's ports (written by nxmesh demo)\n"
        + yaml.safe_dump(state, sort_keys=False)
    )
    demo.step("enrolling an agent that supervises a real nginx")
    demo.wait_agent_plane()
    config = demo.agent_config(ports, nginx)
    demo.enroll_agent(client, config)
    agent_id = demo.wait_enrolled(client)
    tried = ", then ".join(demo.transports)
    demo.say(f"agent demo-agent enrolled as {agent_id} and connected ({tried} tried in order)")

    demo.step("applying examples/quickstart/site.yaml (ports adapted to the demo)")
    first = demo.apply(client, state, "demo: quickstart site")
    demo.rollout(client, first)

    demo.step("fetching the page through nginx")
    before = demo.fetch(ports.web)
    demo.show_page(before)
    if BACKEND_TEXT not in before["body"]:
        raise DemoError(f"nginx answered {before['status']} without the backend's page")

    demo.step(f"applying a change: a {CHANGE_HEADER} header and a /hello location")
    second = demo.apply(client, changed_state(state), "demo: add a header and /hello")
    digest = demo.rollout(client, second)

    demo.step("fetching the page again: the change is live")
    after = demo.fetch(ports.web)
    demo.show_page(after)
    hello = demo.fetch(ports.web, "/hello")
    demo.say(f"GET /hello → {hello['status']} {hello['body']}")
    if CHANGE_HEADER.lower() not in {k.lower() for k in after["headers"]}:
        raise DemoError(f"the {CHANGE_HEADER} header is not in nginx's answer")

    site_url = f"http://127.0.0.1:{ports.web}/"
    demo.step(
        "where things are (Ctrl-C stops them)"
        if options.keep_running
        else "where things were (--keep-running keeps them up to explore)"
    )
    rows = [
        ("directory", str(directory)),
        ("site", f"{site_url}  (curl -H 'Host: {SITE_HOST}' {site_url})"),
        ("master API", f"{api_url}  (docs {api_url}/docs)"),
        ("admin password", str(directory / "master" / "initial-admin-password")),
        ("logs", "master.log, agent.log, nginx/logs/"),
        ("nginx config", str(directory / "nginx" / "current")),
    ]
    for key, value in rows:
        demo.say(f"  {key:<15} {value}")
    return DemoResult(
        directory=directory,
        api_url=api_url,
        site_url=site_url,
        versions=(first, second),
        agent_id=agent_id,
        digest=digest,
        before=before,
        after=after,
    )
