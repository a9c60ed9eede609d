"""``deploy/``: the systemd units, Dockerfiles, compose file and example settings are
checked for structure and against the code they start — not run (no systemd or docker
here): every ``NXMESH_*`` variable is a real setting, every entrypoint a real command,
every file a Dockerfile copies exists, and the sidecar shares what the agent needs."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml
from click.testing import CliRunner

from nxmesh.agent_daemon import agent_argv
from nxmesh.cli import build_cli
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import Settings, load_settings
from nxmesh.testing.services import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
COMPOSE = DEPLOY / "docker" / "compose.yaml"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: sections → key → values (keys may repeat, as systemd allows)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}:{number}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{number}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def check_settings(environ: dict[str, str]) -> Settings:
    """Load settings from `environ` only: unknown or malformed NXMESH_* variables raise.

    ``NXMESH_CONFIG=/etc/nxmesh/<name>`` reads the example ``deploy/config/<name>``, which
    must exist: the units point at the files the docs tell operators to install.
    """
    pm = get_plugin_manager(autoload=True, environ={})
    nxmesh = {k: v for k, v in environ.items() if k.startswith("NXMESH_")}
    if "NXMESH_CONFIG" in nxmesh:
        example = DEPLOY / "config" / Path(nxmesh["NXMESH_CONFIG"]).name
        assert example.is_file(), f"{nxmesh['NXMESH_CONFIG']} has no example in deploy/config"
        nxmesh["NXMESH_CONFIG"] = str(example)
    return load_settings(pm, environ=nxmesh, path=None)


def assert_real_command(args: list[str]) -> None:
    """``nxmesh <args...> --help`` (or ``nxmesh-agent <args...> --help``) works: the command
    exists with these options."""
    assert args[0].endswith(("nxmesh", "nxmesh-agent")), args
    rest = agent_argv(args[1:]) if args[0].endswith("nxmesh-agent") else args[1:]
    cli: click.Group = build_cli([])
    result = CliRunner().invoke(cli, [*rest, "--help"])
    assert result.exit_code == 0, f"nxmesh {' '.join(args[1:])} --help: {result.output}"


class TestSystemdUnits:
    """The master and agent units."""

    def test_both_units_exist(self) -> None:
        """One unit for the master, one for the agent."""
        assert {p.name for p in UNITS} >= {"nxmesh-master.service", "nxmesh-agent.service"}

    @pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
    def test_required_keys_and_hardening(self, path: Path) -> None:
        """Sections, ExecStart, restart policy and the hardening every unit must have."""
        unit = parse_unit(path)
        assert set(unit) == {"Unit", "Service", "Install"}
        assert unit["Unit"]["Description"]
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
        service = unit["Service"]
        for key in ("ExecStart", "Restart", "StateDirectory", "CapabilityBoundingSet"):
            assert key in service, f"{path.name} lacks {key}"
        assert service["NoNewPrivileges"] == ["yes"]
        assert service["ProtectSystem"] == ["strict"]
        assert service["ProtectHome"] == ["yes"]
        assert service["PrivateTmp"] == ["yes"]
        assert service.get("DynamicUser") == ["yes"] or service.get("User"), (
            f"{path.name} must not run as root: DynamicUser=yes or User="
        )
        assert service.get("User", ["nobody"]) != ["root"]

    @pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
    def test_execstart_is_a_real_command(self, path: Path) -> None:
        """ExecStart is ``nxmesh master`` or the agent daemon ``nxmesh-agent``, and works."""
        (command,) = parse_unit(path)["Service"]["ExecStart"]
        args = shlex.split(command)
        assert args[1:2] == ["master"] or args[0].endswith("/nxmesh-agent"), args
        assert_real_command(args)

    @pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
    def test_environment_is_real_settings(self, path: Path) -> None:
        """Every Environment= variable is a setting the app accepts, with a valid value."""
        env: dict[str, str] = {}
        for item in parse_unit(path)["Service"].get("Environment", []):
            for pair in shlex.split(item):
                key, _, value = pair.partition("=")
                env[key] = value
        settings = check_settings(env)
        state = parse_unit(path)["Service"]["StateDirectory"][0]
        assert settings.state_dir == Path("/var/lib") / state, "state_dir is the StateDirectory"
        assert settings.log_format == "json"

    def test_master_has_no_capabilities(self) -> None:
        """The master binds unprivileged ports: an empty capability bounding set."""
        service = parse_unit(DEPLOY / "systemd" / "nxmesh-master.service")["Service"]
        assert service["CapabilityBoundingSet"] == [""]
        assert service["DynamicUser"] == ["yes"]

    def test_agent_capabilities_are_for_nginx_control(self) -> None:
        """The agent keeps only what controlling nginx needs, its state in StateDirectory."""
        service = parse_unit(DEPLOY / "systemd" / "nxmesh-agent.service")["Service"]
        bounding = set(service["CapabilityBoundingSet"][0].split())
        assert bounding == {"CAP_NET_BIND_SERVICE"}
        env = dict(
            pair.split("=", 1) for item in service["Environment"] for pair in shlex.split(item)
        )
        conf_dir = Path(env["NXMESH_AGENT__CONF_DIR"])
        assert conf_dir.is_relative_to(Path("/var/lib") / service["StateDirectory"][0]), (
            "ProtectSystem=strict: nginx's config root must be in the writable StateDirectory"
        )
        sysusers = (DEPLOY / "systemd" / "nxmesh.sysusers.conf").read_text()
        assert re.search(rf"^u {service['User'][0]} ", sysusers, re.M)

    def test_agent_capabilities_take_effect_for_its_user(self) -> None:
        """User= is not root, so a capability only in the bounding set does nothing: each
        one the unit grants is ambient too. Ambient capabilities reach nginx's workers,
        so CAP_KILL is not granted (the agent's nginx runs as its own user); the README
        says when to add it."""
        service = parse_unit(DEPLOY / "systemd" / "nxmesh-agent.service")["Service"]
        assert service["User"] != ["root"]
        bounding = set(service["CapabilityBoundingSet"][0].split())
        ambient = set(service["AmbientCapabilities"][0].split())
        assert ambient == bounding
        assert "CAP_KILL" not in ambient
        readme = (DEPLOY / "README.md").read_text()
        assert "CAP_KILL" in readme
        assert "AmbientCapabilities" in readme

    def test_agent_exit_leaves_nginx_to_the_next_agent(self) -> None:
        """KillMode=process: systemd signals the agent alone, so nginx survives an agent
        crash or OOM kill and the restarted agent adopts it (docs/agent.md); a clean stop
        drains nginx through the agent itself. The unit says why next to the setting."""
        path = DEPLOY / "systemd" / "nxmesh-agent.service"
        service = parse_unit(path)["Service"]
        assert service["KillMode"] == ["process"]
        assert service["Restart"] == ["always"]
        lines = path.read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("KillMode="))
        comment = []
        for line in reversed(lines[:at]):
            if not line.startswith("#"):
                break
            comment.append(line)
        why = " ".join(comment).lower()
        assert "adopt" in why
        assert "sigquit" in why
        assert "crash" in why
        assert "KillMode=process" in (DEPLOY / "README.md").read_text()
        assert "KillMode=mixed" not in (DEPLOY / "README.md").read_text()


class TestDockerfiles:
    """The master and agent images."""

    def test_both_images_exist(self) -> None:
        """One Dockerfile for the master, one for the agent."""
        assert {p.name for p in DOCKERFILES} == {"master.Dockerfile", "agent.Dockerfile"}

    @staticmethod
    def instructions(path: Path) -> list[tuple[str, str]]:
        """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
        text = re.sub(r"\\\n", " ", path.read_text())
        found = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                word, _, rest = line.partition(" ")
                found.append((word.upper(), rest.strip()))
        return found

    @pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
    def test_copied_files_exist(self, path: Path) -> None:
        """Every COPY from the build context (the repository root) names a real path."""
        copies = [a for i, a in self.instructions(path) if i == "COPY"]
        assert copies
        for args in copies:
            parts = [p for p in args.split() if not p.startswith("--")]
            if "--from=" in args:
                continue
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"

    @pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
    def test_entrypoint_is_a_real_command(self, path: Path) -> None:
        """The exec-form ENTRYPOINT is ``nxmesh master`` / ``nxmesh-agent`` and works."""
        (entrypoint,) = [a for i, a in self.instructions(path) if i == "ENTRYPOINT"]
        args = json.loads(entrypoint)
        expected = {"master": ["nxmesh", "master"], "agent": ["nxmesh-agent"]}
        assert args == expected[path.name.split(".")[0]]
        assert_real_command(args)

    @pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
    def test_env_is_real_settings(self, path: Path) -> None:
        """Every ENV NXMESH_* variable is a setting the app accepts."""
        env: dict[str, str] = {}
        for instruction, args in self.instructions(path):
            if instruction == "ENV":
                for pair in shlex.split(args):
                    key, _, value = pair.partition("=")
                    env[key] = value
        assert any(k.startswith("NXMESH_") for k in env)
        settings = check_settings(env)
        assert settings.log_format == "json"

    def test_master_runs_unprivileged(self) -> None:
        """The master image switches to a non-root user before its entrypoint."""
        users = [a for i, a in self.instructions(DEPLOY / "docker" / "master.Dockerfile")
                 if i == "USER"]  # fmt: skip
        assert users
        assert users[-1] not in ("root", "0")


class TestCompose:
    """The sidecar pattern: nginx + agent sharing PID namespace and config, plus a master."""

    @pytest.fixture
    def compose(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
        return data

    def test_services(self, compose: dict[str, Any]) -> None:
        """Three services; named volumes are all declared."""
        services = compose["services"]
        assert set(services) == {"master", "nginx", "agent"}
        declared = set(compose["volumes"])
        for name, service in services.items():
            for volume in service.get("volumes", []):
                source = volume.split(":", 1)[0]
                if not source.startswith((".", "/")):
                    assert source in declared, f"{name}: volume {source} is not declared"

    def test_agent_shares_nginx_pid_namespace(self, compose: dict[str, Any]) -> None:
        """The agent joins nginx's PID namespace to signal it, and may (CAP_KILL)."""
        agent = compose["services"]["agent"]
        assert agent["pid"] == "service:nginx"
        assert "nginx" in agent["depends_on"]
        assert agent["cap_drop"] == ["ALL"]
        assert agent["cap_add"] == ["KILL"]

    def test_agent_shares_nginx_network_namespace(self, compose: dict[str, Any]) -> None:
        """The driver confirms each reload at ``http://<status_address>:<status_port>``
        with a loopback address, nginx's loopback: the agent must join nginx's network
        namespace (or every apply rolls back), and so has no network settings of its own
        (compose refuses them beside ``network_mode``)."""
        agent = compose["services"]["agent"]
        env = {k: re.sub(r"\$\{[^}]*\}", "", str(v)) for k, v in agent["environment"].items()}
        driver = check_settings(env).plugins.get("nginx_driver")
        status_address = getattr(driver, "status_address", "127.0.0.1")
        assert ipaddress.ip_address(status_address).is_loopback
        assert agent["network_mode"] == "service:nginx"
        assert "nginx" in agent["depends_on"]
        conflicting = {
            "ports", "expose", "networks", "hostname", "domainname", "dns", "dns_search",
            "dns_opt", "extra_hosts", "links", "mac_address",
        }  # fmt: skip
        assert not conflicting & set(agent), sorted(conflicting & set(agent))
        # The agent reaches the master by name through nginx's network: nginx is on it.
        assert "network_mode" not in compose["services"]["nginx"]
        assert "networks" not in compose["services"]["nginx"]
        # ... and the docs state the requirement where the sidecar is described.
        assert 'network_mode: "service:nginx"' in (DEPLOY / "README.md").read_text()
        assert "--network=container:" in (ROOT / "docs" / "agent.md").read_text()

    def test_config_volume_shared_at_conf_dir(self, compose: dict[str, Any]) -> None:
        """nginx and the agent mount one volume at the agent's conf_dir."""
        services = compose["services"]
        conf_dir = services["agent"]["environment"]["NXMESH_AGENT__CONF_DIR"]

        def mounts(service: str) -> dict[str, str]:
            return {v.split(":")[1]: v.split(":")[0] for v in services[service].get("volumes", [])}

        assert mounts("agent")[conf_dir] == mounts("nginx")[conf_dir]

    def test_agent_environment_is_real_settings(self, compose: dict[str, Any]) -> None:
        """Every NXMESH_* variable of the agent is a setting (interpolations left empty)."""
        env = {
            k: re.sub(r"\$\{[^}]*\}", "", str(v))
            for k, v in compose["services"]["agent"]["environment"].items()
        }
        settings = check_settings(env)
        assert settings.agent.deployment_mode == "docker-sidecar"
        # The agent reaches the master by its service name, on a port the master serves.
        master_url = urlsplit(settings.agent.master_url)
        assert master_url.hostname == "master"
        published = {p.rsplit(":", 1)[-1] for p in compose["services"]["master"]["ports"]}
        assert str(master_url.port) in published

    def test_images_build_from_the_dockerfiles(self, compose: dict[str, Any]) -> None:
        """Each build names a Dockerfile in deploy/docker, relative to the repo root."""
        for name, service in compose["services"].items():
            build = service.get("build")
            if build is None:
                continue
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), name

    def test_nginx_entrypoint_is_in_the_agent_image(self, compose: dict[str, Any]) -> None:
        """nginx runs from the agent image through the entrypoint script it copies."""
        (entrypoint,) = compose["services"]["nginx"]["entrypoint"]
        dockerfile = (DEPLOY / "docker" / "agent.Dockerfile").read_text()
        assert f"deploy/docker/nginx-entrypoint.sh {entrypoint}" in dockerfile


class TestNginxEntrypoint:
    """The nginx container's entrypoint seeds a release nginx accepts."""

    def test_bootstrap_release_passes_nginx_t(self, tmp_path: Path) -> None:
        """With an empty volume the seeded config passes ``nginx -t``, in the agent's layout."""
        nginx = require_binary("nginx")
        stub = tmp_path / "bin" / "nginx"
        stub.parent.mkdir()
        # The script ends in `exec nginx ...`: the stub turns that into `nginx -t ...`.
        stub.write_text(f'#!/bin/sh\nexec {nginx} -t "$@"\n')
        stub.chmod(0o755)
        conf_dir = tmp_path / "etc-nginx"
        env = {
            "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
            "NXMESH_AGENT__CONF_DIR": str(conf_dir),
        }
        script = DEPLOY / "docker" / "nginx-entrypoint.sh"
        sh = shutil.which("sh") or "/bin/sh"
        result = subprocess.run(
            [sh, str(script)], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        assert "test is successful" in result.stderr
        assert (conf_dir / "current").is_symlink()
        assert os.readlink(conf_dir / "current") == "releases/bootstrap"


class TestExampleSettings:
    """deploy/config/*.toml load as they are."""

    @pytest.mark.parametrize("name", ["master.toml", "agent.toml"])
    def test_loads(self, name: str) -> None:
        """The example settings files are valid settings."""
        pm = get_plugin_manager(autoload=True, environ={})
        settings = load_settings(pm, path=DEPLOY / "config" / name, environ={})
        assert settings.master.api_port == 8470
