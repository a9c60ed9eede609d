"""What an agent process imports is what its idle PSS is made of (bench/agent_reliability.py,
bench/convergence_bench.py): guard the cheap wins.

Building the master link of ``nxmesh agent`` used to build *every* provider kind, so a
connected agent imported SQLAlchemy, Alembic, psycopg and the master's authenticators
(76 MB PSS instead of 46 MB). Only the transport kind is needed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio

from nxmesh.agent.harness import multi_site_state
from nxmesh.agent.http import http_get
from nxmesh.core.serialization import unstructure
from nxmesh.testing.footprint import agent_with_module_dump, held_modules
from nxmesh.testing.nginx import free_port

CODE = """
import sys
from pathlib import Path
from nxmesh.cli.agent_cmd import _master_link
from nxmesh.cli.context import CliContext
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import load_settings

pm = get_plugin_manager()
settings = load_settings(pm, path=None)
link = _master_link(CliContext(pm=pm, config_path=None), settings, "0011223344556677.x", None)
assert link is not None
heavy = ["sqlalchemy", "alembic", "psycopg", "litestar", "acme", "nxmesh.master.auth.links",
         "wsproto", "h11"]
print([m for m in heavy if m in sys.modules])
"""


def test_the_agents_master_link_imports_no_master_side_library(tmp_path: Path) -> None:
    """The link ``nxmesh agent`` builds pulls in transports only, not storage or auth, and
    not the WebSocket implementation before the fallback is tried (~2.5 MB)."""
    env = {"NXMESH_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=tmp_path,
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


# Libraries (and our own modules pulling them in) an idle masterless agent does without:
# the gRPC/WebSocket link and its wire crypto, the master's key checks, the client
# commands' output, rich (the `nxmesh-agent` daemon keeps structlog from loading it),
# OpenTelemetry without a configured SDK.
NOT_IN_A_MASTERLESS_AGENT = (
    "cryptography",
    "opentelemetry",
    "nxmesh.crypto.secrets",
    "nxmesh.crypto.signing",
    "nxmesh.agent_link",
    "nxmesh.core.protocol",
    "nxmesh.cli.client_cmds",
    "nxmesh.cli.client_support",
    "nxmesh.cli.fleet_cmds",
    "nxmesh.cli.rollout_cmd",
    "nxmesh.cli.demo_cmd",
    "nxmesh.cli.render_cmd",
    "nxmesh.cli.validate_cmd",
    "nxmesh.cli.versions_cmd",
    "nxmesh.cli.plugins_cmd",
    "rich",
    "pygments",
)


def _serving_agent_modules(tmp_path: Path, nginx: str, run: str) -> set[str]:
    """Start the agent on `tmp_path`'s state file, wait until nginx serves it, return
    the modules it has imported, stop it."""
    state = tmp_path / "state.json"
    port, status = map(int, state.with_suffix(".ports").read_text().split())
    env = {
        "PATH": "/usr/bin:/bin",
        "NXMESH_STATE_DIR": str(tmp_path / "state"),
        "NXMESH_AGENT__CONF_DIR": str(tmp_path / "nginx"),
        "NXMESH_AGENT__NGINX_BINARY": nginx,
        "NXMESH_AGENT__DEPLOYMENT_MODE": "standalone",
        "NXMESH_AGENT__METRICS_PORT": "0",
        "NXMESH_PLUGINS__NGINX_DRIVER__STATUS_PORT": str(status),
        "NXMESH_LOG_LEVEL": "warning",
        # The example plugin overrides templates, which are compiled (jinja2) at start.
        "NXMESH_DISABLE_PLUGINS": "hello",
    }
    out = tmp_path / f"{run}.modules"
    log = tmp_path / f"{run}.log"
    with log.open("wb") as stderr:
        agent = subprocess.Popen(
            agent_with_module_dump(["--state", str(state)], out),
            env=env,
            cwd=tmp_path,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        # Served, and recorded as the last good entry (what a restart boots from).
        last_good = tmp_path / "state" / "agent" / "last_good.json"
        while anyio.run(_body, port) != "footprint" or not last_good.exists():
            assert agent.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the agent never served its state file"
            time.sleep(0.05)
        modules = held_modules(out, alive=lambda: agent.poll() is None)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    return modules


async def _body(port: int) -> str:
    try:
        response = await http_get("127.0.0.1", port, "/", host_header="localhost")
    except (OSError, anyio.BrokenResourceError, anyio.EndOfStream):  # nginx starting
        return ""
    return response.text.strip()


def test_a_masterless_agent_imports_none_of_the_client_or_link_libraries(
    tmp_path: Path, nginx_binary: str
) -> None:
    """Started from its state file, and restarted from its cache: every byte of these
    would be idle PSS (bench/results/idle.json). The restarted one renders nothing."""
    port = free_port()
    state = tmp_path / "state.json"
    state.write_text(json.dumps(unstructure(multi_site_state(port, "footprint"))))
    state.with_suffix(".ports").write_text(f"{port} {free_port()}")
    for run in ("first-start", "restart-from-cache"):
        modules = _serving_agent_modules(tmp_path, nginx_binary, run)
        assert "nxmesh.agent.app" in modules  # the dump saw a real agent
        regrown = [m for m in NOT_IN_A_MASTERLESS_AGENT if m in modules]
        assert regrown == [], f"{run}: {regrown}"
    # Nothing to render: the cached bundle is served as it is, without jinja2.
    assert "jinja2" not in modules
