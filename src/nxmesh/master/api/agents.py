"""Agents: list, detail, labels, rollout status, health, revoke, and "why not version N?".

Agents live in workspaces; the guard admits callers holding the permission in *some*
workspace and each handler checks the agent's own workspace — an agent in a workspace the
caller cannot see answers 404, exactly like one that does not exist.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any

import attrs
from litestar import Controller, Request, Response, get, post, put
from litestar.params import JSONBody, Parameter

from nxmesh.core.interfaces import StorageBackend
from nxmesh.core.model import Agent, ConfigVersion, HealthReport
from nxmesh.core.records import AgentStatus, Assignment
from nxmesh.master.api._common import (
    AGENT_ID_PATTERN,
    BEARER,
    ERRORS,
    MAX_NUMBER,
    WORKSPACE_PATTERN,
    AgentId,
    perm,
)
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.paging import (
    DEFAULT_LIMIT,
    LINK_HEADER,
    Cursor,
    PageLimit,
    decode_cursor,
    page_headers,
)
from nxmesh.master.api.schemas import AgentWhy, LabelsUpdate
from nxmesh.master.problems import NotFound
from nxmesh.master.selection import desired_version

__all__ = ["AgentController", "agent_page", "explain"]

WorkspaceFilter = Annotated[
    str | None, Parameter(pattern=WORKSPACE_PATTERN, description="Only agents of this workspace.")
]
WhyVersion = Annotated[int, Parameter(ge=1, le=MAX_NUMBER, description="The version in question.")]


_AGENT_ID = re.compile(AGENT_ID_PATTERN)


async def agent_page(
    storage: StorageBackend,
    *,
    workspace: str | None,
    workspaces: Collection[str] | None,
    after: str | None,
    limit: int,
) -> Sequence[Agent]:
    """One page of agents by id: in `workspace` (None: any) among `workspaces` (None: all),
    with an id after `after`. The SQL backends seek and limit in the query; another
    backend's full list is filtered here."""
    from nxmesh.sql.backend import SqlStorage  # loaded already when the storage is one

    if isinstance(storage, SqlStorage):
        return await storage.list_agents(workspace, workspaces=workspaces, after=after, limit=limit)
    page = [
        a
        for a in await storage.list_agents(workspace)
        if (workspaces is None or a.workspace in workspaces) and (after is None or a.id > after)
    ]
    return sorted(page, key=lambda a: a.id)[:limit]


async def _statuses_of(
    storage: StorageBackend, agent: Agent, *, version: int | None = None
) -> list[AgentStatus]:
    """`agent`'s statuses — one query on the SQL backends, not the whole workspace's."""
    from nxmesh.sql.backend import SqlStorage

    if isinstance(storage, SqlStorage):
        found = await storage.list_agent_statuses(
            agent.workspace, version=version, agent_id=agent.id
        )
    else:
        found = await storage.list_agent_statuses(agent.workspace, version=version)
    return [s for s in found if s.agent_id == agent.id]


async def _agent(caller: CallerDep, agent_id: str, permission: str = "agent:read") -> Agent:
    agent = await caller.services.storage.get_agent(agent_id)
    if agent is None or not caller.can(permission, agent.workspace):
        raise NotFound(f"no agent {agent_id!r}")
    return agent


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"


def explain(
    agent: Agent,
    version: ConfigVersion,
    *,
    assignments: Sequence[Assignment],
    latest: int | None,
    status: AgentStatus | None,
    now: float | None = None,
) -> AgentWhy:
    """Why `agent` is (not) on `version`: the first reason that applies, in this order —
    it is revoked; it is on it; no selector picks that version for it; its apply failed or was
    rolled back (with nginx's message); it is offline; the apply is under way; pending."""
    number = version.number
    desired = desired_version(agent, assignments, latest)

    def why(reason: str, detail: str, *, on: bool = False) -> AgentWhy:
        return AgentWhy(
            agent_id=agent.id,
            version=number,
            on_version=on,
            reason=reason,  # type: ignore[arg-type]
            detail=detail,
            desired_version=desired.version,
            assignment=desired.assignment.name if desired.assignment else None,
            running_version=agent.running_version,
            status=status,
        )

    # Revoked first: a revoked agent may still run the version, but it is out of the
    # fleet and must not count towards (or complete) a rollout.
    if agent.status == "revoked":
        return why("revoked", "the agent's credentials were revoked; it gets no versions")
    if agent.running_version == number and agent.running_digest in (None, version.digest):
        return why("current", f"the agent reports it runs version {number}", on=True)
    if desired.version != number:
        if desired.assignment is not None:
            a = desired.assignment
            detail = (
                f"assignment {a.name!r} (selector: {_labels(a.selector.match_labels)}) matches "
                f"its labels ({_labels(agent.labels)}) and pins it to version {a.version}"
            )
        else:
            detail = (
                f"no assignment's selector matches its labels ({_labels(agent.labels)}), so it "
                f"follows the latest version ({latest}), which is not version {number}"
            )
        others = [a for a in assignments if a.version == number and a is not desired.assignment]
        if others:
            shown = "; ".join(
                f"{a.name!r} selects {_labels(a.selector.match_labels)}" for a in others
            )
            detail += f". Assignments of version {number}: {shown}"
        return why("not_selected", detail)
    if status is not None and status.phase == "failed":
        return why("failed", f"applying version {number} failed: {status.message}")
    if status is not None and status.phase == "rolled_back":
        return why(
            "rolled_back", f"version {number} went live and was rolled back: {status.message}"
        )
    if agent.status != "online":
        seen = (
            f"last seen {max(0, (now or time.time()) - agent.last_seen):.0f} s ago"
            if agent.last_seen is not None
            else "never seen"
        )
        return why(
            "offline",
            f"the agent is {agent.status} ({seen}); it gets version {number} when it reconnects",
        )
    if status is not None and status.phase in ("sent", "received", "applying"):
        return why("in_progress", f"version {number} was {status.phase} to the agent")
    return why("pending", f"version {number} is due; the agent has not reported it yet")


