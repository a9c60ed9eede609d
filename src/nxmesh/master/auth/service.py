"""Sessions and tokens: login, refresh rotation with reuse detection, API tokens.

* **Login** runs the credentials through the authenticator chain and returns a pair:
  a short-lived RS256 access token and a refresh token ``nxr_<id>_<secret>``.
* **Refresh** spends the refresh token and returns a new pair. Each token works once;
  presenting a spent one means it leaked (or was replayed), so the whole login session
  (its *family*) is revoked and the caller must log in again.
* **API tokens** ``nxm_<id>_<secret>`` are for automation: named, optionally expiring,
  carrying scopes (permissions) no wider than their creator's own.

Secrets are returned once and stored as sha256 hashes only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import structlog

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.interfaces import Authenticator, Credentials, Principal
from nxmesh.core.settings import AuthSettings
from nxmesh.master.auth.errors import AuthenticationError, PermissionDeniedError
from nxmesh.master.auth.passwords import Passwords
from nxmesh.master.auth.store import ApiTokenRecord, AuthStore, NewRefresh, RefreshRecord
from nxmesh.master.auth.tokens import AccessTokens, IssuedAccess
from nxmesh.master.rbac import Rbac, parse_grant

if TYPE_CHECKING:
    from nxmesh.core.interfaces import StorageBackend

__all__ = [
    "API_TOKEN_PREFIX",
    "LOCAL_AUTHENTICATORS",
    "REFRESH_TOKEN_PREFIX",
    "AuthService",
    "IssuedApiToken",
    "TokenPair",
    "hash_secret",
    "split_token",
]

API_TOKEN_PREFIX: Final = "nxm"  # noqa: S105 - a prefix, not a secret
REFRESH_TOKEN_PREFIX: Final = "nxr"  # noqa: S105
LOCAL_AUTHENTICATORS: Final = frozenset({"password", "api_token", "jwt"})
"""Authenticators whose subjects are users in the master's storage."""

_API_TOUCH_INTERVAL: Final = 60.0  # seconds between last-used updates of one API token
SESSION_RECHECK: Final = 5.0
"""Seconds an access token's session, once found active, is trusted without asking
storage again: how long another master may take to see a logout, a new password or a
removed or demoted user end that user's access tokens (this master: at once)."""
_SESSION_CACHE_MAX: Final = 10_000

log = structlog.get_logger("nxmesh.master.auth")


