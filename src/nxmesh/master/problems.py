"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

A problem has ``type`` (a URN naming the kind of problem), ``title``, ``status``,
``detail`` and ``instance`` (the request path), plus two extension members:
``request_id`` (also in the ``X-Request-ID`` header and every log line of the request)
and, for input that failed validation (HTTP 422), ``errors``: one ``{path, message}``
per problem, where ``path`` names the field (``sites[0].server_names[1]``, ``query.limit``).

Unexpected exceptions become a 500 whose detail says nothing about the internals; the
traceback goes to the log under the same request id. A storage failure — a `StorageError`
or the database driver losing its connection (PostgreSQL down, restarting, failing over) —
is a 503 ``storage-unavailable`` with ``Retry-After``. Every storage operation is one
transaction, so the write that failed left nothing half-applied.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from nxmesh.config.versions import VersionError
from nxmesh.core.errors import NxMeshError, ValidationError
from nxmesh.core.records import ConflictError, NotFoundError, StorageError
from nxmesh.master.auth.errors import AuthenticationError, LockedOutError, PermissionDeniedError
from nxmesh.master.request_ids import REQUEST_ID_HEADER, unrouted_request_id

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "ApiProblem",
    "Conflict",
    "FieldError",
    "NotFound",
    "ProblemDocument",
    "exception_handlers",
    "problem_response",
]

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
_URN: Final = "urn:nxmesh:problem:"
STORAGE_RETRY_AFTER: Final = 5
"""Seconds a client is asked to wait after a 503 ``storage-unavailable``."""

log = structlog.get_logger("nxmesh.master.api")


@attrs.frozen
class FieldError:
    """One invalid input field: where (a path in the request) and why."""

    path: str
    message: str


@attrs.frozen(kw_only=True)
class ProblemDocument:
    """The body of every error response (RFC 9457 plus ``request_id`` and ``errors``)."""

    type: str
    title: str
    status: int
    detail: str = ""
    instance: str | None = None
    request_id: str | None = None
    errors: tuple[FieldError, ...] = ()


