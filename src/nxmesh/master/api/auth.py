"""``/api/v1/auth``: login, refresh, logout, who am I, and API tokens."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.params import JSONBody, Parameter

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.interfaces import Credentials
from nxmesh.master.api._common import BEARER, ERRORS, LOGIN_ERRORS, PUBLIC_ERRORS, perm
from nxmesh.master.api.context import CallerDep, ServicesDep, credentials_from, remote_addr
from nxmesh.master.api.schemas import (
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenView,
    LoginRequest,
    Me,
    PasswordChange,
    RefreshRequest,
    TokenResponse,
)
from nxmesh.master.auth.errors import AuthenticationError
from nxmesh.master.auth.passwords import check_password_policy, replace_hash
from nxmesh.master.auth.service import TokenPair
from nxmesh.master.auth.store import ApiTokenRecord
from nxmesh.master.problems import Conflict, NotFound

__all__ = ["AuthController", "SessionController"]

TokenId = Annotated[str, Parameter(pattern=r"^[0-9a-f]{16}(?!\n)$", description="API token id.")]


def _tokens(pair: TokenPair, now: float) -> TokenResponse:
    return TokenResponse(
        access_token=pair.access.token,
        token_type=pair.access.token_type,
        expires_in=max(0, int(pair.access.expires_at - now)),
        expires_at=pair.access.expires_at,
        refresh_token=pair.refresh_token,
        refresh_expires_at=pair.refresh_expires_at,
        subject=pair.principal.subject,
        roles=pair.principal.roles,
    )


def _view(record: ApiTokenRecord) -> ApiTokenView:
    return ApiTokenView(
        id=record.id,
        owner=record.owner,
        name=record.name,
        scopes=record.scopes,
        created_at=record.created_at,
        expires_at=record.expires_at,
        last_used_at=record.last_used_at,
        revoked=record.revoked,
    )


class SessionController(Controller):
    """Sessions: password login → access + refresh token; refresh; logout. Public."""

    path = "/auth"
    tags = ("auth",)

    @post("/login", opt={"public": True}, status_code=200, responses=LOGIN_ERRORS)
    async def login(
        self, data: JSONBody[LoginRequest], request: Request[Any, Any, Any], services: ServicesDep
    ) -> TokenResponse:
        """Exchange a username and password for an access token and a refresh token."""
        addr = remote_addr(request)
        credentials = Credentials(
            "password", {"username": data.username, "password": data.password}, remote_addr=addr
        )
        try:
            pair = await services.auth.login(credentials)
        except AuthenticationError as exc:
            await services.audit.record(
                actor=data.username,
                action="auth.login_failed",
                resource=f"users/{data.username}",
                remote_addr=addr,
                details={"reason": exc.reason},
            )
            raise
        await services.audit.record(
            actor=pair.principal.subject,
            action="auth.login",
            resource=f"users/{pair.principal.subject}",
            remote_addr=addr,
            details={"authenticator": pair.principal.authenticator},
        )
        return _tokens(pair, services.auth.clock())

    @post("/refresh", opt={"public": True}, status_code=200, responses=PUBLIC_ERRORS)
    async def refresh(
        self,
        data: JSONBody[RefreshRequest],
        request: Request[Any, Any, Any],
        services: ServicesDep,
    ) -> TokenResponse:
        """Rotate a refresh token: the presented one is spent, a new pair is returned.

        Presenting a spent refresh token again revokes the whole session.
        """
        pair = await services.auth.refresh(data.refresh_token)
        await services.audit.record(
            actor=pair.principal.subject,
            action="auth.refresh",
            resource=f"users/{pair.principal.subject}",
            remote_addr=remote_addr(request),
        )
        return _tokens(pair, services.auth.clock())

    @post("/logout", opt={"public": True}, status_code=204, responses=PUBLIC_ERRORS)
    async def logout(
        self,
        data: JSONBody[RefreshRequest],
        request: Request[Any, Any, Any],
        services: ServicesDep,
    ) -> None:
        """Revoke the session the refresh token belongs to (idempotent)."""
        record = await services.auth.logout(data.refresh_token)
        if record is not None:
            await services.audit.record(
                actor=record.subject,
                action="auth.logout",
                resource=f"users/{record.subject}",
                remote_addr=remote_addr(request),
            )


class AuthController(Controller):
    """The caller itself and its API tokens."""

    path = "/auth"
    tags = ("auth",)
    security = BEARER

    @get("/me", opt={"authenticated": True}, responses=ERRORS)
    async def me(self, caller: CallerDep) -> Me:
        """The authenticated caller, its roles and the grants they give."""
        p = caller.principal
        grants = tuple(str(g) for g in caller.services.rbac.grants(p.roles))
        return Me(
            subject=p.subject,
            roles=p.roles,
            authenticator=p.authenticator,
            scopes=p.scopes,
            grants=grants,
        )

    @post("/password", opt={"authenticated": True}, status_code=204, responses=LOGIN_ERRORS)
    async def change_password(
        self, data: JSONBody[PasswordChange], request: Request[Any, Any, Any], caller: CallerDep
    ) -> None:
        """Change the caller's own password; every session of the caller ends.

        The current password is checked like a login (lockout included), so a stolen
        access token alone cannot take the account over.
        """
        services = caller.services
        check_password_policy(data.new_password, path="new_password")
        credentials = Credentials(
            "password",
            {"username": caller.subject, "password": data.current_password},
            remote_addr=remote_addr(request),
        )
        verified = await services.auth.authenticate(credentials)
        user = await services.storage.get_user(verified.subject)
        if user is None or verified.subject != caller.subject:
            raise AuthenticationError("invalid username or password", reason="bad_password")
        new_hash = await services.auth.passwords.hash_in_thread(data.new_password)
        if not await replace_hash(services.storage, user.username, user.password_hash, new_hash):
            raise Conflict(
                "the account changed while the new password was being set (disabled, "
                "removed or given another password); nothing was changed"
            )
        # Every credential made with the old password goes: sessions, and API tokens (a
        # stolen access token could have minted one that outlives it).
        await services.auth.end_sessions(user.username)
        revoked = await services.auth.revoke_api_tokens_of(user.username)
        await caller.audit(
            "auth.password_change", f"users/{user.username}", api_tokens_revoked=revoked
        )

    @get("/tokens", opt=perm("api_token:read", scope="anywhere"), responses=ERRORS)
    async def list_tokens(self, caller: CallerDep) -> list[ApiTokenView]:
        """The caller's own API tokens (never their secrets)."""
        records = await caller.services.auth.store.list_api_tokens(caller.subject)
        return [_view(r) for r in records]

    @post("/tokens", opt=perm("api_token:write", scope="anywhere"), responses=ERRORS)
    async def create_token(
        self, request: Request[Any, Any, Any], data: JSONBody[ApiTokenCreate], caller: CallerDep
    ) -> ApiTokenCreated:
        """Create an API token; its secret is in this response and nowhere else, ever.

        A token made with an API token expires no later than that token: its scopes are
        bounded already, and so is its life (no short-lived token minting a permanent one).
        """
        auth = caller.services.auth
        if caller.principal.authenticator == "api_token":
            credentials = credentials_from(request)
            token = credentials.values.get("token", "") if credentials else ""
            until = await auth.expiry_of(token, caller.principal)
            if until is not None:
                left = max(0, int(until - auth.clock()))
                if data.expires_in is None or data.expires_in > left:
                    raise ValidationError(
                        [
                            Problem(
                                "expires_in",
                                f"must be at most {left} seconds: the API token creating "
                                "this one expires then, and a token cannot outlive it",
                            )
                        ]
                    )
        issued = await auth.create_api_token(
            caller.principal, name=data.name, scopes=data.scopes, ttl=data.expires_in
        )
        await caller.audit(
            "api_token.create",
            f"api-tokens/{issued.record.id}",
            name=data.name,
            scopes=list(data.scopes),
        )
        return ApiTokenCreated(token=issued.token, api_token=_view(issued.record))

    @delete(
        "/tokens/{token_id:str}", opt=perm("api_token:write", scope="anywhere"), responses=ERRORS
    )
    async def revoke_token(self, token_id: TokenId, caller: CallerDep) -> None:
        """Revoke one of the caller's API tokens (any token with ``user:write``)."""
        record = await caller.services.auth.revoke_api_token(caller.principal, token_id)
        if record is None:
            raise NotFound(f"no API token {token_id!r}")
        await caller.audit("api_token.revoke", f"api-tokens/{token_id}", owner=record.owner)
