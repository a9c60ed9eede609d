"""Which version an agent should run: assignments (label selector → version) resolved.

The rule, shared by the API ("why is this agent not on version N?") and the push path:

1. Among the workspace's assignments whose selector matches the agent's labels, the
   **most specific** wins (the most ``match_labels``); ties go to the most recently
   created, then to the name (alphabetical), so the answer never depends on order.
2. An agent that no assignment matches **follows the latest version** of its workspace.

`StorageAssignmentSource` answers `nxmesh.session_hub.AssignmentSource` from storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from nxmesh.core.interfaces import StorageBackend
from nxmesh.core.model import Agent, ConfigVersion
from nxmesh.core.records import Assignment

__all__ = ["Desired", "StorageAssignmentSource", "desired_version", "select_assignment"]


def select_assignment(agent: Agent, assignments: Sequence[Assignment]) -> Assignment | None:
    """The assignment that decides `agent`'s version, or None when none matches."""
    matching = [
        a
        for a in assignments
        if a.workspace == agent.workspace and a.selector.matches(agent.labels)
    ]
    if not matching:
        return None
    # max() over (specificity, created_at) with the smallest name winning a full tie.
    return min(matching, key=lambda a: (-len(a.selector.match_labels), -a.created_at, a.name))


@attrs.frozen
class Desired:
    """The version an agent should run and why (`assignment` None: it follows latest)."""

    version: int | None
    assignment: Assignment | None


def desired_version(agent: Agent, assignments: Sequence[Assignment], latest: int | None) -> Desired:
    """Apply the rule above; `latest` is the workspace's newest version number (or None)."""
    chosen = select_assignment(agent, assignments)
    if chosen is not None:
        return Desired(chosen.version, chosen)
    return Desired(latest, None)


class StorageAssignmentSource:
    """`desired_for(agent)` from the assignments and versions in storage."""

    def __init__(self, storage: StorageBackend) -> None:
        self.storage = storage

    async def desired_for(self, agent: Agent) -> ConfigVersion | None:
        assignments = await self.storage.list_assignments(agent.workspace)
        chosen = select_assignment(agent, assignments)
        if chosen is None:
            return await self.storage.latest_version(agent.workspace)
        return await self.storage.get_version(agent.workspace, chosen.version)
