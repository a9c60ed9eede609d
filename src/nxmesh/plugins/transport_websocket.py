"""Built-in WebSocket transport plugin (``ws://``, ``wss://``): the agent's gRPC fallback.

The transport itself lives in `nxmesh.websocket` (frames, handshake, anyio streams, the
asyncio path, `WebSocketTransport`); this entry-point module stays free of wsproto and
h11, since every process (every agent) imports it at start-up. The public names are
re-exported lazily, and the class is imported only when the transport registry is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh import websocket as _websocket
from nxmesh.core.lazy import lazy_exports

if TYPE_CHECKING:
    from nxmesh.websocket import (
        DEFAULT_MAX_MESSAGE,
        DEFAULT_PATH,
        SUBPROTOCOL,
        WebSocketChannel,
        WebSocketTransport,
        serve_websocket,
    )

# The package `nxmesh.websocket` (cheap: its own exports are lazy) lists the public names
# and says which module defines each; they are imported on first use.
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_websocket.__all__, "nxmesh.websocket"))
__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_PATH",
    "SUBPROTOCOL",
    "WebSocketChannel",
    "WebSocketTransport",
    "nxmesh_register_transports",
    "serve_websocket",
]


@hookimpl(trylast=True)
def nxmesh_register_transports() -> Sequence[type[WebSocketTransport]]:
    from nxmesh.websocket.transport import WebSocketTransport

    return [WebSocketTransport]
