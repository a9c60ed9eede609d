"""A minimal HTTP/1.1 client for loopback probes, written on anyio sockets.

The agent polls nginx's local status server (``/nxmesh/version``, ``/nginx_status``)
many times per apply; an HTTP library would be one more dependency and one more event
loop assumption, while these requests are tiny, local and always ``Connection: close``.
Health probes of HTTPS sites speak TLS with the site's name as SNI (`tls`).
"""

from __future__ import annotations

import ssl

import anyio
import anyio.abc
import attrs
from anyio.streams.tls import TLSStream

__all__ = ["HttpResponse", "http_get"]

_MAX_BODY = 1 << 20


@attrs.frozen
class HttpResponse:
    """Status code, lower-cased headers and body of one response."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


async def http_get(
    host: str,
    port: int,
    path: str = "/",
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 - a probe without a bound is a bug
    host_header: str | None = None,
    tls: ssl.SSLContext | None = None,
    proxy_protocol: bool = False,
) -> HttpResponse:
    """GET ``http://host:port/path`` (``https://`` with `tls`, checking the certificate
    against `host_header`, or `host`, as the context says); raises ``OSError`` (a TLS
    failure is an ``ssl.SSLError``, one) or ``TimeoutError`` on failure.

    `proxy_protocol`: open the connection with a PROXY protocol v1 line naming this
    connection's own ends, as a load balancer would, for a listener that expects one
    (before the TLS handshake). The body is read until the server closes (``Connection:
    close``), capped at 1 MiB.
    """
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header or host}\r\n"
        "User-Agent: nxmesh-agent\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    with anyio.fail_after(timeout):
        tcp = await anyio.connect_tcp(host, port)
        stream: anyio.abc.ByteStream = tcp
        try:
            if proxy_protocol:
                await tcp.send(_proxy_line(tcp))
            if tls is not None:
                # Not "standard compatible": the body ends when the server closes,
                # whether or not it sent TLS's close_notify first.
                stream = await TLSStream.wrap(
                    tcp,
                    hostname=host_header or host,
                    ssl_context=tls,
                    standard_compatible=False,
                )
        except BaseException:
            await tcp.aclose()
            raise
        async with stream:
            await stream.send(request)
            chunks: list[bytes] = []
            size = 0
            while size <= _MAX_BODY:
                try:
                    chunk = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                chunks.append(chunk)
                size += len(chunk)
    return _parse(b"".join(chunks))


def _proxy_line(tcp: anyio.abc.SocketStream) -> bytes:
    """``PROXY TCP4|TCP6 <source> <destination> <sport> <dport>``: this connection's ends."""
    local = tcp.extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610 - anyio's
    remote = tcp.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610
    family = "TCP6" if ":" in str(local[0]) else "TCP4"
    return f"PROXY {family} {local[0]} {remote[0]} {local[1]} {remote[1]}\r\n".encode("ascii")


def _parse(raw: bytes) -> HttpResponse:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise OSError("malformed HTTP response: no header terminator")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise OSError(f"malformed HTTP status line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers and headers["content-length"].isdigit():
        body = body[: int(headers["content-length"])]
    return HttpResponse(status=int(parts[1]), headers=headers, body=body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";", 1)[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)
