"""The agent cache: atomic, private, sealed entries; anything tampered is refused."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import attrs
import pytest

from nxmesh.agent.cache import AgentCache, CacheEntry, CacheError
from nxmesh.agent.verify import sign_update, verify_update
from nxmesh.config.versions import state_digest
from nxmesh.core.bundle import Bundle
from nxmesh.core.model import PendingApply
from nxmesh.crypto.signing import SigningKey
from nxmesh.plugins.render_nginx import NginxRenderer
from nxmesh.testing.factories import make_state


def _entry(body_sites: int = 2, *, version: int = 4) -> CacheEntry:
    state = make_state(body_sites)
    update = PendingApply(version=version, digest=state_digest(state), state=state)
    return CacheEntry(update=update, bundle=NginxRenderer().render(state), source="master")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestRoundTrip:
    def test_saved_entry_loads_back_equal(self, tmp_path: Path) -> None:
        """What was saved comes back: update, bundle files and source."""
        cache = AgentCache(tmp_path / "agent")
        entry = _entry()
        cache.save_last_good(entry)
        loaded = cache.load("last_good")
        assert loaded.update == entry.update
        assert loaded.bundle == entry.bundle
        assert loaded.source == "master"

    def test_directory_is_0700_and_files_0600(self, tmp_path: Path) -> None:
        """The state dir and every file in it are private to the agent's user."""
        cache = AgentCache(tmp_path / "agent")
        cache.save_last_good(_entry())
        cache.save_desired(_entry(version=5))
        assert _mode(tmp_path / "agent") == 0o700
        for name in ("cache.key", "last_good.json", "desired.json"):
            assert _mode(tmp_path / "agent" / name) == 0o600, name

    def test_rewrites_leave_no_temporary_files(self, tmp_path: Path) -> None:
        """Each save replaces the entry by rename; nothing half-written stays behind."""
        cache = AgentCache(tmp_path / "agent")
        for version in range(1, 4):
            cache.save_last_good(_entry(version=version))
        assert sorted(p.name for p in (tmp_path / "agent").iterdir()) == [
            "cache.key",
            "last_good.json",
        ]
        assert cache.load("last_good").update.version == 3

    def test_missing_entry_is_none_with_a_reason(self, tmp_path: Path) -> None:
        """No entry yet: load_verified answers None and says why."""
        cache = AgentCache(tmp_path / "agent")
        assert cache.load_verified() is None
        assert "no cached last_good entry" in (cache.last_error or "")

    def test_binary_files_round_trip(self, tmp_path: Path) -> None:
        """Non-text files (DER certificates) survive the cache byte for byte."""
        entry = _entry()
        files = {**entry.bundle.files, "certs/raw.der": bytes(range(256))}
        cache = AgentCache(tmp_path / "agent")
        cache.save_last_good(attrs.evolve(entry, bundle=Bundle(files)))
        assert cache.load("last_good").bundle.files["certs/raw.der"] == bytes(range(256))

    def test_load_raises_cache_error_naming_the_file(self, tmp_path: Path) -> None:
        """load() (unlike load_verified) raises, with the entry's path in the message."""
        cache = AgentCache(tmp_path / "agent")
        cache.save_last_good(_entry())
        cache.path("last_good").write_text("{not json")
        with pytest.raises(CacheError, match=r"last_good\.json is unreadable"):
            cache.load("last_good")


class TestTampering:
    @pytest.fixture
    def cache(self, tmp_path: Path) -> AgentCache:
        cache = AgentCache(tmp_path / "agent")
        cache.save_last_good(_entry())
        return cache

    def _edit(self, cache: AgentCache, change: object) -> None:
        path = cache.path("last_good")
        document = json.loads(path.read_text())
        change(document)  # type: ignore[operator]
        path.write_text(json.dumps(document))

    def test_edited_state_is_refused(self, cache: AgentCache) -> None:
        """Changing the cached state breaks the seal."""
        self._edit(cache, lambda d: d["entry"]["state"]["sites"][0].update(name="evil"))
        assert cache.load_verified() is None
        assert "bad seal" in (cache.last_error or "")

    def test_edited_bundle_file_is_refused(self, cache: AgentCache) -> None:
        """Changing a cached nginx file breaks the seal."""
        import base64

        def change(d: dict) -> None:  # type: ignore[type-arg]
            d["entry"]["files"]["nginx.conf"] = base64.b64encode(b"daemon on;").decode()

        self._edit(cache, change)
        assert cache.load_verified() is None

    def test_resealed_forgery_without_the_key_is_refused(
        self, cache: AgentCache, tmp_path: Path
    ) -> None:
        """A forger sealing with their own key (the agent's key is private) is refused."""
        forger = AgentCache(tmp_path / "forger")
        forged = _entry(3, version=99)
        forger.save_last_good(forged)
        cache.path("last_good").write_bytes(forger.path("last_good").read_bytes())
        assert cache.load_verified() is None
        assert "bad seal" in (cache.last_error or "")

    def test_consistent_content_with_a_wrong_digest_is_refused(self, tmp_path: Path) -> None:
        """Even correctly sealed, an entry whose state does not hash to its digest is refused."""
        cache = AgentCache(tmp_path / "agent")
        entry = _entry()
        wrong = attrs.evolve(entry, update=attrs.evolve(entry.update, digest="f" * 64))
        cache.save_last_good(wrong)
        assert cache.load_verified() is None
        assert "digest mismatch" in (cache.last_error or "")

    def test_loosened_permissions_are_refused(self, cache: AgentCache) -> None:
        """An entry readable by others might have been swapped: refused."""
        cache.path("last_good").chmod(0o644)
        assert cache.load_verified() is None
        assert "other users" in (cache.last_error or "")

    def test_a_key_readable_by_others_is_refused(self, cache: AgentCache, tmp_path: Path) -> None:
        """The sealing key others could read is known: nothing sealed with it is trusted."""
        key = tmp_path / "agent" / AgentCache.KEY_FILE
        key.chmod(0o644)
        reopened = AgentCache(tmp_path / "agent")
        assert reopened.load_verified() is None
        assert "cache key" in (reopened.last_error or "")
        assert "chmod 600" in (reopened.last_error or "")
        with pytest.raises(CacheError, match="other users"):
            reopened.save_last_good(_entry())

    def test_the_key_is_created_once_and_kept(self, tmp_path: Path) -> None:
        """A second cache on the directory (a restart) uses the key the first created."""
        AgentCache(tmp_path / "agent").save_last_good(_entry())
        key = (tmp_path / "agent" / AgentCache.KEY_FILE).read_bytes()
        assert len(key) == 32
        assert _mode(tmp_path / "agent" / AgentCache.KEY_FILE) == 0o600
        assert AgentCache(tmp_path / "agent").load_verified() is not None
        assert (tmp_path / "agent" / AgentCache.KEY_FILE).read_bytes() == key


