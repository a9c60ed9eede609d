"""``host:port`` as URLs and logs write it: IPv6 addresses in brackets (``[::1]:8470``)."""

from __future__ import annotations

__all__ = ["host_port"]


def host_port(host: str, port: int) -> str:
    """``127.0.0.1:8470``, ``[::1]:8470``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
