"""Agents through the API: listing, labels, status, health, revocation, and the
"why is this agent not on version N?" explanation; and the orchestrator hand-off."""

from __future__ import annotations

import time
from typing import Any

import pytest

from nxmesh.core.model import Agent, ConfigVersion, HealthReport, HealthResult, LabelSelector
from nxmesh.core.records import AgentKey, AgentStatus, Assignment
from nxmesh.core.serialization import unstructure
from nxmesh.master.api.agents import explain
from nxmesh.master.selection import desired_version, select_assignment
from nxmesh.testing import make_state, make_version

from .conftest import Master

AGENTS = "/api/v1/agents"
DIGEST = "d" * 64


class Recorder:
    """An orchestrator that writes down what the API told it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def version_created(self, version: ConfigVersion) -> None:
        self.calls.append(("version_created", version.number))

    async def assignments_changed(self, workspace: str) -> None:
        self.calls.append(("assignments_changed", workspace))

    async def agent_changed(self, agent: Agent) -> None:
        self.calls.append(("agent_changed", agent.id))

    async def agent_revoked(self, agent_id: str) -> None:
        self.calls.append(("agent_revoked", agent_id))


def agent(**changes: Any) -> Agent:
    base: dict[str, Any] = {
        "id": "a1",
        "name": "edge-1",
        "labels": {"env": "prod", "tier": "web"},
        "status": "online",
        "running_version": 1,
        "running_digest": DIGEST,
        "last_seen": time.time(),
    }
    return Agent(**{**base, **changes})


def assignment(name: str, version: int, created_at: float = 1.0, **labels: str) -> Assignment:
    return Assignment(
        workspace="default",
        name=name,
        selector=LabelSelector(labels),
        version=version,
        created_at=created_at,
    )


def status(phase: str, message: str = "", version: int = 2) -> AgentStatus:
    return AgentStatus(agent_id="a1", version=version, digest=DIGEST, phase=phase, message=message)


class TestSelection:
    """Which assignment decides an agent's version."""

    def test_most_specific_selector_wins_then_newest_then_name(self) -> None:
        """More labels beat fewer; a tie goes to the newer, then to the first name."""
        a = agent()
        everyone = assignment("all", 1)
        prod = assignment("prod", 2, env="prod")
        prod_web = assignment("prod-web", 3, env="prod", tier="web")
        assert select_assignment(a, [everyone, prod, prod_web]) is prod_web
        newer = assignment("later", 4, created_at=9.0, env="prod")
        assert select_assignment(a, [everyone, prod, newer]) is newer
        twin = assignment("a-first", 5, env="prod")
        assert select_assignment(a, [prod, twin]) is twin

    def test_unmatched_agents_follow_the_latest_version(self) -> None:
        """No matching selector: the desired version is the workspace's latest."""
        desired = desired_version(agent(), [assignment("dev", 1, env="dev")], latest=7)
        assert (desired.version, desired.assignment) == (7, None)


class TestWhy:
    """`explain` gives the first reason that applies, with the details a person needs."""

    v2 = make_version(2, state=make_state())

    def test_current(self) -> None:
        """An agent reporting the version runs it."""
        why = explain(
            agent(running_version=2, running_digest=self.v2.digest),
            self.v2,
            assignments=[],
            latest=2,
            status=None,
        )
        assert (why.on_version, why.reason) == (True, "current")

    def test_not_selected_by_an_assignment(self) -> None:
        """A matching assignment pinning another version is named, with its selector."""
        why = explain(
            agent(),
            self.v2,
            assignments=[assignment("pin", 1, env="prod"), assignment("canary", 2, env="canary")],
            latest=2,
            status=None,
        )
        assert why.reason == "not_selected"
        assert why.assignment == "pin"
        assert "pins it to version 1" in why.detail
        assert "'canary' selects env=canary" in why.detail

    def test_not_latest_without_assignments(self) -> None:
        """Without assignments an agent follows latest, so an older version is not selected."""
        why = explain(agent(), self.v2, assignments=[], latest=3, status=None)
        assert why.reason == "not_selected"
        assert "follows the latest version (3)" in why.detail

    def test_a_revoked_agent_is_revoked_even_on_the_version(self) -> None:
        """A revoked agent still running the version is not counted as on it: it is out
        of the fleet (rollout status leaves it out), whatever its nginx still serves."""
        on_v2 = agent(status="revoked", running_version=2, running_digest=self.v2.digest)
        why = explain(on_v2, self.v2, assignments=[], latest=2, status=status("applied"))
        assert (why.reason, why.on_version) == ("revoked", False)

    @pytest.mark.parametrize(
        ("agent_status", "record", "reason", "detail"),
        [
            ("online", status("failed", "nginx: [emerg] unknown directive"), "failed", "[emerg]"),
            ("online", status("rolled_back", "no new workers"), "rolled_back", "no new workers"),
            ("offline", None, "offline", "when it reconnects"),
            ("online", status("applying"), "in_progress", "applying"),
            ("online", None, "pending", "not reported"),
            ("revoked", None, "revoked", "revoked"),
        ],
    )
    def test_reasons(
        self, agent_status: str, record: AgentStatus | None, reason: str, detail: str
    ) -> None:
        """Each state of the rollout maps to its reason and says why in words."""
        why = explain(agent(status=agent_status), self.v2, assignments=[], latest=2, status=record)
        assert why.reason == reason
        assert detail in why.detail
        assert why.on_version is False


