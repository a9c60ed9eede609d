"""Config versions of a workspace: list, show, diff, roll back."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from nxmesh.config.diff import bundle_diff, diff_states
from nxmesh.core.model import ConfigVersion
from nxmesh.master.api._common import (
    BEARER,
    ERRORS,
    MAX_NUMBER,
    CommitMessage,
    VersionNumber,
    Workspace,
    change_result,
    commit_message,
    perm,
)
from nxmesh.master.api.agents import explain
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.paging import LINK_HEADER, next_link
from nxmesh.master.api.schemas import ChangeResult, RolloutView, VersionDiff, VersionSummary
from nxmesh.master.problems import NotFound

__all__ = ["VersionController"]

Limit = Annotated[int, Parameter(ge=1, le=1000, description="At most this many versions.")]
Before = Annotated[
    int | None, Parameter(ge=1, le=MAX_NUMBER, description="Only versions numbered below this.")
]
Against = Annotated[
    int | None,
    Parameter(
        ge=0,
        le=MAX_NUMBER,
        description="The version to compare with (default: the previous one; 0: empty).",
    ),
]


async def _version(caller: CallerDep, workspace: str, number: int) -> ConfigVersion:
    version = await caller.services.storage.get_version(workspace, number)
    if version is None:
        raise NotFound(f"workspace {workspace!r} has no version {number}")
    return version


class VersionController(Controller):
    """Immutable, signed config versions."""

    path = "/workspaces/{workspace:str}/versions"
    tags = ("versions",)
    security = BEARER

    @get("/", opt=perm("config:read"), responses=ERRORS, response_headers=[LINK_HEADER])
    async def list_versions(
        self,
        request: Request[Any, Any, Any],
        workspace: Workspace,
        caller: CallerDep,
        limit: Limit = 100,
        before: Before = None,
    ) -> Response[list[VersionSummary]]:
        """Versions newest first, without their states; page back with ``before`` (the
        ``Link`` header's ``rel="next"`` URL has it)."""
        versions = await caller.services.storage.list_versions(
            workspace, limit=limit, before=before
        )
        headers = {}
        if len(versions) == limit and versions[-1].number > 1:
            headers["Link"] = next_link(request, {"limit": limit, "before": versions[-1].number})
        return Response([VersionSummary.of(v) for v in versions], headers=headers)

    @get("/{number:int}", opt=perm("config:read"), responses=ERRORS)
    async def get_version(
        self, workspace: Workspace, number: VersionNumber, caller: CallerDep
    ) -> ConfigVersion:
        """One version with its state and signature."""
        return await _version(caller, workspace, number)

    @get("/{number:int}/diff", opt=perm("config:read"), responses=ERRORS)
    async def diff_version(
        self,
        workspace: Workspace,
        number: VersionNumber,
        caller: CallerDep,
        against: Against = None,
    ) -> VersionDiff:
        """What changed from version ``against`` (default ``number - 1``) to ``number``:
        the model diff and the unified diff of the rendered nginx files."""
        new = await _version(caller, workspace, number)
        base_number = number - 1 if against is None else against
        old = await _version(caller, workspace, base_number) if base_number >= 1 else None
        changes = diff_states(old.state if old else None, new.state)
        changes_module = caller.services.changes
        old_bundle = await changes_module.render(old.state) if old else None
        new_bundle = await changes_module.render(new.state)
        return VersionDiff(
            workspace=workspace,
            from_version=old.number if old else None,
            to_version=new.number,
            changes=changes,
            summary=changes.summary(),
            bundle_diff=bundle_diff(old_bundle, new_bundle),
        )

    @get("/{number:int}/rollout", opt=perm("config:read"), responses=ERRORS)
    async def rollout(
        self, workspace: Workspace, number: VersionNumber, caller: CallerDep
    ) -> RolloutView:
        """Where version ``number`` stands on each agent it targets, in one request: the
        recorded phase (sent, received, applying, applied, failed with nginx's message,
        rolled back), whether the agent runs the version's digest, and why not."""
        version = await _version(caller, workspace, number)
        storage = caller.services.storage
        latest = await storage.latest_version(workspace)
        assignments = await storage.list_assignments(workspace)
        statuses = {s.agent_id: s for s in await storage.list_agent_statuses(
            workspace, version=number)}  # fmt: skip
        whys = [
            explain(
                agent,
                version,
                assignments=assignments,
                latest=latest.number if latest else None,
                status=statuses.get(agent.id),
            )
            for agent in await storage.list_agents(workspace)
        ]
        targeted = tuple(w for w in whys if w.reason not in ("not_selected", "revoked"))
        return RolloutView(
            workspace=workspace,
            version=number,
            digest=version.digest,
            created_at=version.created_at,
            converged=all(w.on_version for w in targeted),
            failed=any(w.reason in ("failed", "rolled_back") for w in targeted),
            agents=targeted,
            untargeted=len(whys) - len(targeted),
        )

    @post("/{number:int}/rollback", opt=perm("config:rollback"), status_code=200, responses=ERRORS)
    async def rollback(
        self,
        workspace: Workspace,
        number: VersionNumber,
        caller: CallerDep,
        message: CommitMessage = None,
    ) -> ChangeResult:
        """Append a new version whose state equals version ``number``'s.

        History is never rewritten; ``created`` is false when the latest version already
        has that state.
        """
        result = await caller.services.changes.rollback(
            workspace,
            number,
            author=caller.subject,
            message=commit_message(message, f"rollback to version {number}"),
        )
        if result.created:
            await caller.audit(
                "version.rollback",
                f"workspaces/{workspace}/versions/{number}",
                workspace=workspace,
                new_version=result.version.number,
            )
        return change_result(result)
