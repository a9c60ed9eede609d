"""Where and how agents reach the master's WebSocket: the path and the subprotocol.

Kept apart from `handshake` (wsproto) so the master's API and the transport class can
name them without loading the WebSocket implementation.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_PATH", "SUBPROTOCOL"]

SUBPROTOCOL: Final = "nxmesh.v1"
DEFAULT_PATH: Final = "/agent"