class AgentController(Controller):
    """Enrolled agents (enrollment itself is in ``bootstrap-tokens``)."""

    path = "/agents"
    tags = ("agents",)
    security = BEARER

    @get(
        "/",
        opt=perm("agent:read", scope="anywhere"),
        responses=ERRORS,
        response_headers=[LINK_HEADER],
    )
    async def list_agents(
        self,
        request: Request[Any, Any, Any],
        caller: CallerDep,
        workspace: WorkspaceFilter = None,
        limit: PageLimit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Response[list[Agent]]:
        """Agents the caller may see, by id, a page at a time: follow the ``Link`` header's
        ``rel="next"`` URL until there is none."""
        after = (
            None
            if cursor is None
            else decode_cursor(cursor, lambda key: _AGENT_ID.fullmatch(key) is not None)
        )
        agents = await agent_page(
            caller.services.storage,
            workspace=workspace,
            workspaces=caller.workspaces_with("agent:read"),
            after=after,
            limit=limit,
        )
        params = {"workspace": workspace, "limit": limit}
        return Response(list(agents), headers=page_headers(request, agents, limit, params))

    @get("/{agent_id:str}", opt=perm("agent:read", scope="anywhere"), responses=ERRORS)
    async def get_agent(self, agent_id: AgentId, caller: CallerDep) -> Agent:
        return await _agent(caller, agent_id)

    @get("/{agent_id:str}/status", opt=perm("agent:read", scope="anywhere"), responses=ERRORS)
    async def agent_status(self, agent_id: AgentId, caller: CallerDep) -> list[AgentStatus]:
        """The agent's rollout status per version (sent, applying, applied, failed...)."""
        agent = await _agent(caller, agent_id)
        return await _statuses_of(caller.services.storage, agent)

    @get("/{agent_id:str}/health", opt=perm("agent:read", scope="anywhere"), responses=ERRORS)
    async def agent_health(self, agent_id: AgentId, caller: CallerDep) -> HealthReport:
        """The latest health report this master received from the agent."""
        agent = await _agent(caller, agent_id)
        report = caller.services.health.get(agent.id)
        if report is None:
            raise NotFound(f"agent {agent_id!r} has not reported its health to this master")
        return report

    @get("/{agent_id:str}/why", opt=perm("agent:read", scope="anywhere"), responses=ERRORS)
    async def why(self, agent_id: AgentId, version: WhyVersion, caller: CallerDep) -> AgentWhy:
        """Why the agent is (not) running ``version``: not selected, offline, failed (with
        nginx's message), in progress, pending — or it is."""
        agent = await _agent(caller, agent_id)
        storage = caller.services.storage
        target = await storage.get_version(agent.workspace, version)
        if target is None:
            raise NotFound(f"workspace {agent.workspace!r} has no version {version}")
        latest = await storage.latest_version(agent.workspace)
        statuses = await _statuses_of(storage, agent, version=version)
        status = next(iter(statuses), None)
        return explain(
            agent,
            target,
            assignments=await storage.list_assignments(agent.workspace),
            latest=latest.number if latest else None,
            status=status,
        )

    @put("/{agent_id:str}/labels", opt=perm("agent:write", scope="anywhere"), responses=ERRORS)
    async def put_labels(
        self, agent_id: AgentId, data: JSONBody[LabelsUpdate], caller: CallerDep
    ) -> Agent:
        """Replace the agent's labels (which assignments select it may change)."""
        agent = await _agent(caller, agent_id, "agent:write")
        updated = attrs.evolve(agent, labels=data.labels)
        s = caller.services
        await s.storage.upsert_agent(updated)
        await caller.audit(
            "agent.labels",
            f"agents/{agent.id}",
            workspace=agent.workspace,
            labels=dict(data.labels),
        )
        await s.publish(
            "agent.updated", {"agent_id": agent.id, "labels": dict(data.labels)},
            workspace=agent.workspace,
        )  # fmt: skip
        await s.orchestrator.agent_changed(updated)
        return updated

    @post(
        "/{agent_id:str}/revoke",
        opt=perm("agent:revoke", scope="anywhere"),
        status_code=200,
        responses=ERRORS,
    )
    async def revoke(self, agent_id: AgentId, caller: CallerDep) -> Agent:
        """Delete the agent's session keys and mark it revoked; its stream closes at once."""
        agent = await _agent(caller, agent_id, "agent:revoke")
        s = caller.services
        await s.enrollment.revoke_agent(agent.id)
        s.health.forget(agent.id)
        await s.orchestrator.agent_revoked(agent.id)
        await caller.audit("agent.revoke", f"agents/{agent.id}", workspace=agent.workspace)
        await s.publish("agent.revoked", {"agent_id": agent.id}, workspace=agent.workspace)
        return attrs.evolve(agent, status="revoked")
