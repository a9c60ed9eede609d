"""`nxmesh.testing.nginx.free_port`: the ports handed to fixtures never repeat."""

from __future__ import annotations

import socket

from nxmesh.testing.nginx import free_port


def test_free_port_never_repeats_even_when_the_kernel_would() -> None:
    # Nothing listens on these ports between calls, which is exactly when the kernel may
    # hand the same one out twice.
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
