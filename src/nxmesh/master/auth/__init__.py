"""Authentication for the master API: the authenticator chain, tokens, passwords.

See ``docs/api.md`` for the flows; `nxmesh.master.rbac` decides what a principal may do.
"""

from nxmesh.master.auth.errors import AuthenticationError, LockedOutError, PermissionDeniedError
from nxmesh.master.auth.links import ApiTokenAuthenticator, JwtAuthenticator, bearer_token
from nxmesh.master.auth.passwords import (
    MIN_PASSWORD_LENGTH,
    Passwords,
    check_password_policy,
    generate_password,
)
from nxmesh.master.auth.service import (
    API_TOKEN_PREFIX,
    REFRESH_TOKEN_PREFIX,
    AuthService,
    IssuedApiToken,
    TokenPair,
    hash_secret,
    split_token,
)
from nxmesh.master.auth.store import (
    ApiTokenRecord,
    AuthStore,
    MemoryAuthStore,
    RefreshRecord,
    SqlAuthStore,
)
from nxmesh.master.auth.tokens import AccessClaims, AccessTokens, IssuedAccess

__all__ = [
    "API_TOKEN_PREFIX",
    "MIN_PASSWORD_LENGTH",
    "REFRESH_TOKEN_PREFIX",
    "AccessClaims",
    "AccessTokens",
    "ApiTokenAuthenticator",
    "ApiTokenRecord",
    "AuthService",
    "AuthStore",
    "AuthenticationError",
    "IssuedAccess",
    "IssuedApiToken",
    "JwtAuthenticator",
    "LockedOutError",
    "MemoryAuthStore",
    "Passwords",
    "PermissionDeniedError",
    "RefreshRecord",
    "SqlAuthStore",
    "TokenPair",
    "bearer_token",
    "check_password_policy",
    "generate_password",
    "hash_secret",
    "split_token",
]