class TestAgentEndpoints:
    """The agent resources, with storage filled directly as transports would."""

    def _setup(self, master: Master) -> dict[str, str]:
        admin = master.headers("admin", subject="admin")
        for n in (1, 2):
            state = unstructure(make_state(n))
            master.client.put("/api/v1/workspaces/default/state", json=state, headers=admin)
        master.call(master.services.storage.upsert_agent, agent())
        return admin

    def test_list_detail_status_and_why(self, master: Master) -> None:
        """The why endpoint combines assignments, statuses and the agent record."""
        admin = self._setup(master)
        c = master.client
        assert [a["id"] for a in c.get(AGENTS, headers=admin).json()] == ["a1"]
        assert c.get(f"{AGENTS}/a1", headers=admin).json()["labels"] == {
            "env": "prod",
            "tier": "web",
        }
        master.call(
            master.services.storage.set_agent_status, status("failed", "nginx: [emerg] bad")
        )
        assert c.get(f"{AGENTS}/a1/status", headers=admin).json()[0]["phase"] == "failed"
        why = c.get(f"{AGENTS}/a1/why", params={"version": 2}, headers=admin).json()
        assert why["reason"] == "failed"
        assert "[emerg] bad" in why["detail"]
        assert why["status"]["phase"] == "failed"
        assert c.get(f"{AGENTS}/a1/why", params={"version": 9}, headers=admin).status_code == 404
        assert c.get(f"{AGENTS}/nope", headers=admin).status_code == 404

    def test_health_comes_from_what_this_master_received(self, master: Master) -> None:
        """404 until a report arrived, then the latest report."""
        admin = self._setup(master)
        assert master.client.get(f"{AGENTS}/a1/health", headers=admin).status_code == 404
        master.services.health.update(
            HealthReport(agent_id="a1", ts=time.time(), results=(HealthResult("nginx", "ok"),))
        )
        body = master.client.get(f"{AGENTS}/a1/health", headers=admin).json()
        assert body["results"][0]["status"] == "ok"

    def test_labels_and_revoke_tell_the_orchestrator(self, master: Master) -> None:
        """Label changes and revocations are stored, audited and handed to the orchestrator."""
        admin = self._setup(master)
        recorder = Recorder()
        master.services.orchestrator = recorder
        key = AgentKey(agent_id="a1", key_id="k1", secret=b"s" * 32, expires_at=time.time() + 60)
        master.call(master.services.storage.add_agent_key, key)
        c = master.client
        response = c.put(f"{AGENTS}/a1/labels", json={"labels": {"env": "dev"}}, headers=admin)
        assert response.json()["labels"] == {"env": "dev"}
        assert c.post(f"{AGENTS}/a1/revoke", headers=admin).json()["status"] == "revoked"
        assert master.call(master.services.storage.list_agent_keys, "a1") == []
        assert recorder.calls == [("agent_changed", "a1"), ("agent_revoked", "a1")]
        bad = c.put(f"{AGENTS}/a1/labels", json={"labels": {"Bad Key": "x"}}, headers=admin)
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["path"].startswith("labels")

    def test_versions_and_assignments_reach_the_orchestrator(self, master: Master) -> None:
        """Each stored version and assignment change is passed on after it is stored."""
        admin = master.headers("admin", subject="admin")
        recorder = Recorder()
        master.services.orchestrator = recorder
        c = master.client
        c.put("/api/v1/workspaces/default/state", json=unstructure(make_state()), headers=admin)
        assert recorder.calls == [("version_created", 1)]
        put = c.put(
            "/api/v1/workspaces/default/assignments/canary",
            json={"selector": {"match_labels": {"env": "canary"}}, "version": 1},
            headers=admin,
        )
        assert put.status_code == 200, put.text
        assert put.json()["selector"] == {"match_labels": {"env": "canary"}}
        missing = c.put(
            "/api/v1/workspaces/default/assignments/x", json={"version": 5}, headers=admin
        )
        assert missing.status_code == 422
        assert missing.json()["errors"][0]["path"] == "version"
        assert (
            c.delete("/api/v1/workspaces/default/assignments/canary", headers=admin).status_code
            == 204
        )
        assert recorder.calls[1:] == [("assignments_changed", "default")] * 2
