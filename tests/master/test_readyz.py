"""``/readyz`` answers within its timeout even when the database hangs: the storage ping's
worker thread (which no cancellation can interrupt) is abandoned, not waited for."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from nxmesh.master.api import health

from .conftest import Master


class _HungEngine:
    """An engine whose ``connect`` blocks like a database that accepts and never answers
    (until the test releases it)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()
        self.connects = 0

    def connect(self) -> Any:
        self.connects += 1
        self.entered.set()
        self.release.wait(60)
        self.left.set()
        raise OSError("database did not answer")

    def dispose(self) -> None:
        pass


def test_a_hung_database_answers_503_at_the_timeout(
    master: Master, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe gives up at its timeout while the ping's thread is still blocked in the
    database driver, and answers 503 saying so; the thread ends on its own later."""
    assert master.client.get("/readyz").json()["status"] == "ok"
    storage = master.services.storage
    hung = _HungEngine()
    monkeypatch.setattr(storage, "_engine", hung)
    monkeypatch.setattr(health, "_READY_TIMEOUT", 0.2)
    try:
        response = master.client.get("/readyz")
        # Answered while the worker thread is still stuck: it was abandoned, not awaited.
        assert hung.entered.is_set()
        assert not hung.left.is_set()
    finally:
        hung.release.set()
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["detail"].startswith("storage did not answer within")
    assert hung.left.wait(10)


def test_probes_during_a_hang_leave_one_thread_behind(
    master: Master, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeated probes while the database hangs wait for the stuck ping instead of each
    leaving another blocked thread: one connection attempt, every probe a 503."""
    storage = master.services.storage
    hung = _HungEngine()
    monkeypatch.setattr(storage, "_engine", hung)
    monkeypatch.setattr(health, "_READY_TIMEOUT", 0.2)
    try:
        codes = [master.client.get("/readyz").status_code for _ in range(3)]
        assert hung.connects == 1
    finally:
        hung.release.set()
    assert codes == [503, 503, 503]
    assert hung.left.wait(10)
