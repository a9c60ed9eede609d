"""The audit log: who did what to which resource, when and from where.

Every mutating API endpoint records one `AuditEntry` after it succeeded (and logins,
failed ones included). Entries go to storage (append-only) and onto the event bus as
``audit.recorded``, so the events WebSocket streams them to callers with ``audit:read``.

Details never carry secrets: keys that look secret (``password``, ``token``...) are
dropped before the entry is built, whatever a handler passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from nxmesh.core.events import Event
from nxmesh.core.interfaces import EventBus, StorageBackend
from nxmesh.core.logging import is_secret_key
from nxmesh.core.records import AuditEntry

__all__ = ["Auditor", "scrub"]

log = structlog.get_logger("nxmesh.master.audit")


def scrub(details: Mapping[str, Any]) -> dict[str, Any]:
    """`details` without secret-looking keys, recursively, as plain JSON-ready data."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        if is_secret_key(str(key)):
            continue
        if isinstance(value, Mapping):
            out[str(key)] = scrub(value)
        elif isinstance(value, list | tuple):
            out[str(key)] = [scrub(v) if isinstance(v, Mapping) else v for v in value]
        else:
            out[str(key)] = value
    return out


class Auditor:
    """Appends audit entries and announces them on the event bus."""

    def __init__(self, storage: StorageBackend, bus: EventBus) -> None:
        self.storage = storage
        self.bus = bus

    async def record(
        self,
        *,
        actor: str,
        action: str,
        resource: str = "",
        remote_addr: str | None = None,
        workspace: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """Store one entry and publish it as an ``audit.recorded`` event."""
        clean = scrub(details or {})
        if workspace is not None:
            clean.setdefault("workspace", workspace)
        entry = AuditEntry(
            actor=actor,
            action=action,
            resource=resource,
            remote_addr=remote_addr,
            details=clean,
        )
        await self.storage.append_audit(entry)
        log.info("audit", actor=actor, action=action, resource=resource, remote_addr=remote_addr)
        await self.bus.publish(
            Event(
                "audit.recorded",
                payload={
                    "id": entry.id,
                    "ts": entry.ts,
                    "actor": actor,
                    "action": action,
                    "resource": resource,
                    "remote_addr": remote_addr,
                    "details": clean,
                },
                workspace=workspace or "default",
            )
        )
        return entry
