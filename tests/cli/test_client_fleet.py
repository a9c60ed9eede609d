"""``nxmesh agents``, ``rollout status``, ``token`` and ``user`` against a real master.

Agents and their rollout statuses are written into the master's database directly, as
the orchestrator would record them, so these tests cover what the CLI reads and shows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nxmesh.core.interfaces import StorageBackend
from nxmesh.core.model import Agent
from nxmesh.core.records import AgentStatus

from .conftest import Cli

SITE = """\
sites:
  - name: web
    server_names: [example.test]
    listeners:
      - port: 8080
    locations:
      - path: /
        return:
          code: 200
          body: "{body}"
"""


@pytest.fixture
def logged_in(cli: Cli) -> Cli:
    assert cli.login().exit_code == 0
    return cli


def _apply(cli: Cli, workspace: str, tmp_path: Path, body: str) -> dict[str, object]:
    path = tmp_path / f"{body}.yaml"
    path.write_text(SITE.format(body=body))
    result = cli("apply", "-f", str(path), "-w", workspace, "--json")
    assert result.exit_code == 0, result.output
    version: dict[str, object] = json.loads(result.stdout)["version"]
    return version


def _put_agent(cli: Cli, agent: Agent, *statuses: AgentStatus) -> None:
    async def write(storage: StorageBackend) -> None:
        await storage.upsert_agent(agent)
        for status in statuses:
            await storage.set_agent_status(status)

    cli.master.storage(write)


class TestAgents:
    """``nxmesh agents list|show|revoke``."""

    def test_list_show_revoke(self, logged_in: Cli, workspace: str) -> None:
        """An agent is listed, shown with its statuses, and revoked."""
        agent = Agent(
            id=f"{workspace}-a1",
            name="edge-1",
            workspace=workspace,
            status="online",
            labels={"env": "prod"},
            running_version=1,
            running_digest="a" * 64,
            last_seen=time.time(),
            deployment_mode="standalone",
        )
        _put_agent(
            logged_in,
            agent,
            AgentStatus(agent_id=agent.id, version=1, digest="a" * 64, phase="applied"),
        )
        listed = logged_in("agents", "list", "-w", workspace)
        assert listed.exit_code == 0, listed.output
        assert agent.id in listed.stdout
        assert "env=prod" in listed.stdout
        assert "online" in listed.stdout
        doc = json.loads(logged_in("agents", "list", "-w", workspace, "--json").stdout)
        assert [(a["id"], a["running_version"]) for a in doc] == [(agent.id, 1)]

        shown = logged_in("agents", "show", agent.id)
        assert shown.exit_code == 0, shown.output
        assert "standalone" in shown.stdout
        assert "applied" in shown.stdout
        detail = json.loads(logged_in("agents", "show", agent.id, "--json").stdout)
        assert detail["rollouts"][0]["phase"] == "applied"

        refused = logged_in("agents", "revoke", agent.id)  # no terminal, no --yes
        assert refused.exit_code == 2
        revoked = logged_in("agents", "revoke", agent.id, "--yes")
        assert revoked.exit_code == 0, revoked.output
        again = json.loads(logged_in("agents", "show", agent.id, "--json").stdout)
        assert again["status"] == "revoked"

    def test_bare_group_takes_list_options(self, logged_in: Cli, workspace: str) -> None:
        """``nxmesh agents --json -w WS`` is ``nxmesh agents list --json -w WS``."""
        agent = Agent(id=f"{workspace}-a1", name="edge-1", workspace=workspace, status="online")
        _put_agent(logged_in, agent)
        bare = logged_in("agents", "--json", "-w", workspace)
        assert bare.exit_code == 0, bare.output
        assert [a["id"] for a in json.loads(bare.stdout)] == [agent.id]
        table = logged_in("agents", "-w", workspace)
        assert table.exit_code == 0, table.output
        assert agent.id in table.stdout

    def test_unknown_agent_exits_4(self, logged_in: Cli) -> None:
        """An agent id nobody enrolled is exit 4."""
        result = logged_in("agents", "show", "no-such-agent")
        assert result.exit_code == 4
        assert "no agent 'no-such-agent'" in result.stderr


class TestRolloutStatus:
    """``nxmesh rollout status``: per-agent progress of a version."""

    def test_converged(self, logged_in: Cli, workspace: str, tmp_path: Path) -> None:
        """Every targeted agent on the version's digest: converged, exit 0."""
        version = _apply(logged_in, workspace, tmp_path, "one")
        for i in range(2):
            _put_agent(
                logged_in,
                Agent(
                    id=f"{workspace}-{i}", name=f"n{i}", workspace=workspace, status="online",
                    running_version=1, running_digest=str(version["digest"]),
                ),
            )  # fmt: skip
        result = logged_in("rollout", "status", "-w", workspace)
        assert result.exit_code == 0, result.output
        assert "version 1: 2/2 agents applied" in result.stdout
        watch = logged_in("rollout", "status", "-w", workspace, "--watch", "--timeout", "5")
        assert watch.exit_code == 0, watch.output
        assert "2/2 agents applied" in watch.stdout
        doc = json.loads(logged_in("rollout", "status", "-w", workspace, "--json").stdout)
        assert doc["converged"] is True
        assert {a["state"] for a in doc["agents"]} == {"done"}

    def test_failed_agent_exits_1_with_nginx_message(
        self, logged_in: Cli, workspace: str, tmp_path: Path
    ) -> None:
        """An agent that rolled the version back fails the rollout with nginx's message."""
        _apply(logged_in, workspace, tmp_path, "one")
        version = _apply(logged_in, workspace, tmp_path, "two")
        agent_id = f"{workspace}-bad"
        _put_agent(
            logged_in,
            Agent(id=agent_id, name="bad", workspace=workspace, status="online",
                  running_version=1),
            AgentStatus(
                agent_id=agent_id, version=2, digest=str(version["digest"]),
                phase="rolled_back",
                message="bind() to 0.0.0.0:8080 failed (98: Address already in use)",
            ),
        )  # fmt: skip
        result = logged_in("rollout", "status", "-w", workspace, "--watch", "--timeout", "5")
        assert result.exit_code == 1
        assert "1 failed" in result.stdout
        assert "Address already in use" in result.stdout

    def test_in_progress_watch_times_out(
        self, logged_in: Cli, workspace: str, tmp_path: Path
    ) -> None:
        """An agent stuck applying: a snapshot exits 0, --watch gives up after its timeout."""
        version = _apply(logged_in, workspace, tmp_path, "one")
        agent_id = f"{workspace}-slow"
        _put_agent(
            logged_in,
            Agent(id=agent_id, name="slow", workspace=workspace, status="online"),
            AgentStatus(agent_id=agent_id, version=1, digest=str(version["digest"]),
                        phase="applying"),
        )  # fmt: skip
        snapshot = logged_in("rollout", "status", "-w", workspace)
        assert snapshot.exit_code == 0, snapshot.output
        assert "applying" in snapshot.stdout
        assert "0/1 agents applied" in snapshot.stdout
        watch = logged_in(
            "rollout", "status", "-w", workspace, "--watch", "--timeout", "1", "--interval", "0.2"
        )
        assert watch.exit_code == 1
        assert "timed out" in watch.stderr

    def test_pinned_agent_is_not_targeted(
        self, logged_in: Cli, workspace: str, tmp_path: Path
    ) -> None:
        """An agent an assignment pins to version 1 is not waited for on version 2."""
        import httpx

        _apply(logged_in, workspace, tmp_path, "one")
        _apply(logged_in, workspace, tmp_path, "two")
        _put_agent(
            logged_in,
            Agent(id=f"{workspace}-pinned", name="p", workspace=workspace, status="online",
                  labels={"ring": "canary"}, running_version=1),
        )  # fmt: skip
        token = json.loads(logged_in.credentials.read_text())["profiles"]["default"]
        response = httpx.put(
            f"{logged_in.master.url}/api/v1/workspaces/{workspace}/assignments/hold",
            json={"selector": {"match_labels": {"ring": "canary"}}, "version": 1},
            headers={"Authorization": f"Bearer {token['access_token']}"},
        )
        assert response.status_code == 200, response.text
        result = logged_in("rollout", "status", "-w", workspace, "--json")
        doc = json.loads(result.stdout)
        assert (doc["version"], doc["agents"], doc["untargeted"]) == (2, [], 1)

    def test_no_versions(self, logged_in: Cli, workspace: str) -> None:
        """A workspace without versions says so."""
        result = logged_in("rollout", "status", "-w", workspace)
        assert result.exit_code == 0
        assert "no versions" in result.stdout


