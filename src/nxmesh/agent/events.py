"""What happened on this agent: applies, drift, nginx deaths and restarts.

Every notable thing the agent does is recorded once here as an `nxmesh.Event` (the same
type the master's event bus carries), logged, kept in a bounded in-memory history for
``nxmesh agent`` status output and tests, and handed to listeners (the metrics, the
master link when one is connected).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from nxmesh.core.events import Event

__all__ = ["EventRecorder", "Listener"]

log = structlog.get_logger("nxmesh.agent")

Listener = Callable[[Event], None]


class EventRecorder:
    """Record agent events: log them, keep the last `history` and notify listeners."""

    def __init__(self, *, history: int = 1000, workspace: str = "default") -> None:
        self._events: deque[Event] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self.workspace = workspace

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def record(self, kind: str, **payload: Any) -> Event:
        """Record an event of `kind` (dotted: ``drift.detected``); returns it."""
        event = Event(kind=kind, payload=payload, workspace=self.workspace)
        self._events.append(event)
        level = "warning" if kind.split(".")[-1] in _WARN else "info"
        getattr(log, level)(kind, **{k: v for k, v in payload.items() if k != "diff"})
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the agent
                log.exception("event listener failed", kind=kind)
        return event

    def events(self, kind: str | None = None) -> list[Event]:
        """Recorded events, oldest first; only those of `kind` (or its prefix) when given."""
        return [e for e in self._events if kind is None or _matches(e.kind, kind)]

    def kinds(self) -> list[str]:
        return [e.kind for e in self._events]

    def extend(self, events: Iterable[Event]) -> None:
        self._events.extend(events)


_WARN = frozenset(
    {"failed", "rolled_back", "detected", "died", "open", "refused", "vetoed", "warnings"}
)


def _matches(kind: str, wanted: str) -> bool:
    return kind == wanted or kind.startswith(wanted + ".")
