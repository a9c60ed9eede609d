"""``master.api_tls``: the API and the agent WebSocket on it over HTTPS, with the master's
own CA — a real master, a real agent falling back to WebSocket, a real nginx, the CLI."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import NXMESH, Agent, Fleet, Master, site_state, wait_for

pytestmark = [pytest.mark.nginx]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, e2e_nginx: str) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("e2e-api-tls")
    master = Master(root, api_tls=True)
    fleet = Fleet(master, [])
    try:
        master.start()
        # The WebSocket transport: its endpoint is derived from https://, so wss://.
        agent = Agent(root / "agent", "agent", "127.0.0.2", master, "websocket", e2e_nginx)
        fleet.agents.append(agent)
        agent.start(master.token(node=agent.name))

        def enrolled() -> bool:
            return [a["status"] for a in master.agents()] == ["online"]

        wait_for("the agent to enroll over wss://", enrolled, timeout=30, logs=fleet.logs)
        yield fleet
    finally:
        fleet.close()


def test_the_api_answers_https_pinned_to_the_masters_ca_and_not_http(fleet: Fleet) -> None:
    m = fleet.master
    assert m.url.startswith("https://")
    ok = httpx.get(f"{m.url}/readyz", verify=ssl.create_default_context(cafile=m.ca_file))
    assert ok.status_code == 200
    with pytest.raises(httpx.ConnectError):  # not trusted without the pinned CA
        httpx.get(f"{m.url}/readyz", timeout=5)
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.get(f"http://127.0.0.1:{m.api_port}/readyz", timeout=5)


def test_a_version_reaches_the_agent_over_wss(fleet: Fleet) -> None:
    m = fleet.master
    version = m.put_state(site_state(fleet.web_port, "over tls"), "tls")
    m.wait_converged(version["number"], agents=1, logs=fleet.logs)
    fleet.wait_bodies("over tls")
    log = fleet.agents[0].process.log.read_text(errors="replace")
    assert "wss://127.0.0.1" in log


def test_the_cli_logs_in_with_the_ca_file(fleet: Fleet, tmp_path: Path) -> None:
    m = fleet.master
    password = (m.state_dir / "initial-admin-password").read_text().strip()
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    login = [*NXMESH, "login", "--url", m.url, "--username", "admin", "--password-stdin"]
    done = subprocess.run(
        [*login, "--ca-file", str(m.ca_file)], input=password + "\n", env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # A fresh profile: nothing remembers the CA file.
    refused = subprocess.run(
        login, input=password + "\n", env={**env, "XDG_CONFIG_HOME": str(tmp_path / "no-profile")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "certificate" in (refused.stderr + refused.stdout).lower()


def test_cert_and_key_files_must_come_together() -> None:
    from nxmesh.core.settings import MasterSettings

    with pytest.raises(ValueError, match=r"api_cert_file and master\.api_key_file"):
        MasterSettings(api_tls=True, api_cert_file=Path("/etc/cert.pem"))
    with pytest.raises(ValueError, match="set both"):
        MasterSettings(api_tls=True, api_key_file=Path("/etc/key.pem"))


def test_named_files_must_exist(tmp_path: Path) -> None:
    from nxmesh.core.errors import ConfigurationError
    from nxmesh.core.pluginmanager import get_plugin_manager
    from nxmesh.core.settings import load_settings
    from nxmesh.transports import api_tls_files

    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    settings = load_settings(
        get_plugin_manager(),
        overrides={
            "state_dir": str(tmp_path),
            "master.api_tls": True,
            "master.api_cert_file": str(cert),
            "master.api_key_file": str(tmp_path / "missing.pem"),
        },
    )
    with pytest.raises(ConfigurationError, match=r"master\.api_key_file: .*missing\.pem"):
        api_tls_files(settings)
    off = load_settings(get_plugin_manager(), overrides={"state_dir": str(tmp_path)})
    assert api_tls_files(off) is None
