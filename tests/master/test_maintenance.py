"""``nxmesh master rewrap-secrets`` and ``nxmesh master prune``: one job on a master's
state, then exit (nxmesh.master.maintenance)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import anyio
import attrs
import pytest
from click.testing import CliRunner, Result

from nxmesh.cli import build_cli
from nxmesh.core.model import Agent
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.records import AgentKey, AuditEntry
from nxmesh.crypto.secrets import (
    MASTER_KEY_FILE,
    MasterKeyring,
    SecretBox,
    encode_key,
    generate_key,
)
from nxmesh.master.app import open_services

from .conftest import FAST_HASHING, make_settings

KEY = AgentKey(agent_id="a1", key_id="k1", secret=b"s" * 32, created_at=1.0, expires_at=2e9)
ENV = {
    "NXMESH_DISABLE_PLUGIN_AUTOLOAD": "1",
    "NXMESH_LOG_LEVEL": "error",
    **{f"NXMESH_{k.upper().replace('.', '__')}": str(v) for k, v in FAST_HASHING.items()},
}


def nxmesh(state: Path, *args: str, **env: str) -> Result:
    return CliRunner().invoke(
        build_cli([]),
        ["master", "--state-dir", str(state), *args],
        env={**ENV, **env},
        catch_exceptions=False,
    )


@pytest.fixture
def state(tmp_path: Path, template_state: Path) -> Path:
    shutil.copytree(template_state, tmp_path / "state")
    return tmp_path / "state"


def seed(pm: NxMeshPluginManager, state: Path, *, audit_ts: float | None = None) -> None:
    """An agent session key (a stored secret) and, optionally, an old audit entry."""

    async def main() -> None:
        async with open_services(pm, make_settings(pm, state)) as services:
            await services.storage.upsert_agent(Agent(id="a1", name="edge"))
            await services.storage.add_agent_key(KEY)
            if audit_ts is not None:
                entry = AuditEntry(id="old", ts=audit_ts, actor="x", action="a")
                await services.storage.append_audit(entry)

    anyio.run(main)


class TestRewrapSecrets:
    def test_a_rotation_is_finished_offline(
        self, plugin_manager: NxMeshPluginManager, state: Path
    ) -> None:
        """With the new key and the old one as previous, the command re-encrypts what
        the old key locked and says how many; the new key alone then reads it all."""
        seed(plugin_manager, state)
        old = (state / MASTER_KEY_FILE).read_bytes()
        (state / "old.key").write_bytes(old)
        (state / "old.key").chmod(0o600)
        new = generate_key()
        rotating = {
            "NXMESH_MASTER_KEY": encode_key(new),
            "NXMESH_PREVIOUS_MASTER_KEY_FILES": str(state / "old.key"),
        }
        done = nxmesh(state, "rewrap-secrets", **rotating)
        assert done.exit_code == 0, done.output
        assert f"1 secret(s) re-encrypted under master key {SecretBox(new).key_id}" in done.output
        assert nxmesh(state, "rewrap-secrets", **rotating).output.startswith("0 secret(s)")
        (state / "old.key").unlink()
        (state / MASTER_KEY_FILE).unlink()

        async def read() -> AgentKey | None:
            settings = make_settings(plugin_manager, state, master_key=encode_key(new))
            async with open_services(plugin_manager, settings) as services:
                assert services.keyring.key_ids == (MasterKeyring(new).key_id,)
                return await services.storage.get_agent_key("a1", "k1")

        assert anyio.run(read) == KEY

    def test_without_previous_keys_there_is_nothing_to_do(self, state: Path) -> None:
        done = nxmesh(state, "rewrap-secrets")
        assert done.exit_code == 0, done.output
        assert "nothing to do: no previous master key is configured" in done.output

    def test_a_secret_no_key_opens_fails_the_command(
        self, plugin_manager: NxMeshPluginManager, state: Path
    ) -> None:
        """A stored secret under a key that is neither current nor previous: exit 1 with
        the reason (a starting master only logs it and runs on)."""
        from nxmesh.plugins.storage_sqlite import SqliteStorage

        seed(plugin_manager, state)
        foreign = MasterKeyring(generate_key())

        async def plant() -> None:
            storage = SqliteStorage(f"sqlite:///{state / 'master.db'}", keyring=foreign)
            await storage.open()
            try:
                await storage.upsert_agent(Agent(id="a2", name="edge-2"))
                await storage.add_agent_key(attrs.evolve(KEY, agent_id="a2"))
            finally:
                await storage.aclose()

        anyio.run(plant)
        done = nxmesh(
            state, "rewrap-secrets", NXMESH_PREVIOUS_MASTER_KEYS=encode_key(generate_key())
        )
        assert done.exit_code == 1, done.output
        assert foreign.key_id in done.output  # names the key it cannot find


class TestPrune:
    def test_one_pass_deletes_and_reports(
        self, plugin_manager: NxMeshPluginManager, state: Path
    ) -> None:
        """An audit entry past `audit_retention_days` goes; the counts are printed."""
        seed(plugin_manager, state, audit_ts=time.time() - 400 * 86400)
        done = nxmesh(state, "prune")
        assert done.exit_code == 0, done.output
        assert "audit_log: 1 row(s) deleted" in done.output
        again = nxmesh(state, "prune")
        assert "audit_log: 0 row(s) deleted" in again.output

    def test_bad_settings_are_a_clear_error(self, state: Path) -> None:
        done = nxmesh(state, "prune", NXMESH_MASTER__AUDIT_RETENTION_DAYS="-1")
        assert done.exit_code != 0
        assert "audit_retention_days" in done.output


@pytest.mark.parametrize("job", ["prune", "rewrap-secrets"])
def test_a_state_dir_without_a_master_is_refused(tmp_path: Path, job: str) -> None:
    """A mistyped --state-dir must not quietly create a new master (keys, an admin)."""
    empty = tmp_path / "typo"
    done = nxmesh(empty, job)
    assert done.exit_code == 1
    assert "no master has run with state_dir" in done.output
    assert not empty.exists()
