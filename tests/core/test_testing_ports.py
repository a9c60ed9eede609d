"""`nxmesh.testing.nginx.free_port`: the ports handed to fixtures never repeat."""

from __future__ import annotations

import socket

import pytest

from nxmesh.testing.nginx import free_port


def test_free_port_never_repeats() -> None:
    # Nothing listens on these ports between calls: each is free every time.
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_free_ports_are_not_the_kernels_ephemeral_ones() -> None:
    """Below the range the kernel hands to outgoing connections and ``bind(0)``."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    assert all(20000 <= free_port() < low for _ in range(50))


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_xdist_workers_are_given_disjoint_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under pytest-xdist each worker takes only its residue of the ports: one worker's
    free port is never another's. Two workers too: Linux's ``bind(0)`` hands out odd
    ports first, so drawing from it would starve the even worker."""
    for count in (2, 3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))
        for index in range(count):
            monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
            assert {free_port() % count for _ in range(20)} == {index}
