"""`WebSocketTransport`: the master listens (`serve`), the agent connects (`connect`).

On asyncio both use asyncio's own transports (`nxmesh.websocket.asyncio_channel`); on
trio anyio byte streams (`nxmesh.websocket.streams`). Those modules and the upgrade
(`nxmesh.websocket.handshake`, wsproto) are imported on the first `serve` or `connect`:
the transport registry builds this class in every agent, and an agent that reaches its
master over gRPC never needs them (~2.5 MB).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import urlsplit

import anyio
import structlog
from anyio.abc import ByteStream, SocketAttribute, TaskStatus
from anyio.streams.tls import TLSListener

from nxmesh.core.interfaces import Channel, SessionHandler
from nxmesh.netaddr import host_port
from nxmesh.websocket.endpoint import DEFAULT_PATH
from nxmesh.websocket.frames import DEFAULT_MAX_MESSAGE

if TYPE_CHECKING:
    from nxmesh.websocket.asyncio_channel import _AsyncioWebSocket

__all__ = ["WebSocketTransport"]

log = structlog.get_logger("nxmesh.transport.websocket")

_BACKLOG: Final = 65536  # anyio's default; the kernel caps it at somaxconn


class _QuietTLSListener(TLSListener):
    """Logs a failed TLS handshake (a client that does not trust our CA...) as one line."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: Any) -> None:
        await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception):
            raise exc
        log.warning("TLS handshake failed", error=str(exc) or type(exc).__name__)


