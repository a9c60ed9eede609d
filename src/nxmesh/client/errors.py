"""What can go wrong talking to a master, each kind with the CLI exit status it maps to.

The master answers every error as RFC 9457 ``application/problem+json``; `from_problem`
turns one into the matching `ApiError` subclass, keeping the request id (to find the
request in the master's log) and, for validation failures, one `FieldError` per field.
``str()`` of an error is the message a user should read: the detail, then each field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

import attrs

from nxmesh.core.errors import NxMeshError

__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "ApiError",
    "AuthError",
    "ClientError",
    "ConflictError",
    "FieldError",
    "InvalidError",
    "NotFoundError",
    "ServerError",
    "UnreachableError",
    "from_problem",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""Invalid input, a failed rollout, a server-side error."""
EXIT_USAGE: Final = 2
"""Bad command line (click's own status), an invalid profile name or an unusable
credentials file."""
EXIT_AUTH: Final = 3
"""Not authenticated, forbidden, or locked out."""
EXIT_NOT_FOUND: Final = 4
"""The object does not exist, or a conflict (name taken, outdated version)."""
EXIT_UNREACHABLE: Final = 5
"""The master could not be reached, or its storage is unavailable."""


class ClientError(NxMeshError):
    """Base of every error of the API client; `exit_code` is what ``nxmesh`` exits with."""

    exit_code: ClassVar[int] = EXIT_FAILED


class UnreachableError(ClientError):
    """No answer: connection refused, DNS failure, timeout, TLS failure, 503."""

    exit_code = EXIT_UNREACHABLE


@attrs.frozen
class FieldError:
    """One invalid field: its path in the request body (``sites[0].name``) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


class ApiError(ClientError):
    """The master answered with an error status."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str = "",
        problem_type: str = "",
        request_id: str | None = None,
        errors: tuple[FieldError, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.title = title
        self.type = problem_type
        self.request_id = request_id
        self.errors = errors
        self.retry_after = retry_after
        super().__init__(self._message())

    def _message(self) -> str:
        text = self.detail or self.title or f"HTTP {self.status}"
        for error in self.errors:
            text += f"\n  {error}"
        return text

    def as_dict(self) -> dict[str, Any]:
        """The error as ``--json`` output shows it."""
        return {
            "status": self.status,
            "type": self.type,
            "title": self.title,
            "detail": self.detail,
            "request_id": self.request_id,
            "errors": [{"path": e.path, "message": e.message} for e in self.errors],
        }


class AuthError(ApiError):
    """401 (not or no longer logged in), 403 (missing permission), 429 (locked out)."""

    exit_code = EXIT_AUTH


class NotFoundError(ApiError):
    """404: no such object (or one the caller may not see)."""

    exit_code = EXIT_NOT_FOUND


class ConflictError(ApiError):
    """409: the name exists, the object is in use, or the base version is outdated."""

    exit_code = EXIT_NOT_FOUND


class InvalidError(ApiError):
    """400/422: the request was refused as invalid; `errors` names each field."""

    exit_code = EXIT_FAILED


class ServerError(ApiError):
    """5xx other than 503: a bug on the master (its log has the request id)."""

    exit_code = EXIT_FAILED


class UnavailableError(ApiError, UnreachableError):
    """503: the master runs but its storage does not answer."""

    exit_code = EXIT_UNREACHABLE


def _field_errors(value: object) -> tuple[FieldError, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        FieldError(str(item.get("path", "")), str(item.get("message", "")))
        for item in value
        if isinstance(item, Mapping)
    )


def from_problem(status: int, body: object, *, retry_after: float | None = None) -> ApiError:
    """The `ApiError` for an error response with `status` and (problem+json) `body`."""
    doc: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    cls: type[ApiError]
    if status in (401, 403, 429):
        cls = AuthError
    elif status == 404:
        cls = NotFoundError
    elif status == 409:
        cls = ConflictError
    elif status == 503:
        cls = UnavailableError
    elif status >= 500:
        cls = ServerError
    else:
        cls = InvalidError
    detail = str(doc.get("detail") or "")
    if status == 429 and retry_after is not None and "again in" not in detail:
        detail = f"{detail} (retry in {retry_after:.0f} s)".strip()  # the master said when
    return cls(
        status,
        detail,
        title=str(doc.get("title") or ""),
        problem_type=str(doc.get("type") or ""),
        request_id=doc.get("request_id") if isinstance(doc.get("request_id"), str) else None,
        errors=_field_errors(doc.get("errors")),
        retry_after=retry_after,
    )
