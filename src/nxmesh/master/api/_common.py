"""Shared pieces of the API controllers: typed path/query parameters and small helpers."""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated, Any, Final

from litestar.openapi import ResponseSpec
from litestar.openapi.spec import SecurityRequirement
from litestar.params import Parameter

from nxmesh.core import validation as v
from nxmesh.core.errors import Problem, ValidationError
from nxmesh.master.api.schemas import ChangeResult, FieldProblem, VersionSummary
from nxmesh.master.changes import CommitResult
from nxmesh.master.problems import PROBLEM_MEDIA_TYPE, ProblemDocument

__all__ = [
    "AGENT_ID_PATTERN",
    "BEARER",
    "ERRORS",
    "LOGIN_ERRORS",
    "MAX_NUMBER",
    "PUBLIC_ERRORS",
    "AgentId",
    "CommitMessage",
    "ExpectedVersion",
    "Name",
    "VersionNumber",
    "Workspace",
    "change_result",
    "commit_message",
    "perm",
]

MAX_NUMBER: Final = 2**63 - 1
BEARER: Final[Sequence[SecurityRequirement]] = ({"bearer": []},)
"""OpenAPI security requirement of every route that needs a token (public ones have none)."""


def _problems(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses documenting problem+json errors (generated from `ProblemDocument`)."""
    return {
        code: ResponseSpec(
            data_container=ProblemDocument,
            description=f"{HTTPStatus(code).phrase} (RFC 9457 problem details)",
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        )
        for code in codes
    }


ERRORS: Final = _problems(400, 401, 403, 404, 409, 422)
PUBLIC_ERRORS: Final = _problems(400, 422)
LOGIN_ERRORS: Final = _problems(400, 401, 422, 429)
# `(?!\n)` because msgspec matches with `re.search`, whose `$` also matches before a final
# newline (`default\n` got past the pattern and failed later as a 500). A lookahead, not
# `\Z`: the patterns are published in the OpenAPI schema, read as ECMA-262 regexes.
WORKSPACE_PATTERN: Final = r"^[a-z][a-z0-9_-]{0,62}(?!\n)$"
NAME_PATTERN: Final = r"^[a-z][a-z0-9_-]{0,62}(?!\n)$"

Workspace = Annotated[
    str, Parameter(pattern=WORKSPACE_PATTERN, max_length=63, description="Workspace name.")
]
Name = Annotated[str, Parameter(pattern=NAME_PATTERN, max_length=63, description="Object name.")]
AGENT_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}(?!\n)$"
AgentId = Annotated[
    str, Parameter(pattern=AGENT_ID_PATTERN, max_length=128, description="Agent id.")
]
VersionNumber = Annotated[int, Parameter(ge=1, le=MAX_NUMBER, description="Version number.")]
CommitMessage = Annotated[
    str | None,
    Parameter(max_length=1024, description="Message recorded with the new version."),
]
ExpectedVersion = Annotated[
    int | None,
    Parameter(
        ge=0,
        le=MAX_NUMBER,
        description="Fail with 409 unless the latest version is this one (0: none yet).",
    ),
]


def perm(permission: str, **extra: Any) -> dict[str, Any]:
    """Route ``opt`` declaring the permission the guard checks."""
    return {"permission": permission, **extra}


def commit_message(message: str | None, default: str) -> str:
    """The version message: `message` when given (checked as new text), else `default`."""
    if message is None:
        return default
    reason = v.new_text_reason(message)
    if reason is not None:
        raise ValidationError([Problem("query.message", reason)])
    return message


def change_result(result: CommitResult) -> ChangeResult:
    return ChangeResult(
        version=VersionSummary.of(result.version),
        created=result.created,
        warnings=tuple(
            FieldProblem(path=p.path, message=p.message, severity=p.severity)
            for p in result.warnings
        ),
    )
