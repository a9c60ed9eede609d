"""Desired state per workspace, and sites and upstreams as views onto it.

Every write builds the complete new state and goes through `ConfigChanges.commit`, so a
change to one site is validated against everything else and stored as a new signed
version — or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import attrs
from litestar import Controller, delete, get, post, put
from litestar.params import JSONBody, Parameter

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.model import DesiredState, Site, Stream, Upstream
from nxmesh.master.api._common import (
    BEARER,
    ERRORS,
    CommitMessage,
    ExpectedVersion,
    Name,
    Workspace,
    change_result,
    commit_message,
    perm,
)
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.schemas import ChangeResult, DryRunResult, FieldProblem
from nxmesh.master.problems import Conflict, NotFound

__all__ = ["SiteController", "StateController", "StreamController", "UpstreamController"]

T = TypeVar("T", Site, Upstream)

DryRun = Annotated[
    bool, Parameter(description="Validate and diff only: return what would change, store nothing.")
]


async def _current(caller: CallerDep, workspace: str) -> DesiredState:
    latest = await caller.services.storage.latest_version(workspace)
    return latest.state if latest is not None else DesiredState(workspace=workspace)


async def _commit(
    caller: CallerDep,
    workspace: str,
    edit: Callable[[DesiredState], DesiredState],
    *,
    action: str,
    resource: str,
    message: str,
    expected_version: int | None,
) -> ChangeResult:
    result = await caller.services.changes.commit(
        workspace,
        edit,
        author=caller.subject,
        message=message,
        expected_version=expected_version,
    )
    if result.created:
        await caller.audit(
            action,
            resource,
            workspace=workspace,
            version=result.version.number,
            digest=result.version.digest,
        )
    return change_result(result)


class StateController(Controller):
    """The complete desired state of a workspace."""

    path = "/workspaces/{workspace:str}/state"
    tags = ("state",)
    security = BEARER

    @get("/", opt=perm("config:read"), responses=ERRORS)
    async def get_state(self, workspace: Workspace, caller: CallerDep) -> DesiredState:
        """The workspace's desired state as of its latest version (empty before the first)."""
        return await _current(caller, workspace)

    @put("/", opt=perm("config:write"), responses=ERRORS)
    async def put_state(
        self,
        workspace: Workspace,
        data: JSONBody[DesiredState],
        caller: CallerDep,
        dry_run: DryRun = False,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult | DryRunResult:
        """Replace the desired state: validated as a whole, stored as a new signed version.

        With ``dry_run=true`` nothing is stored: the answer is the model diff and the
        unified diff of the rendered nginx files against the latest version.
        """
        state = attrs.evolve(data, workspace=workspace)
        if dry_run:
            preview = await caller.services.changes.preview(workspace, state)
            return DryRunResult(
                workspace=workspace,
                base_version=preview.base.number if preview.base else None,
                would_change=preview.changed,
                changes=preview.diff,
                summary=(
                    "first version: an empty state"  # stored though nothing differs
                    if preview.base is None and preview.diff.is_empty
                    else preview.diff.summary()
                ),
                bundle_diff=preview.bundle_diff,
                warnings=tuple(
                    FieldProblem(path=p.path, message=p.message, severity=p.severity)
                    for p in preview.warnings
                ),
            )
        return await _commit(
            caller,
            workspace,
            lambda _old: state,
            action="state.replace",
            resource=f"workspaces/{workspace}/state",
            message=commit_message(message, "replace desired state"),
            expected_version=expected_version,
        )


def _items(state: DesiredState, kind: str) -> tuple[Any, ...]:
    items: tuple[Any, ...] = getattr(state, kind)
    return items


def _with(state: DesiredState, kind: str, items: Sequence[Any]) -> DesiredState:
    changes: dict[str, Any] = {kind: tuple(items)}
    return attrs.evolve(state, **changes)


async def _edit_item(
    caller: CallerDep,
    workspace: str,
    kind: str,
    verb: str,
    name: str,
    edit: Callable[[DesiredState], DesiredState],
    message: str | None,
    expected_version: int | None,
) -> ChangeResult:
    """`_commit` for one named site or upstream: audit action, resource and default message
    all follow from ``kind`` (``sites``) and ``verb`` (``create``/``update``/``delete``)."""
    noun = kind.removesuffix("s")
    return await _commit(
        caller,
        workspace,
        edit,
        action=f"{noun}.{verb}",
        resource=f"workspaces/{workspace}/{kind}/{name}",
        message=commit_message(message, f"{verb} {noun} {name}"),
        expected_version=expected_version,
    )


def _create(kind: str, noun: str, item: Any) -> Callable[[DesiredState], DesiredState]:
    def edit(state: DesiredState) -> DesiredState:
        if any(x.name == item.name for x in _items(state, kind)):
            raise Conflict(f"{noun} {item.name!r} exists; use PUT to replace it")
        return _with(state, kind, [*_items(state, kind), item])

    return edit


def _replace(kind: str, item: Any) -> Callable[[DesiredState], DesiredState]:
    def edit(state: DesiredState) -> DesiredState:
        items = list(_items(state, kind))
        for i, x in enumerate(items):
            if x.name == item.name:
                items[i] = item
                break
        else:
            items.append(item)
        return _with(state, kind, items)

    return edit


def _remove(kind: str, noun: str, name: str) -> Callable[[DesiredState], DesiredState]:
    def edit(state: DesiredState) -> DesiredState:
        items = [x for x in _items(state, kind) if x.name != name]
        if len(items) == len(_items(state, kind)):
            raise NotFound(f"no {noun} named {name!r} in workspace {state.workspace!r}")
        return _with(state, kind, items)

    return edit


def _remove_upstream(name: str) -> Callable[[DesiredState], DesiredState]:
    """`_remove` for an upstream, refused with 409 naming the sites and streams still
    using it (rather than the state check's "refers to unknown upstream" about an object
    the caller did not touch)."""
    remove = _remove("upstreams", "upstream", name)

    def edit(state: DesiredState) -> DesiredState:
        without = remove(state)
        users = []
        for site in state.sites:
            paths = [
                repr(loc.path)
                for loc in site.locations
                if name in (loc.upstream, loc.fastcgi.upstream if loc.fastcgi else None)
            ]
            if paths:
                users.append(f"site {site.name!r} (locations {', '.join(paths)})")
        users += [f"stream {stream.name!r}" for stream in state.streams if name in stream.upstreams]
        if users:
            raise Conflict(
                f"upstream {name!r} is in use by {'; '.join(users)}; point them at another "
                "upstream, or remove them, first"
            )
        return without

    return edit


def _same_name(name: str, item: Any) -> None:
    if item.name != name:
        raise ValidationError(
            [Problem("name", f"is {item.name!r} but the URL names {name!r}; make them equal")]
        )


class SiteController(Controller):
    """Sites of a workspace; each write creates a new version of the whole state."""

    path = "/workspaces/{workspace:str}/sites"
    tags = ("sites",)
    security = BEARER

    @get("/", opt=perm("config:read"), responses=ERRORS)
    async def list_sites(self, workspace: Workspace, caller: CallerDep) -> list[Site]:
        """Every site of the latest version."""
        return list((await _current(caller, workspace)).sites)

    @get("/{name:str}", opt=perm("config:read"), responses=ERRORS)
    async def get_site(self, workspace: Workspace, name: Name, caller: CallerDep) -> Site:
        for site in (await _current(caller, workspace)).sites:
            if site.name == name:
                return site
        raise NotFound(f"no site named {name!r} in workspace {workspace!r}")

    @post("/", opt=perm("config:write"), responses=ERRORS)
    async def create_site(
        self,
        workspace: Workspace,
        data: JSONBody[Site],
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Add a site (409 when one of that name exists)."""
        return await _edit_item(
            caller,
            workspace,
            "sites",
            "create",
            data.name,
            _create("sites", "site", data),
            message,
            expected_version,
        )

    @put("/{name:str}", opt=perm("config:write"), responses=ERRORS)
    async def put_site(
        self,
        workspace: Workspace,
        name: Name,
        data: JSONBody[Site],
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Create or replace the site `name`."""
        _same_name(name, data)
        return await _edit_item(
            caller,
            workspace,
            "sites",
            "update",
            name,
            _replace("sites", data),
            message,
            expected_version,
        )

    @delete("/{name:str}", opt=perm("config:write"), status_code=200, responses=ERRORS)
    async def delete_site(
        self,
        workspace: Workspace,
        name: Name,
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Remove the site `name`."""
        return await _edit_item(
            caller,
            workspace,
            "sites",
            "delete",
            name,
            _remove("sites", "site", name),
            message,
            expected_version,
        )


class UpstreamController(Controller):
    """Upstreams of a workspace; each write creates a new version of the whole state."""

    path = "/workspaces/{workspace:str}/upstreams"
    tags = ("upstreams",)
    security = BEARER

    @get("/", opt=perm("config:read"), responses=ERRORS)
    async def list_upstreams(self, workspace: Workspace, caller: CallerDep) -> list[Upstream]:
        """Every upstream of the latest version."""
        return list((await _current(caller, workspace)).upstreams)

    @get("/{name:str}", opt=perm("config:read"), responses=ERRORS)
    async def get_upstream(self, workspace: Workspace, name: Name, caller: CallerDep) -> Upstream:
        for upstream in (await _current(caller, workspace)).upstreams:
            if upstream.name == name:
                return upstream
        raise NotFound(f"no upstream named {name!r} in workspace {workspace!r}")

    @post("/", opt=perm("config:write"), responses=ERRORS)
    async def create_upstream(
        self,
        workspace: Workspace,
        data: JSONBody[Upstream],
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Add an upstream (409 when one of that name exists)."""
        return await _edit_item(
            caller,
            workspace,
            "upstreams",
            "create",
            data.name,
            _create("upstreams", "upstream", data),
            message,
            expected_version,
        )

    @put("/{name:str}", opt=perm("config:write"), responses=ERRORS)
    async def put_upstream(
        self,
        workspace: Workspace,
        name: Name,
        data: JSONBody[Upstream],
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Create or replace the upstream `name`."""
        _same_name(name, data)
        return await _edit_item(
            caller,
            workspace,
            "upstreams",
            "update",
            name,
            _replace("upstreams", data),
            message,
            expected_version,
        )

    @delete("/{name:str}", opt=perm("config:write"), status_code=200, responses=ERRORS)
    async def delete_upstream(
        self,
        workspace: Workspace,
        name: Name,
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Remove the upstream `name` (409 naming the sites that still proxy to it)."""
        return await _edit_item(
            caller,
            workspace,
            "upstreams",
            "delete",
            name,
            _remove_upstream(name),
            message,
            expected_version,
        )


class StreamController(Controller):
    """TCP and UDP streams of a workspace; each write creates a new version of the whole
    state."""

    path = "/workspaces/{workspace:str}/streams"
    tags = ("streams",)
    security = BEARER

    @get("/", opt=perm("config:read"), responses=ERRORS)
    async def list_streams(self, workspace: Workspace, caller: CallerDep) -> list[Stream]:
        """Every stream of the latest version."""
        return list((await _current(caller, workspace)).streams)

    @get("/{name:str}", opt=perm("config:read"), responses=ERRORS)
    async def get_stream(self, workspace: Workspace, name: Name, caller: CallerDep) -> Stream:
        for stream in (await _current(caller, workspace)).streams:
            if stream.name == name:
                return stream
        raise NotFound(f"no stream named {name!r} in workspace {workspace!r}")

    @post("/", opt=perm("config:write"), responses=ERRORS)
    async def create_stream(
        self,
        workspace: Workspace,
        data: JSONBody[Stream],
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Add a stream (409 when one of that name exists)."""
        return await _edit_item(
            caller,
            workspace,
            "streams",
            "create",
            data.name,
            _create("streams", "stream", data),
            message,
            expected_version,
        )

    @put("/{name:str}", opt=perm("config:write"), responses=ERRORS)
    async def put_stream(
        self,
        workspace: Workspace,
        name: Name,
        data: JSONBody[Stream],
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Create or replace the stream `name`."""
        _same_name(name, data)
        return await _edit_item(
            caller,
            workspace,
            "streams",
            "update",
            name,
            _replace("streams", data),
            message,
            expected_version,
        )

    @delete("/{name:str}", opt=perm("config:write"), status_code=200, responses=ERRORS)
    async def delete_stream(
        self,
        workspace: Workspace,
        name: Name,
        caller: CallerDep,
        message: CommitMessage = None,
        expected_version: ExpectedVersion = None,
    ) -> ChangeResult:
        """Remove the stream `name`."""
        return await _edit_item(
            caller,
            workspace,
            "streams",
            "delete",
            name,
            _remove("streams", "stream", name),
            message,
            expected_version,
        )
