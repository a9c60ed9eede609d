"""Authentication for the master API: the authenticator chain, tokens, passwords.

See ``docs/api.md`` for the flows; `nxmesh.master.rbac` decides what a principal may do.
Names are imported on first use, so plugins importing one small module (the errors)
do not pull in SQLAlchemy, PyJWT and argon2 at CLI start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nxmesh.master.auth.errors import (
        AuthenticationError,
        LockedOutError,
        PermissionDeniedError,
    )
    from nxmesh.master.auth.links import (
        ApiTokenAuthenticator,
        JwtAuthenticator,
        bearer_token,
    )
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
    from nxmesh.master.auth.tokens import (
        AccessClaims,
        AccessTokens,
        IssuedAccess,
    )

_MODULES = {
    "API_TOKEN_PREFIX": "service",
    "AccessClaims": "tokens",
    "AccessTokens": "tokens",
    "ApiTokenAuthenticator": "links",
    "ApiTokenRecord": "store",
    "AuthService": "service",
    "AuthStore": "store",
    "AuthenticationError": "errors",
    "IssuedAccess": "tokens",
    "IssuedApiToken": "service",
    "JwtAuthenticator": "links",
    "LockedOutError": "errors",
    "MIN_PASSWORD_LENGTH": "passwords",
    "MemoryAuthStore": "store",
    "Passwords": "passwords",
    "PermissionDeniedError": "errors",
    "REFRESH_TOKEN_PREFIX": "service",
    "RefreshRecord": "store",
    "SqlAuthStore": "store",
    "TokenPair": "service",
    "bearer_token": "links",
    "check_password_policy": "passwords",
    "generate_password": "passwords",
    "hash_secret": "service",
    "split_token": "service",
}

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


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
