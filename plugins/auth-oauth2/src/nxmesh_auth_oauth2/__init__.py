"""OAuth2 / OpenID Connect authentication for the NxMesh master API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nxmesh_auth_oauth2.settings import OAuth2Settings

if TYPE_CHECKING:
    from nxmesh_auth_oauth2.authenticator import JwksCache, OAuth2Authenticator

__all__ = ["JwksCache", "OAuth2Authenticator", "OAuth2Settings"]


def __getattr__(name: str) -> Any:
    # The authenticator brings httpx and PyJWT: loaded when the master needs it only.
    if name in ("JwksCache", "OAuth2Authenticator"):
        from nxmesh_auth_oauth2 import authenticator

        return getattr(authenticator, name)
    raise AttributeError(name)
