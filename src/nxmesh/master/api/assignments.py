"""Assignments: which version the agents matching a label selector should run."""

from __future__ import annotations

from litestar import Controller, delete, get, put
from litestar.params import JSONBody

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.records import Assignment
from nxmesh.master.api._common import BEARER, ERRORS, Name, Workspace, perm
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.schemas import AssignmentSpec
from nxmesh.master.problems import NotFound

__all__ = ["AssignmentController"]


class AssignmentController(Controller):
    """Label selector → version. Agents no assignment matches follow the latest version;
    among matching ones the most specific selector wins (see `nxmesh.master.selection`)."""

    path = "/workspaces/{workspace:str}/assignments"
    tags = ("assignments",)
    security = BEARER

    @get("/", opt=perm("assignment:read"), responses=ERRORS)
    async def list_assignments(self, workspace: Workspace, caller: CallerDep) -> list[Assignment]:
        return list(await caller.services.storage.list_assignments(workspace))

    @get("/{name:str}", opt=perm("assignment:read"), responses=ERRORS)
    async def get_assignment(
        self, workspace: Workspace, name: Name, caller: CallerDep
    ) -> Assignment:
        for assignment in await caller.services.storage.list_assignments(workspace):
            if assignment.name == name:
                return assignment
        raise NotFound(f"no assignment named {name!r} in workspace {workspace!r}")

    @put("/{name:str}", opt=perm("assignment:write"), responses=ERRORS)
    async def put_assignment(
        self, workspace: Workspace, name: Name, data: JSONBody[AssignmentSpec], caller: CallerDep
    ) -> Assignment:
        """Create or replace an assignment; the version must exist in the workspace."""
        s = caller.services
        if await s.storage.get_version(workspace, data.version) is None:
            raise ValidationError(
                [Problem("version", f"workspace {workspace!r} has no version {data.version}")]
            )
        assignment = Assignment(
            workspace=workspace, name=name, selector=data.selector, version=data.version
        )
        await s.storage.set_assignment(assignment)
        await caller.audit(
            "assignment.set",
            f"workspaces/{workspace}/assignments/{name}",
            workspace=workspace,
            version=data.version,
            selector=dict(data.selector.match_labels),
        )
        await s.publish(
            "assignment.updated",
            {"name": name, "version": data.version, "selector": dict(data.selector.match_labels)},
            workspace=workspace,
        )
        await s.orchestrator.assignments_changed(workspace)
        return assignment

    @delete("/{name:str}", opt=perm("assignment:write"), responses=ERRORS)
    async def delete_assignment(self, workspace: Workspace, name: Name, caller: CallerDep) -> None:
        s = caller.services
        if not await s.storage.delete_assignment(workspace, name):
            raise NotFound(f"no assignment named {name!r} in workspace {workspace!r}")
        await caller.audit(
            "assignment.delete", f"workspaces/{workspace}/assignments/{name}", workspace=workspace
        )
        await s.publish("assignment.deleted", {"name": name}, workspace=workspace)
        await s.orchestrator.assignments_changed(workspace)
