"""The WebSocket transport (``ws://``, ``wss://``): the agent's fallback when gRPC cannot connect.

Runs on asyncio and trio and works through proxies and load balancers that only speak
HTTP/1.1. One binary WebSocket message carries one protocol frame; the subprotocol is
``nxmesh.v1``; no extension (permessage-deflate) is negotiated: frames are signed binary.

- `frames`: the RFC 6455 frame codec (`_FrameCodec`) and the close codes.
- `endpoint`: the default path and the subprotocol (no import cost).
- `handshake`: the HTTP upgrade (wsproto).
- `streams`: `WebSocketChannel` on any anyio byte stream, and `serve_websocket`, which
  runs a session on a stream another server accepted (the master's HTTP server).
- `asyncio_channel`: `_AsyncioWebSocket`, the channel on asyncio's own transports, which
  costs far less per frame; `serve` and `connect` take it on asyncio.
- `transport`: `WebSocketTransport` (`serve` on the master, `connect` on the agent); it
  imports the modules above on first `serve` or `connect`, so an agent that reaches its
  master over gRPC never loads wsproto.

Liveness is the protocol's job (``Heartbeat`` every 30 s, answered by an ``Ack``); the
channel answers WebSocket pings but sends none. Messages larger than `max_message_bytes`
close the connection with code 1009 rather than being buffered.

The plugin's entry point (`nxmesh.plugins.transport_websocket`) re-exports the public
names lazily: importing it does not import wsproto.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh.core.lazy import lazy_exports

# Imported on first use: every process loads the plugin's entry point at start-up.
_EXPORTS = {
    "DEFAULT_MAX_MESSAGE": "nxmesh.websocket.frames",
    "DEFAULT_PATH": "nxmesh.websocket.endpoint",
    "SUBPROTOCOL": "nxmesh.websocket.endpoint",
    "WebSocketChannel": "nxmesh.websocket.streams",
    "WebSocketTransport": "nxmesh.websocket.transport",
    "serve_websocket": "nxmesh.websocket.streams",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from nxmesh.websocket.endpoint import DEFAULT_PATH, SUBPROTOCOL
    from nxmesh.websocket.frames import DEFAULT_MAX_MESSAGE
    from nxmesh.websocket.streams import WebSocketChannel, serve_websocket
    from nxmesh.websocket.transport import WebSocketTransport

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_PATH",
    "SUBPROTOCOL",
    "WebSocketChannel",
    "WebSocketTransport",
    "serve_websocket",
]