class TestTokens:
    """``nxmesh token``: bootstrap tokens for enrollment."""

    def test_create_list_revoke(self, logged_in: Cli, workspace: str) -> None:
        """The secret is printed once alone on stdout; listings never show it."""
        created = logged_in(
            "token", "create", "-w", workspace, "--labels", "env=prod,zone=a", "--ttl", "15m"
        )
        assert created.exit_code == 0, created.output
        token = created.stdout.strip()
        token_id, _, secret = token.partition(".")
        assert token_id
        assert len(secret) >= 32
        assert "single use" in created.stderr
        listed = logged_in("token", "list", "-w", workspace, "--json")
        doc = json.loads(listed.stdout)
        assert [(t["id"], t["labels"], t["usable"]) for t in doc] == [
            (token_id, {"env": "prod", "zone": "a"}, True)
        ]
        assert 890 <= doc[0]["expires_at"] - doc[0]["created_at"] <= 910
        assert secret not in listed.stdout
        assert logged_in("token", "revoke", token_id, "-w", workspace).exit_code == 0
        table = logged_in("token", "list", "-w", workspace)
        assert "revoked" in table.stdout

    def test_bad_ttl_is_a_usage_error(self, logged_in: Cli) -> None:
        """A TTL that is not a duration is exit 2 before anything is sent."""
        result = logged_in("token", "create", "--ttl", "soon")
        assert result.exit_code == 2
        assert "Invalid value for '--ttl': 'soon' is not a duration" in result.output

    def test_bad_labels_name_the_option(self, logged_in: Cli) -> None:
        result = logged_in("token", "create", "--labels", "env=prod,bad")
        assert result.exit_code == 2
        assert "Invalid value for '--labels': 'bad' is not key=value" in result.output

    def test_ttl_too_long_names_the_field(self, logged_in: Cli) -> None:
        """The master's limit comes back naming ``ttl`` (exit 1)."""
        result = logged_in("token", "create", "--ttl", "30d")
        assert result.exit_code == 1
        assert "ttl" in result.stderr


