"""Fixtures of the certificate tests: a throwaway PKI, storage, Pebble."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from nxmesh.core.model import DesiredState
from nxmesh.crypto.secrets import MasterKeyring, generate_key
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.testing.factories import make_version
from nxmesh.testing.pebble import pebble  # noqa: F401 - the session fixture
from nxmesh.testing.pki import Pki


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def keyring() -> MasterKeyring:
    return MasterKeyring(generate_key())


@pytest.fixture
async def storage(keyring: MasterKeyring) -> AsyncIterator[SqliteStorage]:
    """An in-memory SQLite storage with a keyring, migrated."""
    backend = SqliteStorage("sqlite://", keyring=keyring)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
def store_state(storage: SqliteStorage) -> Callable[[DesiredState], Awaitable[None]]:
    """``await store_state(state)`` stores `state` as the next version of its workspace."""

    async def store(state: DesiredState) -> None:
        latest = await storage.latest_version(state.workspace)
        number = (latest.number if latest else 0) + 1
        await storage.add_version(make_version(number, workspace=state.workspace, state=state))

    return store