class TestSignatures:
    def test_signed_entry_verifies_with_the_masters_key(self, tmp_path: Path) -> None:
        """A master-signed update in the cache loads when the agent knows the key."""
        key = SigningKey.generate()
        entry = _entry()
        signed = attrs.evolve(entry, update=sign_update(entry.update, key))
        cache = AgentCache(tmp_path / "agent", verify_key=key.verify_key, require_signature=True)
        cache.save_last_good(signed)
        assert cache.load_verified() is not None

    def test_unsigned_master_entry_is_refused_when_signatures_are_required(
        self, tmp_path: Path
    ) -> None:
        """With the master's key known, an unsigned entry from the master is refused."""
        key = SigningKey.generate()
        cache = AgentCache(tmp_path / "agent", verify_key=key.verify_key, require_signature=True)
        cache.save_last_good(_entry())
        assert cache.load_verified() is None
        assert "not signed" in (cache.last_error or "")

    def test_local_file_entries_need_no_master_signature(self, tmp_path: Path) -> None:
        """Masterless entries (source file) are the operator's own: no signature needed."""
        key = SigningKey.generate()
        cache = AgentCache(tmp_path / "agent", verify_key=key.verify_key, require_signature=True)
        cache.save_last_good(attrs.evolve(_entry(), source="file"))
        assert cache.load_verified() is not None

    def test_master_key_file_in_the_cache_dir_is_used(self, tmp_path: Path) -> None:
        """master.pub beside the entries is the key signatures are checked against."""
        key, other = SigningKey.generate(), SigningKey.generate()
        directory = tmp_path / "agent"
        directory.mkdir(mode=0o700)
        (directory / "master.pub").write_text(key.public_key_pem())
        entry = _entry()
        cache = AgentCache(directory, require_signature=True)
        cache.save_last_good(attrs.evolve(entry, update=sign_update(entry.update, other)))
        assert cache.load_verified() is None
        assert "signed by key" in (cache.last_error or "")


class TestVerifyUpdate:
    def test_altered_version_number_breaks_the_signature(self) -> None:
        """The signature binds the digest to the version number."""
        key = SigningKey.generate()
        update = sign_update(_entry().update, key)
        assert verify_update(update, key.verify_key) is None
        replayed = attrs.evolve(update, version=update.version + 1)
        assert "signature does not match" in (verify_update(replayed, key.verify_key) or "")

    def test_the_masters_version_signature_verifies_end_to_end(self) -> None:
        """One scheme: the ConfigVersion signed at creation verifies on the agent after
        travelling as a ConfigUpdate; any signed metadata altered breaks it."""
        from nxmesh.agent.verify import pending_from_version
        from nxmesh.config.versions import new_version
        from nxmesh.core.envelope import seal, unseal
        from nxmesh.core.protocol import ConfigUpdate, decode_body, encode_body

        key = SigningKey.generate()
        state = _entry().update.state
        version = new_version(state, previous=None, author="ann", message="m", signer=key)
        assert verify_update(pending_from_version(version), key.verify_key) is None
        frame = seal(encode_body(ConfigUpdate.of(version)), agent_id="a", key_id="k",
                     key=b"k" * 32, seq=1, ts_ms=1)  # fmt: skip
        received = decode_body(unseal(frame))
        assert isinstance(received, ConfigUpdate)
        pending = received.to_pending()
        assert verify_update(pending, key.verify_key, require_signature=True) is None
        for change in ({"author": "eve"}, {"message": "x"}, {"created_at": 1.0},
                       {"parent_digest": "0" * 64}, {"version": 2}):  # fmt: skip
            altered = attrs.evolve(pending, **change)  # type: ignore[arg-type]
            assert "signature does not match" in (verify_update(altered, key.verify_key) or "")
