"""OAuth2 / OpenID Connect authentication for the NxMesh master API."""

from nxmesh_auth_oauth2.settings import OAuth2Settings

__all__ = ["OAuth2Settings"]
