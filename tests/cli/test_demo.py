"""``nxmesh demo``: run for real (master, agent, real nginx, backend, all on loopback),
non-interactively and bounded; and its failures are clear and leave nothing running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from nxmesh.demo import CHANGE_HEADER, MARKER
from nxmesh.testing.services import require_binary

NXMESH = [sys.executable, "-c", "import sys; from nxmesh.cli import main; main(sys.argv[1:])"]
FREE_PORTS = ["--web-port", "0", "--api-port", "0", "--backend-port", "0"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NXMESH_")}
    env["NXMESH_TEST_CONFIG_HOME"] = str(tmp_path / "config")
    return env


def _demo(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NXMESH, "demo", "--dir", str(tmp_path / "demo"), *args],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _processes_under(directory: Path) -> list[str]:
    """Command lines of live processes that mention `directory` (nginx, master, agent)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(directory) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(cmdline)
        except psutil.Error:
            continue
    return found


class TestDemoRun:
    """The whole demo, end to end."""

    def test_page_through_nginx_and_change_rolled_out(self, tmp_path: Path) -> None:
        """The backend's page comes through nginx, then the change is live; all cleaned up."""
        require_binary("nginx")
        result = _demo(tmp_path, *FREE_PORTS, "--json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        before, after = doc["before"], doc["after"]
        # Through nginx: nginx's Server header, and the proxy header the site's location
        # sets (X-Shop-Frontend: nginx) reached the backend.
        assert before["status"] == 200
        assert before["headers"]["server"] == "nginx"
        assert "hello from the backend (path /, proxied by nginx)" in before["body"]
        assert CHANGE_HEADER.lower() not in before["headers"]
        assert after["headers"][CHANGE_HEADER.lower()] == "rolled-out-by-nxmesh"
        assert doc["versions"] == [1, 2]
        assert len(doc["digest"]) == 64
        narration = result.stderr
        assert "+        add_header X-NxMesh-Demo rolled-out-by-nxmesh always;" in narration
        assert "GET /hello → 200 hello from nginx, configured by NxMesh" in narration
        # Through the master: the agent enrolled with a bootstrap token, and the master's
        # rollout view saw it report each version's digest.
        assert "agent demo-agent enrolled as " + doc["agent_id"] in narration
        assert "version 1: 1/1 agents applied" in narration
        assert "version 2: 1/1 agents applied" in narration
        # Default: everything stopped and the directory removed.
        assert not (tmp_path / "demo").exists()
        assert _processes_under(tmp_path / "demo") == []
        with pytest.raises(httpx.HTTPError):
            httpx.get(doc["api_url"] + "/healthz", timeout=2)

    def test_keep_running_until_sigterm(self, tmp_path: Path) -> None:
        """--keep-running serves (and stores a CLI profile) until SIGTERM, then cleans up."""
        require_binary("nginx")
        log = tmp_path / "demo.out"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*NXMESH, "demo", "--dir", str(tmp_path / "demo"), *FREE_PORTS,
                 "--keep-running"],
                env=_env(tmp_path), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while "press Ctrl-C" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            text = log.read_text()
            site = text.split("  site            ", 1)[1].split()[0]
            page = httpx.get(site, headers={"Host": "shop.example.com"}, timeout=5)
            assert page.headers[CHANGE_HEADER] == "rolled-out-by-nxmesh"
            versions = subprocess.run(
                [*NXMESH, "versions", "list", "--profile", "demo", "--json"],
                env=_env(tmp_path), capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert versions.returncode == 0, versions.stderr
            assert [v["number"] for v in json.loads(versions.stdout)] == [2, 1]
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        assert code == 0, log.read_text()
        assert not (tmp_path / "demo").exists()
        assert _processes_under(tmp_path / "demo") == []
        credentials = json.loads((tmp_path / "config" / "nxmesh" / "credentials.json").read_text())
        assert "demo" not in credentials["profiles"]


class TestDemoFailures:
    """Clear errors, and nothing left running."""

    def test_busy_port_names_the_option(self, tmp_path: Path) -> None:
        """A port in use is refused before anything starts, naming the option to change."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = _demo(tmp_path, "--web-port", str(port), "--api-port", "0",
                           "--backend-port", "0", "--nginx", sys.executable)  # fmt: skip
        assert result.returncode == 1
        assert f"port {port} (the site served by nginx) is already in use" in result.stderr
        assert "--web-port" in result.stderr
        # Nothing ran, so nothing was stopped and there are no logs to point at.
        assert "stopping the agent" not in result.stdout
        assert "logs kept" not in result.stdout + result.stderr
        assert "nothing had started" in result.stdout + result.stderr

    def test_one_port_for_two_roles_is_refused(self, tmp_path: Path) -> None:
        """The same port given to two options is refused naming both."""
        result = _demo(tmp_path, "--web-port", "18555", "--api-port", "18555",
                       "--backend-port", "0", "--nginx", sys.executable)  # fmt: skip
        assert result.returncode == 1
        assert "--web-port and --api-port both name port 18555" in result.stderr

    def test_free_ports_are_held_until_all_are_chosen(self) -> None:
        """Ports picked for the demo's roles stay bound until every one is chosen, so two
        roles never get the same one (the gRPC listener once got the backend's)."""
        from nxmesh.demo import _FreePorts

        free = _FreePorts()
        try:
            ports = [free.take() for _ in range(6)]
            assert len(set(ports)) == 6
            with socket.socket() as other, pytest.raises(OSError):
                other.bind(("127.0.0.1", ports[0]))  # still held
        finally:
            free.close()
        with socket.socket() as other:
            other.bind(("127.0.0.1", ports[0]))  # released

    def test_missing_nginx_says_how_to_install(self, tmp_path: Path) -> None:
        """Without nginx the demo says how to get it."""
        result = _demo(tmp_path, *FREE_PORTS, "--nginx", str(tmp_path / "no-nginx"))
        assert result.returncode == 1
        assert "apt-get install nginx-light" in result.stderr
        assert "--nginx PATH" in result.stderr

    def test_foreign_directory_is_not_wiped(self, tmp_path: Path) -> None:
        """A non-empty directory the demo did not make is refused, its files untouched."""
        (tmp_path / "demo").mkdir()
        precious = tmp_path / "demo" / "precious.txt"
        precious.write_text("keep me")
        result = _demo(tmp_path, *FREE_PORTS)
        assert result.returncode == 1
        assert "was not made by nxmesh demo" in result.stderr
        assert precious.read_text() == "keep me"

    def test_failure_stops_everything_and_keeps_logs(self, tmp_path: Path) -> None:
        """A site the master refuses: exit 1 naming the field, children stopped, logs kept."""
        require_binary("nginx")
        site = tmp_path / "site.yaml"
        site.write_text(
            "sites:\n"
            "  - name: shop\n"
            "    server_names: [shop.example.com]\n"
            "    listeners: [{port: 443, tls: true}]\n"
            "    tls: {certificate: not-uploaded}\n"
            "    locations: [{path: /, return: {code: 200, body: hi}}]\n"
        )
        result = _demo(tmp_path, *FREE_PORTS, "--site", str(site), "--timeout", "30")
        assert result.returncode == 1, result.stderr
        assert "sites[0].tls.certificate" in result.stderr
        assert "logs kept in" in result.stdout + result.stderr
        assert "master.log" in result.stdout + result.stderr
        demo_dir = tmp_path / "demo"
        assert (demo_dir / MARKER).exists()
        assert _processes_under(demo_dir) == []
        # The agent had enrolled: neither its token's secret nor the admin password is in
        # any log the demo kept.
        secret = (demo_dir / "bootstrap-token").read_text().strip().split(".", 1)[1]
        password = (demo_dir / "master" / "initial-admin-password").read_text().strip()
        logs = (demo_dir / "master.log").read_text() + (demo_dir / "agent.log").read_text()
        assert "enroll" in logs
        assert secret not in logs
        assert password not in logs
        assert secret not in result.stdout + result.stderr


class TestDemoDirectory:
    """Reusing the directory of an earlier run that crashed."""

    def test_a_crashed_runs_nginx_is_stopped_before_its_files_are_wiped(
        self, tmp_path: Path
    ) -> None:
        """The nginx a killed demo left running (it holds the demo's port) is stopped."""
        from nxmesh.agent.process import pid_alive
        from nxmesh.demo import _demo_directory
        from nxmesh.testing.nginx import NginxInstance

        demo = tmp_path / "demo"
        logs = demo / "nginx" / "logs"
        logs.mkdir(parents=True)
        (demo / MARKER).touch()
        leftover = NginxInstance(require_binary("nginx"), logs)  # pid file: logs/nginx.pid
        leftover.start()
        pid = leftover.pid()
        assert pid is not None
        try:
            with _demo_directory(demo):
                assert not pid_alive(pid)
                assert [p.name for p in demo.iterdir()] == [MARKER]
        finally:
            leftover.stop()

    def test_a_pid_file_naming_another_program_leaves_it_alone(self, tmp_path: Path) -> None:
        """A stale pid file whose pid now belongs to something else: that is not signalled."""
        from nxmesh.demo import _demo_directory

        demo = tmp_path / "demo"
        (demo / "nginx" / "logs").mkdir(parents=True)
        (demo / MARKER).touch()
        with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
            try:
                (demo / "nginx" / "logs" / "nginx.pid").write_text(f"{other.pid}\n")
                with _demo_directory(demo):
                    pass
                assert other.poll() is None
            finally:
                other.kill()
