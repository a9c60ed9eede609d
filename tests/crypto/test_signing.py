"""The master's Ed25519 signing key: signatures, verification and encrypted storage."""

from __future__ import annotations

import base64
import hashlib
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from nxmesh.crypto.secrets import MasterKeyring, SecretBox, SecretError, token_key_id
from nxmesh.crypto.signing import (
    SIGNING_KEY_AAD,
    SigningError,
    SigningKey,
    VerifyKey,
    public_key_path,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_forms(key: SigningKey) -> list[str]:
    """Every way the private key could leak into text."""
    raw = key._raw()
    return [raw.hex(), repr(raw), base64.b64encode(raw).decode()]


class TestSigningKey:
    def test_signature_verifies(self) -> None:
        """A signature made by the key verifies with its public half."""
        key = SigningKey.generate()
        signature = key.sign(b"payload")
        assert base64.b64decode(signature, validate=True)
        assert key.verify_key.verify(b"payload", signature)

    def test_changed_data_fails(self) -> None:
        """A signature does not verify other data."""
        key = SigningKey.generate()
        assert not key.verify_key.verify(b"payload!", key.sign(b"payload"))

    def test_another_key_fails(self) -> None:
        """A signature by one key does not verify under another."""
        assert not SigningKey.generate().verify_key.verify(
            b"payload", SigningKey.generate().sign(b"payload")
        )

    @pytest.mark.parametrize(
        "signature",
        ["", "not base64!", "AAAA", base64.b64encode(b"\0" * 64).decode(), "=" * 8],
        ids=["empty", "not-base64", "too-short", "zeros", "padding"],
    )
    def test_malformed_signatures_are_false_not_errors(self, signature: str) -> None:
        """Garbage signatures make verify return False instead of raising."""
        assert SigningKey.generate().verify_key.verify(b"payload", signature) is False

    def test_key_id_is_a_short_public_key_hash(self) -> None:
        """The key id is 16 hex digits of sha256 of the raw public key."""
        key = SigningKey.generate()
        raw = key.verify_key._raw()
        assert key.key_id == hashlib.sha256(raw).hexdigest()[:16]
        assert key.key_id == key.verify_key.key_id

    def test_public_key_pem_round_trips(self) -> None:
        """The PEM public key loads back into a verify key with the same id."""
        key = SigningKey.generate()
        pem = key.public_key_pem()
        assert pem.startswith("-----BEGIN PUBLIC KEY-----")
        loaded = VerifyKey.from_pem(pem)
        assert loaded.key_id == key.key_id
        assert loaded == key.verify_key
        assert loaded.verify(b"x", key.sign(b"x"))
        assert VerifyKey.from_pem(pem.encode()).key_id == key.key_id

    def test_pem_is_what_cryptography_writes_and_reads(self) -> None:
        """The agent's own PEM code (no `serialization` import) writes the bytes
        cryptography writes, and reads cryptography's PEM and its line-wrapped forms."""
        for _ in range(20):
            key = SigningKey.generate()
            public = key._key.public_key()
            theirs = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
            assert key.public_key_pem() == theirs
            body = "".join(theirs.splitlines()[1:-1])
            wrapped = "\r\n".join(
                ["-----BEGIN PUBLIC KEY-----", body[:30], body[30:], "-----END PUBLIC KEY-----"]
            )
            for text in (theirs, wrapped, "\n\n" + theirs + "\n"):
                assert VerifyKey.from_pem(text) == key.verify_key

    def test_an_agent_loading_its_pinned_key_does_not_import_serialization(self) -> None:
        """Loading the pinned ``master.pub`` costs an agent no `serialization` (~2 MB)."""
        pem = SigningKey.generate().public_key_pem()
        code = (
            "import sys\n"
            "from nxmesh.crypto.signing import VerifyKey\n"
            f"key = VerifyKey.from_pem({pem!r})\n"
            "assert key.public_key_pem() == " + repr(pem) + "\n"
            "print('cryptography.hazmat.primitives.serialization' in sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "False"

    def test_non_ed25519_public_key_is_refused(self) -> None:
        """A PEM key of another algorithm is refused with a SigningError naming it."""
        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        with pytest.raises(SigningError, match="expected an Ed25519 public key"):
            VerifyKey.from_pem(pem)

    def test_garbage_pem_is_refused(self) -> None:
        """Text that is not a PEM public key is a SigningError."""
        with pytest.raises(SigningError, match="not a PEM public key"):
            VerifyKey.from_pem("hello")

    def test_repr_shows_no_private_key(self) -> None:
        """repr and str show the key id and no form of the private key."""
        key = SigningKey.generate()
        for text in (repr(key), str(key)):
            assert key.key_id in text
            for form in private_forms(key):
                assert form not in text

    def test_cannot_be_pickled(self) -> None:
        """Pickling the private key is refused."""
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(SigningKey.generate())


class TestLoadOrCreate:
    def test_creates_an_encrypted_private_file(self, tmp_path: Path) -> None:
        """A new key is stored encrypted, mode 0600 in a 0700 directory, with its public PEM."""
        path = tmp_path / "state" / "signing.key"
        key = SigningKey.load_or_create(path, SecretBox(KEY))
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
        stored = path.read_bytes()
        assert key._raw() not in stored
        assert SecretBox(KEY).decrypt(stored, aad=SIGNING_KEY_AAD) == key._raw()
        pub = public_key_path(path)
        assert pub == tmp_path / "state" / "signing.pub"
        assert VerifyKey.from_pem(pub.read_text()).key_id == key.key_id

    def test_loads_the_same_key_again(self, tmp_path: Path) -> None:
        """The second start loads the key the first start created."""
        path = tmp_path / "signing.key"
        first = SigningKey.load_or_create(path, SecretBox(KEY))
        second = SigningKey.load_or_create(path, SecretBox(KEY))
        assert second.key_id == first.key_id
        assert first.verify_key.verify(b"x", second.sign(b"x"))

    def test_wrong_master_key_is_a_clear_error(self, tmp_path: Path) -> None:
        """Opening the key with another master key names the file and the cause."""
        path = tmp_path / "signing.key"
        SigningKey.load_or_create(path, SecretBox(KEY))
        with pytest.raises(SecretError, match=r"cannot open signing key file .*wrong master key"):
            SigningKey.load_or_create(path, SecretBox(OTHER))

    def test_tampered_file_is_refused(self, tmp_path: Path) -> None:
        """A flipped byte in the stored key makes loading fail instead of using a bad key."""
        path = tmp_path / "signing.key"
        SigningKey.load_or_create(path, SecretBox(KEY))
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x80
        path.write_bytes(bytes(data))
        with pytest.raises(SecretError, match="failed authentication"):
            SigningKey.load_or_create(path, SecretBox(KEY))

    def test_token_for_another_purpose_is_refused(self, tmp_path: Path) -> None:
        """A secret encrypted for another purpose cannot be planted as the signing key."""
        path = tmp_path / "signing.key"
        path.write_bytes(SecretBox(KEY).encrypt(SigningKey.generate()._raw(), aad=b"other"))
        path.chmod(0o600)
        with pytest.raises(SecretError):
            SigningKey.load_or_create(path, SecretBox(KEY))

    def test_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        """A group-readable key file is refused with the chmod that fixes it."""
        path = tmp_path / "signing.key"
        SigningKey.load_or_create(path, SecretBox(KEY))
        path.chmod(0o640)
        with pytest.raises(SecretError, match=re.escape(f"chmod 600 {path}")):
            SigningKey.load_or_create(path, SecretBox(KEY))

    def test_public_key_file_is_healed(self, tmp_path: Path) -> None:
        """A missing or replaced public key file is rewritten from the private key on load."""
        path = tmp_path / "signing.key"
        key = SigningKey.load_or_create(path, SecretBox(KEY))
        pub = public_key_path(path)
        pub.write_text(SigningKey.generate().public_key_pem())
        SigningKey.load_or_create(path, SecretBox(KEY))
        assert VerifyKey.from_pem(pub.read_text()).key_id == key.key_id
        pub.unlink()
        SigningKey.load_or_create(path, SecretBox(KEY))
        assert VerifyKey.from_pem(pub.read_text()).key_id == key.key_id

    def test_master_key_rotation_re_encrypts_the_file(self, tmp_path: Path) -> None:
        """Loading through a rotated keyring rewraps the file; afterwards the old key is moot."""
        path = tmp_path / "signing.key"
        key = SigningKey.load_or_create(path, SecretBox(KEY))
        old_token = path.read_bytes()
        with capture_logs() as logs:
            rotated = SigningKey.load_or_create(path, MasterKeyring(OTHER, previous=[KEY]))
        assert rotated.key_id == key.key_id
        assert path.read_bytes() != old_token
        assert token_key_id(path.read_bytes()) == SecretBox(OTHER).key_id
        assert mode(path) == 0o600
        assert [e["event"] for e in logs] == ["signing key re-encrypted"]
        assert SigningKey.load_or_create(path, SecretBox(OTHER)).key_id == key.key_id
        assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key", "signing.pub"]

    def test_current_file_is_not_rewritten(self, tmp_path: Path) -> None:
        """A keyring whose primary already encrypted the file leaves it untouched."""
        path = tmp_path / "signing.key"
        SigningKey.load_or_create(path, SecretBox(KEY))
        before = path.read_bytes()
        SigningKey.load_or_create(path, MasterKeyring(KEY, previous=[OTHER]))
        assert path.read_bytes() == before

    def test_logs_name_the_key_id_only(self, tmp_path: Path) -> None:
        """Creating the key logs its id and path and no form of the private key."""
        with capture_logs() as logs:
            key = SigningKey.load_or_create(tmp_path / "signing.key", SecretBox(KEY))
        assert [e["event"] for e in logs] == ["signing key created"]
        assert logs[0]["key_id"] == key.key_id
        for form in private_forms(key):
            assert form not in repr(logs)