class TestUsers:
    """``nxmesh user``."""

    def test_add_list_passwd_delete(self, logged_in: Cli, workspace: str) -> None:
        """A user is added, can log in, gets a new password, and is deleted."""
        name = workspace.replace("t-", "u", 1)[:30].rstrip("-")
        added = logged_in(
            "user", "add", name, "-r", "operator", "--password-stdin",
            input="first-password-123\n",
        )  # fmt: skip
        assert added.exit_code == 0, added.output
        assert f"created user {name} (roles: operator)" in added.stdout
        users = json.loads(logged_in("user", "list", "--json").stdout)
        assert {"username": name, "roles": ["operator"], "disabled": False} in users
        assert name in logged_in("user").stdout  # bare group lists
        assert json.loads(logged_in("user", "--json").stdout) == users  # with list's options

        changed = logged_in(
            "user", "passwd", name, "--password-stdin", input="second-password-456\n"
        )
        assert changed.exit_code == 0, changed.output
        assert logged_in.login(name, "first-password-123", "--profile", "u").exit_code == 3
        assert logged_in.login(name, "second-password-456", "--profile", "u").exit_code == 0

        assert logged_in("user", "delete", name, "--yes").exit_code == 0
        assert logged_in("user", "delete", name, "--yes").exit_code == 4

    def test_existing_user_is_a_conflict(self, logged_in: Cli) -> None:
        """Adding a name that exists is exit 4."""
        result = logged_in("user", "add", "admin", "--password-stdin", input="another-password-1\n")
        assert result.exit_code == 4
        assert "exists" in result.stderr

    def test_short_password_names_the_field(self, logged_in: Cli) -> None:
        """The password policy's refusal comes back naming the field (exit 1)."""
        result = logged_in("user", "add", "shorty", "--password-stdin", input="short\n")
        assert result.exit_code == 1
        assert "password" in result.stderr

    def test_own_password_change_logs_out(self, logged_in: Cli) -> None:
        """Changing one's own password asks the current one and ends the stored session."""
        assert logged_in(
            "user", "add", "selfie", "-r", "viewer", "--password-stdin",
            input="selfie-password-1\n",
        ).exit_code == 0  # fmt: skip
        assert logged_in.login("selfie", "selfie-password-1").exit_code == 0
        result = logged_in(
            "user", "passwd", "--password-stdin", input="selfie-password-1\nselfie-password-2\n"
        )
        assert result.exit_code == 0, result.output
        assert "every session ended" in result.stdout
        assert logged_in("whoami").exit_code == 3
        assert logged_in.login("selfie", "selfie-password-2").exit_code == 0
