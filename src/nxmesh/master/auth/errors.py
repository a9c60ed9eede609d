"""Errors of authentication and authorisation, each mapped to one HTTP status.

`AuthenticationError` is 401 (who are you?), `LockedOutError` 429 (slow down),
`PermissionDeniedError` 403 (you may not). Messages are safe to show to the caller: they
never contain a credential, and a failed login never says whether the user exists.
"""

from __future__ import annotations

from nxmesh.core.errors import NxMeshError

__all__ = ["AuthenticationError", "LockedOutError", "PermissionDeniedError"]


class AuthenticationError(NxMeshError):
    """Credentials were presented and are wrong, expired or revoked (HTTP 401).

    `reason` is a short machine-readable tag (``expired``, ``bad_signature``...) used for
    the ``nxmesh_master_auth_failures_total`` metric and the audit log.
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class LockedOutError(AuthenticationError):
    """Too many failed logins for this user from this address (HTTP 429)."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, int(retry_after + 0.999))
        super().__init__(
            f"too many failed logins; try again in {self.retry_after} s", reason="locked_out"
        )


class PermissionDeniedError(NxMeshError):
    """The caller is authenticated but lacks a permission (HTTP 403)."""

    def __init__(
        self, permission: str, workspace: str | None = None, *, detail: str | None = None
    ) -> None:
        self.permission = permission
        self.workspace = workspace
        where = f" in workspace {workspace!r}" if workspace else ""
        super().__init__(detail or f"permission {permission!r} is required{where}")

    @classmethod
    def to_manage(cls, username: str) -> PermissionDeniedError:
        """Refusal to change or delete a user who holds permissions the caller lacks."""
        return cls(
            "user:write",
            detail=f"user {username!r} holds permissions you do not; only a caller "
            "holding all of them may change or delete this user",
        )
