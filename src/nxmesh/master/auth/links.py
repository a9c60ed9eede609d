"""The master's own links of the authenticator chain: its access tokens and API tokens.

Both read ``Authorization: Bearer <token>`` credentials (scheme ``bearer``, value
``token``). Each recognises only its own kind — an access token *this* master issued
(``iss`` claim), or an ``nxm_`` API token — and passes anything else down the chain, so
an OAuth2 plugin's identity-provider tokens reach the OAuth2 link.

Authenticator classes are built by the master with ``cls.from_services(services)``
(a `nxmesh.master.app.MasterServices`) when they define it, else ``cls()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from nxmesh.core.interfaces import Credentials, Principal
from nxmesh.master.auth.errors import AuthenticationError
from nxmesh.master.auth.service import API_TOKEN_PREFIX, AuthService

if TYPE_CHECKING:
    from nxmesh.master.app import MasterServices

__all__ = ["ApiTokenAuthenticator", "JwtAuthenticator", "bearer_token"]


def bearer_token(credentials: Credentials) -> str | None:
    """The token of ``bearer`` credentials, else None."""
    if credentials.scheme != "bearer":
        return None
    token = credentials.values.get("token")
    return token if isinstance(token, str) and token else None


class JwtAuthenticator:
    """Accepts the RS256 access tokens this master issues (see `AccessTokens`)."""

    name: ClassVar[str] = "jwt"

    def __init__(self, auth: AuthService) -> None:
        self.auth = auth

    @classmethod
    def from_services(cls, services: MasterServices) -> JwtAuthenticator:
        return cls(services.auth)

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        token = bearer_token(credentials)
        if token is None or token.startswith(f"{API_TOKEN_PREFIX}_"):
            return None
        if token.count(".") != 2 or not self.auth.tokens.is_ours(token):
            return None
        claims = self.auth.tokens.verify(token)
        # The roles in the token are those of its session's last refresh: a logout, a
        # new password or a removed, disabled or demoted user ends the session, and the
        # token with it, instead of leaving it its old rights until it expires.
        if claims.session is not None and not await self.auth.session_active(claims.session):
            raise AuthenticationError(
                "the login session of this access token has ended (logout, a new password, "
                "or its user was changed or removed); log in again",
                reason="session_ended",
            )
        return Principal(subject=claims.subject, roles=claims.roles, authenticator=self.name)


class ApiTokenAuthenticator:
    """Accepts ``nxm_<id>_<secret>`` API tokens: the owner's roles, narrowed to the scopes."""

    name: ClassVar[str] = "api_token"

    def __init__(self, auth: AuthService) -> None:
        self.auth = auth

    @classmethod
    def from_services(cls, services: MasterServices) -> ApiTokenAuthenticator:
        return cls(services.auth)

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        token = bearer_token(credentials)
        if token is None or not token.startswith(f"{API_TOKEN_PREFIX}_"):
            return None
        return await self.auth.verify_api_token(token)
