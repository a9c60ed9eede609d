"""Events that travel on the master's event bus and reach `nxmesh_on_event`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Event"]


@attrs.frozen
class Event:
    """Something that happened: ``kind`` (dotted, e.g. ``version.created``) plus data.

    `payload` holds JSON-compatible values only so every bus can carry it.
    """

    kind: str
    payload: Mapping[str, Any] = attrs.field(factory=dict)
    workspace: str = "default"
    id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    ts: float = attrs.field(factory=time.time)
