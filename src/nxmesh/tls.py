"""TLS for the master↔agent transports: a private CA the master creates, agents pin.

On first start the master calls `ensure_tls_material` on its state directory: it creates
an ECDSA P-256 CA (10 years) and a server certificate signed by it (1 year, renewed when
less than 30 days remain or the host names changed), or uses the files an operator
provided. Agents receive ``ca.pem`` out of band (with their bootstrap token) and pin it:
`client_ssl_context` trusts *only* that CA, never the system store, so a certificate from
any public CA is refused.

Private keys are written 0600 (``nxmesh.crypto.private_files.write_private_file``) and,
when a `key_password` is given, encrypted (PKCS#8, best available cipher). Issuing lives in
`nxmesh.tls_issuing`, imported only by `ensure_tls_material`: an agent, which only builds
a client context, does not load ``cryptography.x509`` (~1.2 MB) for it.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "TLSFiles",
    "client_ssl_context",
    "ensure_tls_material",
    "limit_tls_read_buffer",
    "server_ssl_context",
    "serving_context",
]

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca.key"
SERVER_CERT_FILE: Final = "server.pem"
SERVER_KEY_FILE: Final = "server.key"


@attrs.frozen
class TLSFiles:
    """Where the master's TLS material lives."""

    ca_cert: Path
    cert: Path
    key: Path
    key_password: bytes | None = attrs.field(default=None, repr=False)


def ensure_tls_material(
    directory: Path,
    *,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    key_password: bytes | None = None,
    server_days: int = 365,
) -> TLSFiles:
    """Create (once) the CA and (when missing, expiring or renamed) the server certificate.

    Idempotent: a second call with the same host names changes nothing. Returns the paths
    for `server_ssl_context`; agents pin ``files.ca_cert``.
    """
    from nxmesh.tls_issuing import issue_missing

    return issue_missing(
        directory, hostnames=hostnames, key_password=key_password, server_days=server_days
    )


def server_ssl_context(files: TLSFiles, *, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A server context with modern defaults (TLS ≥ 1.2) serving ``files.cert``."""
    return serving_context(files.cert, files.key, password=files.key_password, alpn=alpn)


def serving_context(
    cert: Path | str,
    key: Path | str,
    *,
    password: bytes | None = None,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """A server context with modern defaults (TLS ≥ 1.2) serving `cert` (PEM chain) with
    `key`: the operator's own files, or those of `ensure_tls_material`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key, password=password)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_ssl_context(ca_cert: Path | str, *, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A client context that trusts only `ca_cert` (pinning) and checks the host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_cert))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def limit_tls_read_buffer(size: int) -> int:
    """Cap asyncio's per-connection TLS read buffer at `size` bytes, process-wide.

    asyncio's `SSLProtocol` allocates ``max_size`` (256 KiB) per TLS connection up front;
    a master holding thousands of agent connections (gRPC, or WebSocket on the API
    listener under hypercorn) spends most of its memory there. A master mostly reads
    small frames (acks, heartbeats); a larger TLS record simply takes more than one read.
    Only ever lowers the limit (0 leaves it); returns the one in effect. Trio's TLS does
    not use it.
    """
    import asyncio.sslproto

    import structlog

    proto = asyncio.sslproto.SSLProtocol
    current = int(getattr(proto, "max_size", 0))
    if current and 0 < size < current:
        proto.max_size = size
        structlog.get_logger("nxmesh.tls").info(
            "asyncio TLS read buffer lowered", bytes=size, was=current
        )
        return size
    return current
