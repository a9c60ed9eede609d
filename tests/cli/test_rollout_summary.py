"""The one-line rollout summary `nxmesh rollout status` prints."""

from __future__ import annotations

from nxmesh.client.rollout import AgentProgress, RolloutSnapshot, State, summarize


def _snapshot(*agents: AgentProgress, untargeted: int = 0) -> RolloutSnapshot:
    return RolloutSnapshot("default", 2, "d" * 64, agents, untargeted)


def _agent(agent_id: str, state: State) -> AgentProgress:
    return AgentProgress(agent_id, state, 3, "applied", "", 2)


def test_counts_applied_and_failed_agents() -> None:
    snapshot = _snapshot(_agent("a", "done"), _agent("b", "failed"), _agent("c", "done"))
    assert summarize(snapshot) == "version 2: 2/3 agents applied, 1 failed"


def test_an_older_version_no_agent_follows_is_not_called_pinned() -> None:
    """Agents on the latest version are untargeted by an older one without being pinned
    or revoked: the line says what it may be."""
    line = summarize(_snapshot(untargeted=1))
    assert "no agent is targeted" in line
    assert "follow the latest version or one an assignment pins, or are revoked" in line
    assert "pinned elsewhere" not in line


def test_no_agents_at_all() -> None:
    assert summarize(_snapshot()) == "version 2: no agents enrolled"
