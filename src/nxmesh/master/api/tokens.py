"""Bootstrap (enrollment) tokens: created with their secret shown once, listed without it."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.params import JSONBody, Parameter

from nxmesh.core.records import BootstrapToken
from nxmesh.master.api._common import BEARER, ERRORS, Workspace, perm
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.schemas import (
    BootstrapTokenCreate,
    BootstrapTokenCreated,
    BootstrapTokenView,
)
from nxmesh.master.problems import NotFound

__all__ = ["BootstrapTokenController"]

TokenId = Annotated[str, Parameter(pattern=r"^[0-9a-f]{1,64}(?!\n)$", description="Token id.")]


def _view(token: BootstrapToken) -> BootstrapTokenView:
    return BootstrapTokenView(
        id=token.id,
        workspace=token.workspace,
        labels=token.labels,
        created_at=token.created_at,
        expires_at=token.expires_at,
        used_at=token.used_at,
        revoked=token.revoked,
        usable=token.usable(),
    )


class BootstrapTokenController(Controller):
    """Single-use tokens ``<id>.<secret>`` an agent exchanges for its credentials."""

    path = "/workspaces/{workspace:str}/bootstrap-tokens"
    tags = ("enrollment",)
    security = BEARER

    @get("/", opt=perm("bootstrap_token:read"), responses=ERRORS)
    async def list_tokens(
        self, workspace: Workspace, caller: CallerDep
    ) -> list[BootstrapTokenView]:
        """The workspace's tokens, newest first (secrets are never stored, so never shown)."""
        tokens = await caller.services.storage.list_tokens(workspace)
        return [_view(t) for t in sorted(tokens, key=lambda t: -t.created_at)]

    @post("/", opt=perm("bootstrap_token:write"), responses=ERRORS)
    async def create_token(
        self, workspace: Workspace, data: JSONBody[BootstrapTokenCreate], caller: CallerDep
    ) -> BootstrapTokenCreated:
        """Create a token; the ``token`` in this response is the only copy of its secret."""
        issued = await caller.services.enrollment.create_token(
            workspace=workspace, labels=data.labels, ttl=data.ttl
        )
        await caller.audit(
            "bootstrap_token.create",
            f"workspaces/{workspace}/bootstrap-tokens/{issued.id}",
            workspace=workspace,
            labels=dict(data.labels),
            ttl=data.ttl,
        )
        return BootstrapTokenCreated(token=issued.token, bootstrap_token=_view(issued.record))

    @delete("/{token_id:str}", opt=perm("bootstrap_token:write"), responses=ERRORS)
    async def revoke_token(
        self, workspace: Workspace, token_id: TokenId, caller: CallerDep
    ) -> None:
        """Revoke a token so it can no longer enroll an agent."""
        s = caller.services
        tokens = await s.storage.list_tokens(workspace)
        if not any(t.id == token_id for t in tokens) or not await s.enrollment.revoke_token(
            token_id
        ):
            raise NotFound(f"no bootstrap token {token_id!r} in workspace {workspace!r}")
        await caller.audit(
            "bootstrap_token.revoke",
            f"workspaces/{workspace}/bootstrap-tokens/{token_id}",
            workspace=workspace,
        )