class WebSocketTransport:
    """WebSocket transport; one instance serves (master) or connects (agent).

    Serving: ``WebSocketTransport("wss://0.0.0.0:8443/agent", ssl_context=server_ctx)``
    listens there (port 0 binds a free port; `serve` reports ``host:port``).
    Connecting: ``WebSocketTransport(ssl_context=client_ctx).connect("wss://master:8443/agent")``
    where `client_ctx` pins the master's CA (`nxmesh.tls.client_ssl_context`).
    """

    name: ClassVar[str] = "websocket"
    schemes: ClassVar[tuple[str, ...]] = ("ws", "wss")

    def __init__(
        self,
        url: str = "ws://127.0.0.1:0/agent",
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in self.schemes:
            raise ValueError(f"not a WebSocket URL: {url!r}")
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 0
        self.path = parts.path or DEFAULT_PATH
        self.tls = parts.scheme == "wss"
        self.ssl_context = ssl_context
        self.max_message_bytes = max_message_bytes
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout

    # -- master side ---------------------------------------------------------------------

    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `url` and run `handler` for every upgraded connection."""
        if self.tls and self.ssl_context is None:
            raise ValueError("a wss:// listener needs an ssl_context (see nxmesh.tls)")
        if not self.tls and self.ssl_context is not None:
            raise ValueError("use a wss:// URL with an ssl_context")
        if _on_asyncio():
            await self._serve_asyncio(handler, task_status)
            return
        from nxmesh.websocket.handshake import _CONNECTION_ERRORS
        from nxmesh.websocket.streams import serve_websocket

        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        address = host_port(self.host, port)

        async def on_connection(stream: ByteStream) -> None:
            peer = _peer_of(stream)
            try:
                await serve_websocket(
                    stream,
                    handler,
                    peer=peer,
                    path=self.path,
                    max_message_bytes=self.max_message_bytes,
                    handshake_timeout=self.handshake_timeout,
                )
            except (*_CONNECTION_ERRORS, TimeoutError) as exc:
                log.debug("websocket connection ended", peer=peer, error=repr(exc))
            except Exception:
                # One agent's failure must not stop the listener serving the others.
                log.exception("websocket session failed", peer=peer)

        served: Any = listener
        if self.ssl_context is not None:
            served = _QuietTLSListener(
                listener,
                self.ssl_context,
                standard_compatible=False,
                handshake_timeout=self.handshake_timeout,
            )
        async with served:
            log.info("websocket transport listening", address=address, tls=self.tls)
            task_status.started(address)
            await served.serve(on_connection)

    async def _serve_asyncio(self, handler: SessionHandler, task_status: TaskStatus[str]) -> None:
        """`serve` on asyncio's own transports (see `_AsyncioWebSocket`)."""
        from nxmesh.websocket.asyncio_channel import _AsyncioWebSocket

        loop = asyncio.get_running_loop()
        accepted: asyncio.Queue[_AsyncioWebSocket] = asyncio.Queue()

        def accept() -> _AsyncioWebSocket:
            return _AsyncioWebSocket(self.ssl_context, server_side=True, on_made=accepted)

        server = await loop.create_server(accept, self.host, self.port, backlog=_BACKLOG)
        port = int(server.sockets[0].getsockname()[1])
        if self.port == 0 and len(server.sockets) > 1:
            # Port 0 on several addresses (localhost: ::1 and 127.0.0.1) gave each its own
            # port; listen on the first one's everywhere, as anyio's listener does.
            server.close()
            server = await loop.create_server(accept, self.host, port, backlog=_BACKLOG)
        address = host_port(self.host, port)
        try:
            async with anyio.create_task_group() as tg:
                log.info("websocket transport listening", address=address, tls=self.tls)
                task_status.started(address)
                while True:
                    tg.start_soon(self._session_asyncio, handler, await accepted.get())
        finally:
            server.close()
            while not accepted.empty():
                accepted.get_nowait().abort()

    async def _session_asyncio(self, handler: SessionHandler, conn: _AsyncioWebSocket) -> None:
        from nxmesh.websocket.handshake import _CONNECTION_ERRORS, _accept_upgrade

        peer = conn.peer
        try:
            with anyio.fail_after(self.handshake_timeout):
                try:
                    await conn.handshake_tls()
                except ssl.SSLError as exc:
                    log.warning("TLS handshake failed", error=str(exc) or type(exc).__name__)
                    return
                if not await _accept_upgrade(conn, path=self.path):
                    return
            conn.start_frames(client=False, max_message_bytes=self.max_message_bytes)
            try:
                await handler(conn, peer)
            finally:
                await conn.aclose()
        except asyncio.CancelledError:
            # Cancelled with the server: drop the connection now. A graceful TLS close
            # needs an event loop that may be ending; left half-closed, the transport is
            # collected later with an "unclosed transport" ResourceWarning.
            conn.abort()
            raise
        except (*_CONNECTION_ERRORS, TimeoutError) as exc:
            log.debug("websocket connection ended", peer=peer, error=repr(exc))
        except Exception:
            # One agent's failure must not stop the listener serving the others.
            log.exception("websocket session failed", peer=peer)
        finally:
            conn.close()

    # -- agent side ----------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, url: str) -> AsyncIterator[Channel]:
        """Connect and upgrade; every failure to do so is an `OSError`."""
        parts = urlsplit(url)
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueError(f"not a WebSocket URL: {url!r}")
        tls = parts.scheme == "wss"
        if tls and self.ssl_context is None:
            raise ValueError("a wss:// URL needs an ssl_context pinning the master's CA")
        host = parts.hostname
        port = parts.port or (443 if tls else 80)
        target = (parts.path or DEFAULT_PATH) + (f"?{parts.query}" if parts.query else "")
        channel = await self._open(host, port, target, tls)
        try:
            yield channel
        finally:
            await channel.aclose()

    async def _open(self, host: str, port: int, target: str, tls: bool) -> Channel:
        from nxmesh.websocket.handshake import _request_upgrade
        from nxmesh.websocket.streams import WebSocketChannel, _StreamIO

        ctx = self.ssl_context if tls else None
        address = host_port(host, port)
        if _on_asyncio():
            return await self._open_asyncio(host, port, address, target, ctx)
        with anyio.fail_after(self.connect_timeout):
            if ctx is not None:
                stream: ByteStream = await anyio.connect_tcp(
                    host, port, ssl_context=ctx, tls_standard_compatible=False
                )
            else:
                stream = await anyio.connect_tcp(host, port)
            io = _StreamIO(stream)
            try:
                await _request_upgrade(io, address, target)
            except BaseException as exc:
                await anyio.aclose_forcefully(stream)
                if isinstance(exc, anyio.BrokenResourceError):
                    raise ConnectionResetError("the master closed the connection") from exc
                raise
        # `io.buffer` keeps frames the master sent right behind its answer.
        return WebSocketChannel(
            stream, client=True, buffered=bytes(io.buffer), max_message_bytes=self.max_message_bytes
        )

    async def _open_asyncio(
        self, host: str, port: int, address: str, target: str, ctx: ssl.SSLContext | None
    ) -> Channel:
        from nxmesh.websocket.asyncio_channel import _AsyncioWebSocket
        from nxmesh.websocket.handshake import _request_upgrade

        loop = asyncio.get_running_loop()
        conn = _AsyncioWebSocket(ctx, server_hostname=host)
        try:
            with anyio.fail_after(self.connect_timeout):
                await loop.create_connection(lambda: conn, host, port)
                await conn.handshake_tls()
                await _request_upgrade(conn, address, target)
        except BaseException:
            conn.abort()
            raise
        conn.start_frames(client=True, max_message_bytes=self.max_message_bytes)
        return conn


def _on_asyncio() -> bool:
    """Whether this runs on asyncio (trio takes the anyio stream path)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _peer_of(stream: ByteStream) -> str:
    try:
        addr = stream.extra(SocketAttribute.remote_address)  # noqa: S610
    except anyio.TypedAttributeLookupError:
        return "unknown"
    if isinstance(addr, tuple):
        return host_port(str(addr[0]), int(addr[1]))
    return str(addr)
