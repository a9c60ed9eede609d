"""Rotating the master key of a real master (SQLite storage), as docs/secrets.md says:
configure the new key with the old one as a previous key, start (secrets and key files
are re-encrypted), then drop the old key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nxmesh.core.model import Agent
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.records import AgentKey, StoredCertificate
from nxmesh.crypto.secrets import (
    MASTER_KEY_FILE,
    MasterKeyring,
    SecretBox,
    SecretError,
    encode_key,
    generate_key,
    token_key_id,
)
from nxmesh.crypto.signing import SIGNING_KEY_FILE
from nxmesh.master.app import open_services
from nxmesh.master.auth.tokens import JWT_KEY_FILE

from .conftest import make_settings

pytestmark = pytest.mark.anyio

CERT = StoredCertificate(
    workspace="default", name="www", cert_pem="CERT", key_pem="PRIVATE KEY", not_after=2e9
)
KEY = AgentKey(agent_id="a1", key_id="k1", secret=b"s" * 32, created_at=1.0, expires_at=2e9)


async def test_master_key_rotation_end_to_end(
    plugin_manager: NxMeshPluginManager, tmp_path: Path, template_state: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(template_state, state)
    old = (state / MASTER_KEY_FILE).read_bytes()
    (state / "old.key").write_bytes(old)
    (state / "old.key").chmod(0o600)

    async with open_services(plugin_manager, make_settings(plugin_manager, state)) as services:
        signing_key_id = services.signer.key_id
        await services.storage.put_certificate(CERT)
        await services.storage.upsert_agent(Agent(id="a1", name="edge"))
        await services.storage.add_agent_key(KEY)

    new = generate_key()
    new_id = SecretBox(new).key_id
    # A new key alone: the master refuses to start, and says which setting helps.
    with pytest.raises(SecretError, match="previous_master_keys"):
        async with open_services(
            plugin_manager, make_settings(plugin_manager, state, master_key=encode_key(new))
        ):
            pass

    # New key + the old one as a previous key: starts, reads everything, re-encrypts it.
    rotating = make_settings(
        plugin_manager,
        state,
        master_key=encode_key(new),
        previous_master_key_files=str(state / "old.key"),
    )
    async with open_services(plugin_manager, rotating) as services:
        assert services.keyring.key_ids == (new_id, SecretBox(old).key_id)
        assert services.signer.key_id == signing_key_id  # the same signing key
        assert await services.storage.get_certificate("default", "www") == CERT
        assert await services.storage.get_agent_key("a1", "k1") == KEY
        assert await services.storage.rewrap_secrets() == 0  # done at start already
    for name in (SIGNING_KEY_FILE, JWT_KEY_FILE):
        assert token_key_id((state / name).read_bytes()) == new_id

    # The old key is not needed any more (given as a value this time, then removed).
    again = make_settings(
        plugin_manager, state, master_key=encode_key(new), previous_master_keys=encode_key(old)
    )
    async with open_services(plugin_manager, again) as services:
        assert await services.storage.rewrap_secrets() == 0
    (state / "old.key").unlink()
    (state / MASTER_KEY_FILE).unlink()
    async with open_services(
        plugin_manager, make_settings(plugin_manager, state, master_key=encode_key(new))
    ) as services:
        assert services.signer.key_id == signing_key_id
        assert await services.storage.get_certificate("default", "www") == CERT
        assert await services.storage.get_agent_key("a1", "k1") == KEY
        assert services.keyring.key_ids == (new_id,)
    # Nothing at rest names the old key: it could not be read any more.
    only_new = MasterKeyring(new)
    for name in (SIGNING_KEY_FILE, JWT_KEY_FILE):
        assert not only_new.needs_rewrap((state / name).read_bytes())
