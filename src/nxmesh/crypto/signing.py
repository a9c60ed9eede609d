"""The master's Ed25519 signing key: it signs every config version, agents verify.

The private key lives in one file, encrypted with the master key (`SecretBox`) and mode
0600; the public key is written beside it as PEM (``<name>.pub``) so ``nxmesh versions
verify`` and agents can check signatures without the master key. A key id (16 hex
digits of the sha256 of the raw public key) names the key in versions and logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path
from typing import Final, NoReturn

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from nxmesh.core.errors import NxMeshError
from nxmesh.crypto.secrets import (
    MasterKeyring,
    SecretBox,
    SecretError,
    read_private_file,
    write_private_file,
)

__all__ = [
    "SIGNING_KEY_AAD",
    "SIGNING_KEY_FILE",
    "SIGNING_PUBLIC_KEY_FILE",
    "SigningError",
    "SigningKey",
    "VerifyKey",
    "public_key_path",
]

SIGNING_KEY_FILE: Final = "signing.key"
"""Name of the encrypted private signing key inside the state directory."""

SIGNING_PUBLIC_KEY_FILE: Final = "signing.pub"
"""Name of its public key (PEM) beside it, see `public_key_path`."""

SIGNING_KEY_AAD: Final = b"nxmesh:signing-key:ed25519:v1"
"""Associated data binding the encrypted private key token to its purpose."""

_log = structlog.get_logger("nxmesh.crypto")


class SigningError(NxMeshError):
    """A signing or verify key could not be loaded."""


def public_key_path(private_path: Path) -> Path:
    """Where `SigningKey.load_or_create` keeps the public key: ``signing.key`` → ``signing.pub``."""
    return private_path.with_suffix(".pub")


def _key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes_raw()).hexdigest()[:16]


# An Ed25519 public key's SubjectPublicKeyInfo is always these 12 DER bytes and then the
# 32 raw key bytes (RFC 8410, section 4). Agents read and write the pinned ``master.pub``
# with it: cryptography's `serialization` module pulls in every key type and the SSH key
# format, about 2 MB per agent process. Anything else goes through `serialization`.
_ED25519_SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN: Final = "-----BEGIN PUBLIC KEY-----"
_PEM_END: Final = "-----END PUBLIC KEY-----"


def _pem(public: Ed25519PublicKey) -> str:
    """PEM ``SubjectPublicKeyInfo``, byte for byte what cryptography writes."""
    der = _ED25519_SPKI_PREFIX + public.public_bytes_raw()
    return f"{_PEM_BEGIN}\n{base64.b64encode(der).decode('ascii')}\n{_PEM_END}\n"


def _ed25519_from_pem(data: bytes) -> Ed25519PublicKey | None:
    """The key of a plain Ed25519 PEM public key; None for anything else."""
    lines = data.decode("ascii", "replace").strip().splitlines()
    if len(lines) < 3 or lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
        return None
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except binascii.Error:
        return None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        return None
    return Ed25519PublicKey.from_public_bytes(der[len(_ED25519_SPKI_PREFIX) :])


class VerifyKey:
    """An Ed25519 public key that checks version signatures."""

    __slots__ = ("_key", "_key_id")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._key_id = _key_id(key)

    @classmethod
    def from_pem(cls, pem: str | bytes) -> VerifyKey:
        """Load a PEM ``PUBLIC KEY``; `SigningError` when it is not an Ed25519 key."""
        data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
        plain = _ed25519_from_pem(data)
        if plain is not None:
            return cls(plain)
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise SigningError(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"expected an Ed25519 public key, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def from_base64(cls, text: str) -> VerifyKey:
        """Load the raw 32-byte key in base64 (as the master sends it at enrollment)."""
        try:
            raw = base64.b64decode(text, validate=True)
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except (binascii.Error, ValueError) as exc:
            raise SigningError(f"not a base64 Ed25519 public key: {exc}") from None

    def to_base64(self) -> str:
        """The raw 32-byte key in base64: compact, no line breaks (protocol messages)."""
        return base64.b64encode(self._raw()).decode("ascii")

    @property
    def key_id(self) -> str:
        """16 hex digits of sha256 of the raw public key."""
        return self._key_id

    def public_key_pem(self) -> str:
        """The key as PEM ``SubjectPublicKeyInfo`` text."""
        return _pem(self._key)

    def verify(self, data: bytes, signature_b64: str) -> bool:
        """True when `signature_b64` is a valid signature of `data`; never raises on bad input."""
        try:
            signature = base64.b64decode(signature_b64, validate=True)
            self._key.verify(signature, bytes(data))
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerifyKey):
            return NotImplemented
        return other._raw() == self._raw()

    def __hash__(self) -> int:
        return hash(self._raw())

    def _raw(self) -> bytes:
        return self._key.public_bytes_raw()

    def __repr__(self) -> str:
        return f"VerifyKey(key_id={self._key_id!r})"


class SigningKey:
    """The master's Ed25519 private key. Its repr shows the key id only."""

    __slots__ = ("_key", "_verify_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._verify_key = VerifyKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path, box: SecretBox | MasterKeyring) -> SigningKey:
        """Load the key stored at `path`, or create, encrypt and store a new one.

        The file holds a `SecretBox` token of the raw private key (mode 0600; the master
        key is needed to use it); the public PEM is (re)written to `public_key_path`.
        Given a `MasterKeyring` after a rotation, a file still encrypted with a previous
        master key is re-encrypted with the primary one (atomically replaced).

        :raises SecretError: the file is unreadable, too permissive, or was encrypted with
            another master key.
        """
        if not path.exists():
            key = cls.generate()
            if write_private_file(path, box.encrypt(key._raw(), aad=SIGNING_KEY_AAD)):
                key._write_public(path)
                _log.info("signing key created", path=str(path), key_id=key.key_id)
                return key
        token = read_private_file(path, what="signing key file")
        try:
            raw = box.decrypt(token, aad=SIGNING_KEY_AAD)
        except SecretError as exc:
            raise SecretError(f"cannot open signing key file {path}: {exc}") from None
        try:
            key = cls(Ed25519PrivateKey.from_private_bytes(raw))
        except ValueError:
            raise SecretError(f"signing key file {path} does not hold an Ed25519 key") from None
        if isinstance(box, MasterKeyring) and box.needs_rewrap(token):
            write_private_file(path, box.encrypt(raw, aad=SIGNING_KEY_AAD), replace=True)
            _log.info("signing key re-encrypted", path=str(path), master_key_id=box.key_id)
        key._write_public(path)
        return key

    def _raw(self) -> bytes:
        return self._key.private_bytes_raw()

    def _write_public(self, private_path: Path) -> None:
        # Rewritten on every load, so a stale or replaced .pub heals on the next start.
        target = public_key_path(private_path)
        pem = self.public_key_pem()
        try:
            if target.read_text(encoding="ascii") == pem:
                return
        except (OSError, UnicodeDecodeError):
            pass
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(pem, encoding="ascii")
        tmp.chmod(0o644)
        tmp.replace(target)

    @property
    def key_id(self) -> str:
        """16 hex digits of sha256 of the raw public key (same as `verify_key.key_id`)."""
        return self._verify_key.key_id

    @property
    def verify_key(self) -> VerifyKey:
        """The public half."""
        return self._verify_key

    def public_key_pem(self) -> str:
        """The public key as PEM text, for agents and ``nxmesh versions verify``."""
        return self._verify_key.public_key_pem()

    def sign(self, data: bytes) -> str:
        """The base64 Ed25519 signature of `data`."""
        return base64.b64encode(self._key.sign(bytes(data))).decode("ascii")

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SigningKey holds a private key and cannot be pickled")
