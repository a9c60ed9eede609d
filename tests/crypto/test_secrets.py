"""Secrets at rest: AES-GCM tokens, key rotation, and where the master key comes from."""

from __future__ import annotations

import base64
import hashlib
import os
import pickle
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nxmesh.core.errors import NxMeshError
from nxmesh.crypto.secrets import (
    KEY_SIZE,
    MASTER_KEY_ENV,
    MasterKeyring,
    SecretBox,
    SecretError,
    encode_key,
    generate_key,
    load_master_key,
    load_previous_master_keys,
    token_key_id,
    write_private_file,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def flip(token: bytes, index: int) -> bytes:
    """`token` with one bit of byte `index` inverted."""
    data = bytearray(token)
    data[index] ^= 0x01
    return bytes(data)


def key_forms(key: bytes) -> list[str]:
    """Every way key material could leak into text."""
    return [
        key.hex(),
        repr(key),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="),
    ]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestSecretBox:
    def test_round_trip(self) -> None:
        """A token decrypts to the plaintext it was made from."""
        box = SecretBox(KEY)
        assert box.decrypt(box.encrypt(b"session key")) == b"session key"

    def test_empty_plaintext_round_trips(self) -> None:
        """An empty secret is still a valid, authenticated token."""
        box = SecretBox(KEY)
        assert box.decrypt(box.encrypt(b"")) == b""

    def test_token_layout(self) -> None:
        """A token is version 1, the key id, a 12-byte nonce, then ciphertext and 16-byte tag."""
        box = SecretBox(KEY)
        token = box.encrypt(b"abc")
        assert token[0] == 1
        assert token[1:9] == hashlib.sha256(KEY).digest()[:8]
        assert len(token) == 1 + 8 + 12 + 3 + 16
        assert b"abc" not in token

    def test_key_id_is_the_sha256_prefix(self) -> None:
        """`key_id` is the hex of the first 8 bytes of sha256(key), also readable off a token."""
        box = SecretBox(KEY)
        assert box.key_id == hashlib.sha256(KEY).hexdigest()[:16]
        assert token_key_id(box.encrypt(b"x")) == box.key_id

    def test_nonces_are_fresh(self) -> None:
        """Encrypting the same secret twice gives different tokens."""
        box = SecretBox(KEY)
        assert box.encrypt(b"same") != box.encrypt(b"same")

    def test_wrong_key_is_a_clear_error(self) -> None:
        """Decrypting with another key raises SecretError naming both key ids."""
        token = SecretBox(KEY).encrypt(b"secret")
        other = SecretBox(OTHER)
        with pytest.raises(SecretError, match="wrong master key") as info:
            other.decrypt(token)
        assert SecretBox(KEY).key_id in str(info.value)
        assert other.key_id in str(info.value)
        assert isinstance(info.value, NxMeshError)

    @pytest.mark.parametrize(
        "index", [-1, -17, 21, 9, 20], ids=["tag", "ciphertext", "first", "nonce", "nonce-end"]
    )
    def test_any_flipped_byte_is_detected(self, index: int) -> None:
        """Flipping one bit anywhere after the key id makes decryption fail."""
        box = SecretBox(KEY)
        token = box.encrypt(b"a secret of some length")
        with pytest.raises(SecretError, match="failed authentication"):
            box.decrypt(flip(token, index))

    def test_changed_version_byte_is_refused(self) -> None:
        """A token with an unknown format version is refused with the version number."""
        box = SecretBox(KEY)
        token = bytes([2]) + box.encrypt(b"x")[1:]
        with pytest.raises(SecretError, match="format version 2"):
            box.decrypt(token)

    def test_associated_data_binds_the_token(self) -> None:
        """A token made for one record does not decrypt as another record's."""
        box = SecretBox(KEY)
        token = box.encrypt(b"private key", aad=b"agents/a1")
        assert box.decrypt(token, aad=b"agents/a1") == b"private key"
        with pytest.raises(SecretError, match="another record"):
            box.decrypt(token, aad=b"agents/a2")

    @pytest.mark.parametrize("token", [b"", b"\x01", b"\x01" + b"\x00" * 35])
    def test_truncated_tokens_are_refused(self, token: bytes) -> None:
        """A token too short to hold header and tag raises SecretError, not an index error."""
        with pytest.raises(SecretError, match="too short"):
            SecretBox(KEY).decrypt(token)

    @pytest.mark.parametrize("key", [b"", b"x" * 16, b"x" * 33])
    def test_key_must_be_32_bytes(self, key: bytes) -> None:
        """A key of any other length is refused with its size, not its content."""
        with pytest.raises(SecretError, match=f"must be 32 bytes, got {len(key)}$"):
            SecretBox(key)

    def test_repr_shows_no_key_material(self) -> None:
        """repr and str name the key id only."""
        box = SecretBox(KEY)
        for text in (repr(box), str(box)):
            assert box.key_id in text
            for form in key_forms(KEY):
                assert form not in text

    def test_cannot_be_pickled(self) -> None:
        """Pickling a box, which would write out its key, is refused."""
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(SecretBox(KEY))


class TestMasterKeyring:
    def test_encrypts_with_the_primary(self) -> None:
        """New tokens carry the primary key's id, not a previous key's."""
        ring = MasterKeyring(KEY, previous=[OTHER])
        token = ring.encrypt(b"x")
        assert token_key_id(token) == SecretBox(KEY).key_id == ring.key_id
        assert ring.decrypt(token) == b"x"
        assert not ring.needs_rewrap(token)

    def test_rotation_keeps_old_tokens_readable(self) -> None:
        """After rotating, tokens from the old key still decrypt and need a rewrap."""
        old_token = SecretBox(KEY).encrypt(b"signing key", aad=b"signing")
        ring = MasterKeyring(OTHER, previous=[KEY])
        assert ring.decrypt(old_token, aad=b"signing") == b"signing key"
        assert ring.needs_rewrap(old_token)

    def test_rewrapped_tokens_no_longer_need_the_old_key(self) -> None:
        """A rewrapped token decrypts with the new key alone, so the old key can go."""
        old_token = SecretBox(KEY).encrypt(b"signing key", aad=b"signing")
        rotated = MasterKeyring(OTHER, previous=[KEY])
        new_token = rotated.rewrap(old_token, aad=b"signing")
        assert not rotated.needs_rewrap(new_token)
        after = MasterKeyring(OTHER)
        assert after.decrypt(new_token, aad=b"signing") == b"signing key"
        with pytest.raises(SecretError, match="not in the keyring"):
            after.decrypt(old_token, aad=b"signing")

    def test_rewrap_of_a_current_token_keeps_it(self) -> None:
        """Rewrapping a token already under the primary key returns it unchanged."""
        ring = MasterKeyring(KEY)
        token = ring.encrypt(b"x")
        assert ring.rewrap(token) == token

    def test_rewrap_detects_tampering(self) -> None:
        """A rewrap pass refuses tampered tokens instead of re-encrypting them."""
        ring = MasterKeyring(OTHER, previous=[KEY])
        with pytest.raises(SecretError):
            ring.rewrap(flip(SecretBox(KEY).encrypt(b"x"), -1))
        with pytest.raises(SecretError):
            ring.rewrap(flip(ring.encrypt(b"x"), -1))

    def test_unknown_key_is_named(self) -> None:
        """A token from a key not in the ring names that key and says how to fix it."""
        token = SecretBox(OTHER).encrypt(b"x")
        with pytest.raises(SecretError, match="add that key as a previous master key") as info:
            MasterKeyring(KEY).decrypt(token)
        assert SecretBox(OTHER).key_id in str(info.value)

    def test_duplicate_keys_are_folded(self) -> None:
        """Listing the primary again among previous keys does not duplicate it."""
        ring = MasterKeyring(KEY, previous=[KEY, OTHER, OTHER])
        assert ring.key_ids == (SecretBox(KEY).key_id, SecretBox(OTHER).key_id)

    def test_repr_shows_no_key_material(self) -> None:
        """repr names key ids only."""
        ring = MasterKeyring(KEY, previous=[OTHER])
        text = repr(ring)
        assert SecretBox(OTHER).key_id in text
        for form in key_forms(KEY) + key_forms(OTHER):
            assert form not in text


class TestLoadMasterKey:
    def test_setting_wins(self, tmp_path: Path) -> None:
        """The master_key setting is used before the environment and no file is created."""
        key_file = tmp_path / "master.key"
        key = load_master_key(
            setting=encode_key(KEY), env={MASTER_KEY_ENV: encode_key(OTHER)}, key_file=key_file
        )
        assert key == KEY
        assert not key_file.exists()

    def test_setting_without_padding_is_accepted(self, tmp_path: Path) -> None:
        """base64url without '=' padding decodes to the same key."""
        text = encode_key(KEY).rstrip("=")
        assert load_master_key(setting=text, env={}, key_file=tmp_path / "k") == KEY

    def test_environment_comes_second(self, tmp_path: Path) -> None:
        """NXMESH_MASTER_KEY is used when the setting is empty, before the key file."""
        key_file = tmp_path / "master.key"
        key = load_master_key(env={MASTER_KEY_ENV: encode_key(OTHER)}, key_file=key_file)
        assert key == OTHER
        assert not key_file.exists()

    def test_process_environment_is_the_default(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without an explicit env mapping, os.environ is read."""
        monkeypatch.setenv(MASTER_KEY_ENV, encode_key(OTHER))
        assert load_master_key(key_file=tmp_path / "master.key") == OTHER

    @pytest.mark.parametrize(
        ("value", "reason"),
        [("not base64!!", "not valid base64url"), (encode_key(KEY)[:20], "must decode to 32")],
    )
    def test_bad_setting_is_refused_without_echoing_it(
        self, tmp_path: Path, value: str, reason: str
    ) -> None:
        """A malformed key names its source and why, never the value itself."""
        with pytest.raises(SecretError, match=reason) as info:
            load_master_key(setting=value, env={}, key_file=tmp_path / "k")
        assert "master_key setting" in str(info.value)
        assert value not in str(info.value)

    def test_first_start_creates_a_private_key_file(self, tmp_path: Path) -> None:
        """The key file is created with 32 random bytes, mode 0600, in new 0700 directories."""
        key_file = tmp_path / "state" / "keys" / "master.key"
        key = load_master_key(env={}, key_file=key_file)
        assert len(key) == KEY_SIZE
        assert key_file.read_bytes() == key
        assert mode(key_file) == 0o600
        assert mode(key_file.parent) == 0o700
        assert mode(key_file.parent.parent) == 0o700
        assert [p.name for p in key_file.parent.iterdir()] == ["master.key"]  # no temp files

    def test_key_file_is_reused(self, tmp_path: Path) -> None:
        """Later starts read the same key back."""
        key_file = tmp_path / "master.key"
        assert load_master_key(env={}, key_file=key_file) == load_master_key(
            env={}, key_file=key_file
        )

    def test_keys_are_random(self, tmp_path: Path) -> None:
        """Two fresh key files hold different keys."""
        assert load_master_key(env={}, key_file=tmp_path / "a") != load_master_key(
            env={}, key_file=tmp_path / "b"
        )
        assert generate_key() != generate_key()

    @pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o004])
    def test_readable_by_others_is_refused(self, tmp_path: Path, file_mode: int) -> None:
        """An existing key file its group or other users can access is refused with the fix."""
        key_file = tmp_path / "master.key"
        key_file.write_bytes(KEY)
        key_file.chmod(file_mode)
        with pytest.raises(SecretError, match="accessible by other users") as info:
            load_master_key(env={}, key_file=key_file)
        assert f"chmod 600 {key_file}" in str(info.value)

    def test_owner_only_modes_are_accepted(self, tmp_path: Path) -> None:
        """A 0400 key file (read-only for its owner) is fine."""
        key_file = tmp_path / "master.key"
        key_file.write_bytes(KEY)
        key_file.chmod(0o400)
        assert load_master_key(env={}, key_file=key_file) == KEY

    def test_base64url_text_file_is_accepted(self, tmp_path: Path) -> None:
        """A key file holding the base64url text of a key (plus newline) works too."""
        key_file = tmp_path / "master.key"
        key_file.write_text(encode_key(KEY) + "\n")
        key_file.chmod(0o600)
        assert load_master_key(env={}, key_file=key_file) == KEY

    def test_garbage_file_is_refused(self, tmp_path: Path) -> None:
        """A key file that is neither 32 bytes nor base64url is a clear error."""
        key_file = tmp_path / "master.key"
        key_file.write_bytes(b"\xff" * 10)
        key_file.chmod(0o600)
        with pytest.raises(SecretError, match="expected 32 raw bytes"):
            load_master_key(env={}, key_file=key_file)

    def test_directory_is_not_a_key_file(self, tmp_path: Path) -> None:
        """A directory where the key file should be is refused."""
        key_file = tmp_path / "master.key"
        key_file.mkdir(mode=0o700)
        with pytest.raises(SecretError):
            load_master_key(env={}, key_file=key_file)

    def test_shared_parent_directory_is_left_alone_but_reported(self, tmp_path: Path) -> None:
        """An existing group-readable parent keeps its mode and a warning tells how to fix it."""
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o755)
        with capture_logs() as logs:
            load_master_key(env={}, key_file=shared / "master.key")
        assert mode(shared) == 0o755
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert warnings
        assert warnings[0]["fix"] == f"chmod 700 {shared}"

    def test_logs_name_the_key_id_never_the_key(self, tmp_path: Path) -> None:
        """Creating and loading the key logs its id and file, and no form of the key."""
        key_file = tmp_path / "master.key"
        with capture_logs() as logs:
            key = load_master_key(env={}, key_file=key_file)
            load_master_key(env={}, key_file=key_file)
            load_master_key(setting=encode_key(key), env={}, key_file=key_file)
            load_master_key(env={MASTER_KEY_ENV: encode_key(key)}, key_file=key_file)
        assert [e["event"] for e in logs] == [
            "master key created",
            "master key loaded",
            "master key loaded",
            "master key loaded",
        ]
        assert {e["key_id"] for e in logs} == {SecretBox(key).key_id}
        dumped = repr(logs)
        for form in key_forms(key):
            assert form not in dumped

    def test_concurrent_creation_keeps_the_first_key(self, tmp_path: Path) -> None:
        """When the file appears between the existence check and the link, its key is used."""
        key_file = tmp_path / "master.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, KEY)
        os.close(fd)
        assert write_private_file(key_file, OTHER) is False
        assert key_file.read_bytes() == KEY
        assert load_master_key(env={}, key_file=key_file) == KEY


def test_previous_keys_are_checked_without_showing_them(tmp_path: Path) -> None:
    """A malformed previous key is named by position, never echoed; a file must exist and
    be private, like the master key file."""
    with pytest.raises(SecretError, match=r"previous_master_keys\[1\]") as bad:
        load_previous_master_keys([encode_key(generate_key()), "not-a-key-at-all"])
    assert "not-a-key-at-all" not in str(bad.value)
    with pytest.raises(SecretError, match="does not exist"):
        load_previous_master_keys(files=[tmp_path / "missing.key"])
    loose = tmp_path / "loose.key"
    loose.write_bytes(generate_key())
    loose.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        load_previous_master_keys(files=[loose])
    loose.chmod(0o600)
    assert load_previous_master_keys(files=[loose]) == [loose.read_bytes()]