def hash_secret(secret: str) -> str:
    """Hex sha256 of a token secret (secrets are random, so no slow KDF is needed)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def split_token(token: str, prefix: str) -> tuple[str, str] | None:
    """``<prefix>_<id>_<secret>`` → ``(id, secret)``, or None when `token` is not one."""
    head, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if head != prefix or not token_id or not secret or "_" in secret:
        return None
    if not all(c in "0123456789abcdef" for c in token_id + secret):
        return None
    return token_id, secret


@attrs.frozen
class TokenPair:
    """What a login or refresh returns; both tokens are secrets for their holder."""

    access: IssuedAccess
    refresh_token: str = attrs.field(repr=False)
    refresh_expires_at: float
    principal: Principal


@attrs.frozen
class IssuedApiToken:
    """A freshly created API token: `token` is shown once and never stored."""

    token: str = attrs.field(repr=False)
    record: ApiTokenRecord


@attrs.define
class AuthService:
    """The master's authentication: the chain, token issuance, API tokens."""

    settings: AuthSettings
    tokens: AccessTokens
    store: AuthStore
    passwords: Passwords
    rbac: Rbac
    storage: StorageBackend
    chain: list[Authenticator] = attrs.field(factory=list)
    on_failure: Callable[[str], None] = lambda reason: None
    clock: Callable[[], float] = time.time
    _touched: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)
    # Session family → when it was found active; an ended session never comes back, so
    # ended ones are kept as -1 (both bounded by _SESSION_CACHE_MAX).
    _sessions: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)

    # -- the chain -----------------------------------------------------------------------

    async def authenticate(self, credentials: Credentials) -> Principal:
        """The principal of the first link that recognises `credentials`.

        :raises AuthenticationError: a link rejected them, or no link recognised them.
        """
        try:
            for link in self.chain:
                principal = await link.authenticate(credentials)
                if principal is not None:
                    return principal
        except AuthenticationError as exc:
            self.on_failure(exc.reason)
            raise
        self.on_failure("unrecognised")
        raise AuthenticationError(
            f"no authenticator accepts {credentials.scheme} credentials", reason="unrecognised"
        )

    # -- sessions ------------------------------------------------------------------------

    async def login(self, credentials: Credentials) -> TokenPair:
        """Authenticate and open a session: an access token plus a refresh token."""
        principal = await self.authenticate(credentials)
        return await self.open_session(principal)

    async def open_session(self, principal: Principal) -> TokenPair:
        """A new session (refresh family) for an already authenticated principal."""
        family = secrets.token_hex(8)
        refresh, record = self._new_refresh(principal, family)
        await self.store.add_refresh(record)
        access = self.tokens.issue(
            principal.subject,
            principal.roles,
            authenticator=principal.authenticator,
            session=family,
        )
        return TokenPair(access, refresh, record.expires_at, principal)

    def _new_refresh(self, principal: Principal, family: str) -> tuple[str, RefreshRecord]:
        token_id, secret = secrets.token_hex(8), secrets.token_hex(32)
        now = self.clock()
        record = RefreshRecord(
            id=token_id,
            family=family,
            subject=principal.subject,
            authenticator=principal.authenticator,
            roles=principal.roles,
            secret_hash=hash_secret(secret),
            created_at=now,
            expires_at=now + self.settings.refresh_token_ttl,
        )
        return f"{REFRESH_TOKEN_PREFIX}_{token_id}_{secret}", record

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Spend `refresh_token` and return a new pair (rotation).

        :raises AuthenticationError: unknown, expired or revoked token, or reuse of a spent
            one (which also revokes every token of its session).
        """
        parts = split_token(refresh_token, REFRESH_TOKEN_PREFIX)
        if parts is None:
            self.on_failure("malformed")
            raise AuthenticationError("malformed refresh token", reason="malformed")
        token_id, secret = parts
        new_id, new_secret = secrets.token_hex(8), secrets.token_hex(32)
        now = self.clock()
        new = NewRefresh(
            id=new_id,
            secret_hash=hash_secret(new_secret),
            created_at=now,
            expires_at=now + self.settings.refresh_token_ttl,
        )
        result = await self.store.rotate_refresh(token_id, hash_secret(secret), new)
        old = result.record
        if result.outcome != "rotated" or old is None:
            self.on_failure(f"refresh_{result.outcome}")
            if result.outcome == "reused":
                self._forget_active_sessions()
                log.warning(
                    "refresh token reused; session revoked",
                    subject=old.subject if old else None,
                    session=old.family if old else None,
                )
                raise AuthenticationError(
                    "refresh token was already used; the session is revoked, log in again",
                    reason="refresh_reused",
                )
            raise AuthenticationError(
                f"refresh token is {result.outcome}", reason=f"refresh_{result.outcome}"
            )
        principal = await self._current_principal(old)
        if principal is None:
            await self.store.revoke_family(old.family)
            self._forget_active_sessions()
            self.on_failure("refresh_user_gone")
            raise AuthenticationError(
                "the session's user is disabled or was removed", reason="refresh_user_gone"
            )
        access = self.tokens.issue(
            principal.subject,
            principal.roles,
            authenticator=principal.authenticator,
            session=old.family,
        )
        new_token = f"{REFRESH_TOKEN_PREFIX}_{new_id}_{new_secret}"
        return TokenPair(access, new_token, new.expires_at, principal)

    async def _current_principal(self, record: RefreshRecord) -> Principal | None:
        if record.authenticator not in LOCAL_AUTHENTICATORS:
            return Principal(record.subject, record.roles, record.authenticator)
        user = await self.storage.get_user(record.subject)
        if user is None or user.disabled:
            return None
        return Principal(user.username, tuple(user.roles), record.authenticator)

    async def logout(self, refresh_token: str) -> RefreshRecord | None:
        """Revoke the session `refresh_token` belongs to; its record, or None if unknown."""
        parts = split_token(refresh_token, REFRESH_TOKEN_PREFIX)
        if parts is None:
            return None
        record = await self.store.find_refresh(parts[0], hash_secret(parts[1]))
        if record is None:
            return None
        await self.store.revoke_family(record.family)
        self._forget_active_sessions()
        return record

    async def end_sessions(self, subject: str) -> int:
        """Revoke every refresh token of `subject` (user disabled, deleted, new password);
        their access tokens stop working with them (`session_active`)."""
        ended = await self.store.revoke_subject(subject)
        self._forget_active_sessions()
        return ended

    async def session_active(self, family: str) -> bool:
        """Whether the login session `family` still runs: an access token is only as good
        as its session. Asks storage at most every `SESSION_RECHECK` seconds per session."""
        now = self.clock()
        seen = self._sessions.get(family)
        if seen is not None and (seen < 0 or now - seen < SESSION_RECHECK):
            return seen >= 0
        active = await self.store.session_active(family)
        if len(self._sessions) >= _SESSION_CACHE_MAX:
            self._sessions.clear()
        self._sessions[family] = now if active else -1.0
        return active

    def _forget_active_sessions(self) -> None:
        """After this master ended sessions: ask storage again before trusting any."""
        self._sessions = {family: t for family, t in self._sessions.items() if t < 0}

    # -- API tokens ----------------------------------------------------------------------

    async def create_api_token(
        self,
        owner: Principal,
        *,
        name: str,
        scopes: Sequence[str],
        ttl: float | None = None,
    ) -> IssuedApiToken:
        """Create a token for `owner` whose scopes are no wider than `owner`'s permissions.

        :raises ValidationError: a scope is malformed or exceeds the owner's permissions
            (the problem names ``scopes[i]``).
        """
        problems: list[Problem] = []
        if not scopes:
            problems.append(Problem("scopes", "must list at least one permission"))
        for i, text in enumerate(scopes):
            try:
                grant = parse_grant(text)
            except ValueError as exc:
                problems.append(Problem(f"scopes[{i}]", str(exc)))
                continue
            if not self.rbac.scope_allowed(owner, grant):
                problems.append(
                    Problem(f"scopes[{i}]", f"{text!r} exceeds the permissions of your roles")
                )
        if problems:
            raise ValidationError(problems)
        token_id, secret = secrets.token_hex(8), secrets.token_hex(24)
        now = self.clock()
        record = ApiTokenRecord(
            id=token_id,
            owner=owner.subject,
            name=name,
            scopes=tuple(scopes),
            secret_hash=hash_secret(secret),
            created_at=now,
            expires_at=None if ttl is None else now + ttl,
        )
        await self.store.add_api_token(record)
        return IssuedApiToken(f"{API_TOKEN_PREFIX}_{token_id}_{secret}", record)

    async def revoke_api_tokens_of(self, owner: str) -> int:
        """Revoke every API token `owner` holds (a user being deleted); how many were live."""
        revoked = 0
        for record in await self.store.list_api_tokens(owner):
            if not record.revoked and await self.store.revoke_api_token(record.id):
                revoked += 1
        return revoked

    async def verify_api_token(self, token: str) -> Principal:
        """The principal an API token stands for (its owner's roles, its own scopes).

        :raises AuthenticationError: malformed, unknown, revoked or expired token, or its
            owner is disabled or gone.
        """
        parts = split_token(token, API_TOKEN_PREFIX)
        if parts is None:
            raise AuthenticationError("malformed API token", reason="malformed")
        token_id, secret = parts
        record = await self.store.get_api_token(token_id)
        expected = record.secret_hash if record is not None else hash_secret("")
        if not hmac.compare_digest(expected, hash_secret(secret)) or record is None:
            raise AuthenticationError("unknown API token", reason="api_token_unknown")
        now = self.clock()
        if record.revoked:
            raise AuthenticationError("API token was revoked", reason="api_token_revoked")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthenticationError("API token expired", reason="api_token_expired")
        user = await self.storage.get_user(record.owner)
        if user is None or user.disabled:
            raise AuthenticationError(
                "API token owner is disabled or was removed", reason="api_token_owner_gone"
            )
        if now - self._touched.get(token_id, 0.0) > _API_TOUCH_INTERVAL:
            self._touched[token_id] = now
            await self.store.touch_api_token(token_id, now)
        return Principal(
            subject=user.username,
            roles=tuple(user.roles),
            authenticator="api_token",
            scopes=record.scopes,
        )

    async def expiry_of(self, token: str, principal: Principal) -> float | None:
        """When the bearer `token` that authenticated `principal` stops working (None: never
        or unknown); the events WebSocket closes then."""
        if principal.authenticator == "jwt":
            return self.tokens.verify(token).expires_at
        if principal.authenticator == "api_token":
            parts = split_token(token, API_TOKEN_PREFIX)
            record = await self.store.get_api_token(parts[0]) if parts else None
            return record.expires_at if record else None
        return None

    async def revoke_api_token(self, caller: Principal, token_id: str) -> ApiTokenRecord | None:
        """Revoke a token the caller owns, or another user's with ``user:write`` and every
        permission that user holds (the rule for managing users: revoking an admin's
        token is managing the admin); None if unknown.

        :raises PermissionDeniedError: the token belongs to someone the caller may not
            manage.
        """
        record = await self.store.get_api_token(token_id)
        if record is None:
            return None
        if record.owner != caller.subject:
            if not self.rbac.allowed(caller, "user:write"):
                raise PermissionDeniedError("user:write")
            owner = await self.storage.get_user(record.owner)
            if owner is not None and not self.rbac.holds_all(caller, owner.roles):
                raise PermissionDeniedError.to_manage(owner.username)
        await self.store.revoke_api_token(token_id)
        return record
