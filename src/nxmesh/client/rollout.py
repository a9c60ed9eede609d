"""Where a version's rollout stands, agent by agent, from the master's API.

`rollout_snapshot` asks the master which agents of a workspace a version targets and
how far each got — ``GET /workspaces/{ws}/versions/{n}/rollout``, one request that
answers, per targeted agent, with the rollout phase the master recorded, whether the
agent reports the version's digest, and why not — and folds the answer into a
`RolloutSnapshot`. A rollout is *converged* when every targeted agent runs the version,
*failed* as soon as one agent failed or rolled it back. Agents an assignment pins to
another version, and revoked agents, are not targeted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal

import attrs

if TYPE_CHECKING:
    from nxmesh.client.api import Client

__all__ = ["STEPS", "AgentProgress", "RolloutSnapshot", "rollout_snapshot", "summarize"]

State = Literal["pending", "offline", "in_progress", "done", "failed"]

STEPS: Final = 3
"""Progress steps of one agent: sent, applying, applied."""

_PHASE_STEP: Final = {
    "pending": 0,
    "sent": 1,
    "received": 1,
    "applying": 2,
    "applied": 3,
    "noop": 3,
}


@attrs.frozen
class AgentProgress:
    """One targeted agent: how far it got (`step` of `STEPS`) and in words."""

    agent_id: str
    state: State
    step: int
    phase: str
    detail: str
    running_version: int | None


@attrs.frozen
class RolloutSnapshot:
    """A version's rollout at one moment."""

    workspace: str
    version: int
    digest: str
    agents: tuple[AgentProgress, ...]
    untargeted: int
    """Agents of the workspace this version is not for: they follow the latest version or
    one an assignment pins, or are revoked."""

    @property
    def converged(self) -> bool:
        """Every targeted agent runs the version (vacuously true with none targeted)."""
        return all(a.state == "done" for a in self.agents)

    @property
    def failed(self) -> tuple[AgentProgress, ...]:
        return tuple(a for a in self.agents if a.state == "failed")

    @property
    def done(self) -> int:
        return sum(1 for a in self.agents if a.state == "done")

    def to_json(self) -> dict[str, object]:
        return {
            "workspace": self.workspace,
            "version": self.version,
            "digest": self.digest,
            "converged": self.converged,
            "failed": bool(self.failed),
            "untargeted": self.untargeted,
            "agents": [attrs.asdict(a) for a in self.agents],
        }


def _progress(agent_id: str, reason: str, phase: str | None, detail: str) -> AgentProgress:
    step = _PHASE_STEP.get(phase or "pending", 0)
    state: State
    if reason == "current":
        state, step, phase = "done", STEPS, "applied"
    elif reason in ("failed", "rolled_back"):
        state, phase = "failed", reason
    elif reason == "offline":
        state = "offline"
    elif reason == "in_progress" or step > 0:
        state = "in_progress"
    else:
        state = "pending"
    return AgentProgress(agent_id, state, min(step, STEPS), phase or "pending", detail, None)


def rollout_snapshot(
    client: Client, workspace: str, version: int | None = None
) -> RolloutSnapshot | None:
    """The rollout of `version` (default: the latest) in `workspace`; None without versions.

    Raises `nxmesh.client.errors.NotFoundError` when `version` does not exist.
    """
    if version is None:
        latest = client.latest_version(workspace)
        if latest is None:
            return None
        version = latest.number
    view = client.rollout(workspace, version)
    agents = [
        attrs.evolve(
            _progress(why.agent_id, why.reason, why.phase, why.detail),
            running_version=why.running_version,
        )
        for why in view.agent_rollouts()
    ]
    return RolloutSnapshot(
        workspace=workspace,
        version=view.version,
        digest=view.digest,
        agents=tuple(sorted(agents, key=lambda a: a.agent_id)),
        untargeted=view.untargeted,
    )


def summarize(snapshot: RolloutSnapshot) -> str:
    """One line: ``version 3: 2/2 agents applied`` (plus failures)."""
    total = len(snapshot.agents)
    if total == 0:
        return (
            f"version {snapshot.version}: no agent is targeted (the {snapshot.untargeted}"
            " enrolled follow the latest version or one an assignment pins, or are revoked)"
            if snapshot.untargeted
            else f"version {snapshot.version}: no agents enrolled"
        )
    text = f"version {snapshot.version}: {snapshot.done}/{total} agents applied"
    failed: Sequence[AgentProgress] = snapshot.failed
    if failed:
        text += f", {len(failed)} failed"
    return text
