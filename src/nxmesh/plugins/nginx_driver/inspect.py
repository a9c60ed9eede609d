"""What the driver learns from a rendered tree: the local status endpoint and the error log.

The renderer's status server (``conf.d/status.conf``) listens on loopback and answers
``/nxmesh/version`` with the configuration's digest; that answer, coming from a worker of
the *new* generation, is the driver's proof that the reload took. Reading the endpoint
from the tree itself (rather than from a setting) keeps the driver correct for any
renderer or template override that keeps such a block, and lets it fall back to worker
pids alone for one that does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import crossplane

__all__ = ["VERSION_PATH", "StatusEndpoint", "error_logs", "status_endpoint"]

VERSION_PATH = "/nxmesh/version"
STUB_STATUS_PATH = "/nginx_status"


@attrs.frozen
class StatusEndpoint:
    """Where the new generation can be asked what it serves, and what it should answer."""

    host: str
    port: int
    expected: str | None
    version_path: str = VERSION_PATH
    stub_status_path: str | None = None


def _walk(block: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for directive in block:
        yield directive
        yield from _walk(directive.get("block") or [])


def _parse(path: Path) -> list[dict[str, Any]]:
    payload = crossplane.parse(
        str(path), single=True, catch_errors=True, check_ctx=False, check_args=False
    )
    parsed: list[dict[str, Any]] = payload["config"][0]["parsed"] if payload["config"] else []
    return parsed


def _listen(args: list[str]) -> tuple[str, int] | None:
    if not args:
        return None
    addr = args[0]
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", addr
    if not port.isdigit():
        return None
    host = host.strip("[]") or "127.0.0.1"
    if host in ("*", "0.0.0.0"):  # noqa: S104 - a listen address, not a bind of ours
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def status_endpoint(tree: Path, files: Mapping[str, bytes]) -> StatusEndpoint | None:
    """The status server declared in the tree, found in the file mentioning `VERSION_PATH`."""
    for rel, data in files.items():
        if VERSION_PATH.encode() not in data or not rel.endswith(".conf"):
            continue
        for directive in _walk(_parse(tree / rel)):
            if directive["directive"] != "server":
                continue
            server = directive.get("block") or []
            listen = next((_listen(d["args"]) for d in server if d["directive"] == "listen"), None)
            found = _version_location(server)
            if listen is None or found is None:
                continue
            return StatusEndpoint(
                host=listen[0],
                port=listen[1],
                expected=found,
                stub_status_path=_stub_status_location(server),
            )
    return None


def _location_path(directive: dict[str, Any]) -> str | None:
    if directive["directive"] != "location" or not directive["args"]:
        return None
    args: list[str] = directive["args"]
    return args[-1] if args[0] in ("=", "^~") or len(args) == 1 else None


def _version_location(server: list[dict[str, Any]]) -> str | None:
    for directive in server:
        if _location_path(directive) != VERSION_PATH:
            continue
        for inner in directive.get("block") or []:
            if inner["directive"] == "return" and len(inner["args"]) >= 2:
                return str(inner["args"][1]).strip()
        return ""  # declared, answer not literal: compare by pid change only
    return None


def _stub_status_location(server: list[dict[str, Any]]) -> str | None:
    for directive in server:
        path = _location_path(directive)
        if path and any(d["directive"] == "stub_status" for d in directive.get("block") or []):
            return path
    return None


def error_logs(tree: Path, prefix: Path) -> list[Path]:
    """Files named by main-context ``error_log`` directives of ``nginx.conf``.

    Relative paths are resolved against nginx's prefix (``-p``), as nginx does;
    ``stderr`` and ``syslog:`` targets are skipped (nothing to tail).
    """
    conf = tree / "nginx.conf"
    if not conf.is_file():
        return []
    logs: list[Path] = []
    for directive in _parse(conf):
        if directive["directive"] != "error_log" or not directive["args"]:
            continue
        target = directive["args"][0]
        if target == "stderr" or target.startswith(("syslog:", "memory:")):
            continue
        path = Path(target)
        logs.append(path if path.is_absolute() else prefix / path)
    return logs