class ApiProblem(NxMeshError):
    """An error a handler raises on purpose, rendered as a problem of its status."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class NotFound(ApiProblem):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ApiProblem):
    status, slug, title = 409, "conflict", "Conflict"


class BadRequest(ApiProblem):
    status, slug, title = 400, "bad-request", "Bad request"


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    slug: str,
    title: str,
    detail: str = "",
    *,
    errors: Sequence[FieldError] = (),
    headers: Mapping[str, str] | None = None,
) -> Response[Any]:
    """A problem+json response for `request`."""
    body: dict[str, Any] = {
        "type": f"{_URN}{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    headers = dict(headers or {})
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id is None:  # no route took the request: `request_context` never ran
        request_id = unrouted_request_id(request.scope, status)
        headers[REQUEST_ID_HEADER] = request_id
    body["request_id"] = request_id
    if errors:
        body["errors"] = [{"path": e.path, "message": e.message} for e in errors]
    return Response(
        content=json.dumps(body).encode("utf-8"),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _validation(request: Request[Any, Any, Any], exc: ValidationError) -> Response[Any]:
    errors = [FieldError(p.path or "<root>", p.message) for p in exc.problems]
    noun = "field is" if len(errors) == 1 else "fields are"
    return problem_response(
        request, 422, "validation", "Validation failed", f"{len(errors)} {noun} invalid",
        errors=errors,
    )  # fmt: skip


_PARAM_FORMS: Final = {
    "workspace": "a workspace name (a lowercase letter, then up to 62 lowercase letters, "
    "digits, '-' or '_')",
    "name": "a name (a lowercase letter, then up to 62 lowercase letters, digits, '-' or '_')",
    "agent_id": "an agent id (a letter or digit, then up to 127 letters, digits or ._:+-)",
    "token_id": "a token id (hexadecimal digits)",
}
"""How the path parameters of `nxmesh.master.api._common` (and token ids) are written,
for their pattern errors."""


_TYPES: Final = {
    "int": "an integer",
    "bool": "true or false",
    "float": "a number",
    "str": "a string",
}
_EXPECTED_TYPE: Final = re.compile(r"Expected `(\w+)`, got `\w+`")
_EXPECTED_BOUND: Final = re.compile(r"Expected `\w+` (>=|<=|>|<) (\S+)")
_BOUNDS: Final = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}
_MISSING: Final = re.compile(r"Missing required (query|header|cookie) parameter '([\w-]+)'")


def _parameter_message(message: str, key: object, value: str | None) -> str:
    """Litestar's (msgspec's) words for a parameter it could not parse, as this API says
    them elsewhere: what the value must be, and what was sent."""
    got = f", got {value[:60]!r}" if value is not None else ""
    if message.startswith("Expected `str` matching regex") and key in _PARAM_FORMS:
        return f"is not {_PARAM_FORMS[str(key)]}"  # the regex says it less well
    if (found := _EXPECTED_TYPE.fullmatch(message)) and found[1] in _TYPES:
        return f"must be {_TYPES[found[1]]}{got}"
    if found := _EXPECTED_BOUND.fullmatch(message):
        return f"must be {_BOUNDS[found[1]]} {found[2]}{got}"
    return message


def _litestar_validation(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[Any]:
    # Path, query and header parameters Litestar itself parsed.
    errors: list[FieldError] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, Mapping):
            source, key = item.get("source"), item.get("key")
            # `source` is Litestar's ParamType enum: its value ("query"), not its repr.
            source = getattr(source, "value", source)
            path = ".".join(str(p) for p in (source, key) if p) or "<root>"
            value = request.query_params.get(str(key)) if source == "query" else None
            message = _parameter_message(str(item.get("message", "is invalid")), key, value)
            errors.append(FieldError(path, message))
    if not extra and (missing := _MISSING.match(str(exc.detail))):
        errors.append(FieldError(f"{missing[1]}.{missing[2]}", "is required"))
    if not errors:
        return problem_response(request, 400, "bad-request", "Bad request", str(exc.detail))
    noun = "field is" if len(errors) == 1 else "fields are"
    return problem_response(
        request, 422, "validation", "Validation failed", f"{len(errors)} {noun} invalid",
        errors=errors,
    )  # fmt: skip


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    slugs = {
        400: "bad-request",
        401: "unauthenticated",
        403: "forbidden",
        404: "not-found",
        405: "method-not-allowed",
        409: "conflict",
        413: "too-large",
        415: "unsupported-media-type",
        429: "too-many-requests",
    }
    status = exc.status_code
    if status >= 500:
        return _internal(request, exc)
    title = _title(status)
    detail = exc.detail if exc.detail and exc.detail != title else ""
    if not detail and status == 404:  # the router's: no route has this path
        detail = f"no route matches {request.url.path!r}; see /docs for the API's paths"
    elif not detail and status == 405:
        detail = f"{request.method} is not allowed on {request.url.path!r}"
    headers = dict(exc.headers or {})
    return problem_response(
        request, status, slugs.get(status, "error"), title, detail, headers=headers
    )


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _problem(request: Request[Any, Any, Any], exc: ApiProblem) -> Response[Any]:
    return problem_response(
        request, exc.status, exc.slug, exc.title, exc.detail, headers=exc.headers
    )


def _unauthenticated(request: Request[Any, Any, Any], exc: AuthenticationError) -> Response[Any]:
    if isinstance(exc, LockedOutError):
        return problem_response(
            request, 429, "locked-out", "Too many failed logins", str(exc),
            headers={"Retry-After": str(exc.retry_after)},
        )  # fmt: skip
    return problem_response(
        request, 401, "unauthenticated", "Authentication required", str(exc),
        headers={"WWW-Authenticate": 'Bearer realm="nxmesh", error="invalid_token"'},
    )  # fmt: skip


def _forbidden(request: Request[Any, Any, Any], exc: PermissionDeniedError) -> Response[Any]:
    return problem_response(request, 403, "forbidden", "Forbidden", str(exc))


def _not_found(request: Request[Any, Any, Any], exc: NotFoundError) -> Response[Any]:
    return problem_response(request, 404, "not-found", "Not found", str(exc))


def _conflict(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return problem_response(request, 409, "conflict", "Conflict", str(exc))


def _connection_lost(exc: BaseException) -> BaseException | None:
    """The driver error in `exc`'s chain saying the database cannot be reached, if any.

    SQLAlchemy is looked up in ``sys.modules`` rather than imported: when it was never
    loaded, no exception can come from it (and importing it here would cost every
    process that loads the master's error handling).
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found: BaseException = current  # (isinstance against a module attribute narrows to Any)
        if sa_exc is not None and (
            isinstance(current, sa_exc.OperationalError | sa_exc.InterfaceError)
            or (isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated)
            # The pool gave up waiting for a connection (all of them stuck reconnecting).
            or isinstance(current, sa_exc.TimeoutError)
        ):
            return found
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    lost = _connection_lost(exc)
    if isinstance(exc, StorageError) or lost is not None:
        cause = lost if lost is not None else exc
        # One line, no traceback: an outage fails every request and would flood the log.
        log.error("storage unavailable", error_type=type(cause).__name__, error=str(cause))
        detail = (
            "storage unavailable: the master cannot reach its database; retry in a few "
            f"seconds (request id {request_id})"
        )
        return problem_response(
            request, 503, "storage-unavailable", "Service unavailable", detail,
            headers={"Retry-After": str(STORAGE_RETRY_AFTER)},
        )  # fmt: skip
    log.error("unhandled error", exc_info=exc)
    detail = f"internal error; see the master log (request id {request_id})"
    return problem_response(request, 500, "internal", "Internal server error", detail)


def exception_handlers() -> ExceptionHandlersMap:
    """The handlers that turn every exception into a problem response."""
    return {
        ValidationError: _validation,
        ValidationException: _litestar_validation,
        HTTPException: _http,
        ApiProblem: _problem,
        AuthenticationError: _unauthenticated,
        PermissionDeniedError: _forbidden,
        NotFoundError: _not_found,
        ConflictError: _conflict,
        VersionError: _conflict,
        Exception: _internal,
    }
