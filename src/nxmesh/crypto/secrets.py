"""Secrets at rest: AES-256-GCM under the master key, and where that key comes from.

A *token* is what gets stored (a database column, a file)::

    version (1 byte, 0x01) | key id (8 bytes) | nonce (12 bytes) | ciphertext + GCM tag

The key id is the first 8 bytes of ``sha256(key)``: it tells which key of a
`MasterKeyring` opens a token without trying them all, and it says nothing useful about
the key. The version byte and key id are authenticated too (they are part of the GCM
associated data), so neither can be altered without `decrypt` failing. Callers pass their
own `aad` (a table and row id, a file purpose) to bind a token to where it belongs: a
token copied into another row then fails to decrypt instead of leaking there.

Key material never appears in ``repr``, ``str``, exceptions or logs; only key ids do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, NoReturn

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nxmesh.crypto.errors import SecretError
from nxmesh.crypto.private_files import read_private_file, write_private_file

__all__ = [
    "KEY_SIZE",
    "MASTER_KEY_ENV",
    "MASTER_KEY_FILE",
    "TOKEN_VERSION",
    "MasterKeyring",
    "SecretBox",
    "SecretError",
    "decode_key",
    "encode_key",
    "generate_key",
    "load_master_key",
    "load_previous_master_keys",
    "read_private_file",
    "token_key_id",
    "write_private_file",
]

KEY_SIZE: Final = 32
"""Bytes in a master key (AES-256)."""

TOKEN_VERSION: Final = 1
"""The format version byte written at the start of every token."""

MASTER_KEY_ENV: Final = "NXMESH_MASTER_KEY"
"""Environment variable holding a base64url master key."""

MASTER_KEY_FILE: Final = "master.key"
"""Name of the master key file inside the state directory."""

_KEY_ID_SIZE: Final = 8
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_HEADER_SIZE: Final = 1 + _KEY_ID_SIZE + _NONCE_SIZE

_log = structlog.get_logger("nxmesh.crypto")


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------


def generate_key() -> bytes:
    """A new random 32-byte master key from the operating system's CSPRNG."""
    return os.urandom(KEY_SIZE)


def encode_key(key: bytes) -> str:
    """The base64url text form of a key, as accepted by ``master_key`` and the environment."""
    _check_key(key)
    return base64.urlsafe_b64encode(key).decode("ascii")


def decode_key(text: str, *, source: str) -> bytes:
    """Parse a base64url (padding optional) 32-byte key; `source` names where it came from.

    The error never repeats the value: a mistyped key is still mostly a key.
    """
    cleaned = text.strip()
    try:
        key = base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        raise SecretError(
            f"{source} is not valid base64url text of {KEY_SIZE} bytes; make one with: "
            "python3 -c 'import base64, os; "
            "print(base64.urlsafe_b64encode(os.urandom(32)).decode())'"
        ) from None
    if len(key) != KEY_SIZE:
        raise SecretError(f"{source} must decode to {KEY_SIZE} bytes, got {len(key)}")
    return key


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise SecretError(f"a master key must be {KEY_SIZE} bytes, got {size}")


def _key_id_bytes(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_KEY_ID_SIZE]


def _split(token: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(header, key id, nonce, ciphertext) of a well-formed token, else `SecretError`."""
    if not isinstance(token, bytes | bytearray | memoryview):
        raise SecretError(f"a token must be bytes, got {type(token).__name__}")
    token = bytes(token)
    if len(token) < _HEADER_SIZE + _TAG_SIZE:
        raise SecretError(f"token is too short ({len(token)} bytes) to be an encrypted secret")
    if token[0] != TOKEN_VERSION:
        raise SecretError(
            f"token has format version {token[0]}, this NxMesh reads version {TOKEN_VERSION}"
        )
    header = token[:_HEADER_SIZE]
    return (
        header,
        token[1 : 1 + _KEY_ID_SIZE],
        token[1 + _KEY_ID_SIZE : _HEADER_SIZE],
        token[_HEADER_SIZE:],
    )


def token_key_id(token: bytes) -> str:
    """The hex id of the key that encrypted `token` (no key needed to read it)."""
    return _split(token)[1].hex()


# ---------------------------------------------------------------------------------------
# SecretBox: one key
# ---------------------------------------------------------------------------------------


class SecretBox:
    """Encrypts and decrypts tokens with one 32-byte key (AES-256-GCM, random nonces).

    Random 96-bit nonces are safe for far more secrets than a master will ever store
    (the bound is about 2**32 encryptions per key).
    """

    __slots__ = ("_aead", "_key_id")

    def __init__(self, key: bytes) -> None:
        _check_key(key)
        # Only the cipher object keeps the key; nothing on self can print it.
        self._aead = AESGCM(bytes(key))
        self._key_id = _key_id_bytes(bytes(key))

    @property
    def key_id(self) -> str:
        """Hex of the first 8 bytes of sha256(key): names the key, reveals nothing of it."""
        return self._key_id.hex()

    def __repr__(self) -> str:
        return f"SecretBox(key_id={self.key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would write the key somewhere nobody meant to; refuse loudly.
        raise TypeError("SecretBox holds key material and cannot be pickled")

    def encrypt(self, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        """Encrypt `plaintext`; the same `aad` must be given to `decrypt`."""
        nonce = os.urandom(_NONCE_SIZE)
        header = bytes([TOKEN_VERSION]) + self._key_id + nonce
        return header + self._aead.encrypt(nonce, bytes(plaintext), header + bytes(aad))

    def decrypt(self, token: bytes, *, aad: bytes = b"") -> bytes:
        """Decrypt a token made by `encrypt`; raise `SecretError` on a wrong key or tampering."""
        header, key_id, nonce, ciphertext = _split(token)
        if not hmac.compare_digest(key_id, self._key_id):
            raise SecretError(
                f"token was encrypted with key {key_id.hex()}, but the master key in use is "
                f"{self.key_id}: wrong master key, or the old key is missing from "
                "the keyring after a rotation"
            )
        try:
            return self._aead.decrypt(nonce, ciphertext, header + bytes(aad))
        except InvalidTag:
            raise SecretError(
                f"token failed authentication under key {self.key_id}: it was altered, "
                "or it belongs to another record (associated data differs)"
            ) from None


# ---------------------------------------------------------------------------------------
# MasterKeyring: rotation
# ---------------------------------------------------------------------------------------


class MasterKeyring:
    """The primary master key plus previous ones, so rotation never strands a secret.

    New tokens are always encrypted with `primary`; a token is decrypted with whichever
    key its key id names. After a rotation, `rewrap` every stored token for which
    `needs_rewrap` is true; once none remain, the previous keys can be dropped.
    """

    __slots__ = ("_boxes", "_primary")

    def __init__(self, primary: bytes, previous: Sequence[bytes] = ()) -> None:
        self._primary = SecretBox(primary)
        self._boxes: dict[str, SecretBox] = {self._primary.key_id: self._primary}
        for key in previous:
            box = SecretBox(key)
            self._boxes.setdefault(box.key_id, box)

    @property
    def key_id(self) -> str:
        """The id of the primary key, the one new tokens are encrypted with."""
        return self._primary.key_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every key in the ring, primary first."""
        return tuple(self._boxes)

    @property
    def primary(self) -> SecretBox:
        """The box of the primary key."""
        return self._primary

    def __repr__(self) -> str:
        return f"MasterKeyring(primary={self.key_id!r}, previous={list(self.key_ids[1:])!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("MasterKeyring holds key material and cannot be pickled")

    def encrypt(self, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        """Encrypt with the primary key."""
        return self._primary.encrypt(plaintext, aad=aad)

    def decrypt(self, token: bytes, *, aad: bytes = b"") -> bytes:
        """Decrypt with the key the token names; `SecretError` when that key is not here."""
        key_id = token_key_id(token)
        box = self._boxes.get(key_id)
        if box is None:
            known = ", ".join(self.key_ids)
            raise SecretError(
                f"token was encrypted with key {key_id}, which is not in the keyring "
                f"(keys: {known}); add that key as a previous master key to read it "
                "(previous_master_keys or previous_master_key_files)"
            )
        return box.decrypt(token, aad=aad)

    def needs_rewrap(self, token: bytes) -> bool:
        """True when `token` was not encrypted with the primary key."""
        return not hmac.compare_digest(token_key_id(token), self.key_id)

    def rewrap(self, token: bytes, *, aad: bytes = b"") -> bytes:
        """The same secret encrypted under the primary key (unchanged tokens are kept as is)."""
        if not self.needs_rewrap(token):
            # Still authenticate it: a rewrap pass doubles as an integrity check.
            self._primary.decrypt(token, aad=aad)
            return bytes(token)
        return self._primary.encrypt(self.decrypt(token, aad=aad), aad=aad)


# ---------------------------------------------------------------------------------------
# Private files and the master key's sources
# ---------------------------------------------------------------------------------------


def load_master_key(
    *, setting: str = "", env: Mapping[str, str] | None = None, key_file: Path
) -> bytes:
    """The master key, from the first source that has one.

    1. `setting`: the ``master_key`` setting value (base64url of 32 bytes);
    2. ``NXMESH_MASTER_KEY`` in `env` (default `os.environ`), also base64url;
    3. `key_file`: 32 raw bytes (base64url text is accepted too). Created on first start
       with a fresh random key, mode 0600, missing parent directories 0700. An existing
       file that its group or other users can read is refused.

    :raises SecretError: a malformed value, or an unsafe or unreadable key file; the
        message names the source and never contains the value.
    """
    if setting:
        key = decode_key(setting, source="the master_key setting")
        _log.debug("master key loaded", source="setting", key_id=SecretBox(key).key_id)
        return key
    environ = os.environ if env is None else env
    if environ.get(MASTER_KEY_ENV):
        key = decode_key(environ[MASTER_KEY_ENV], source=MASTER_KEY_ENV)
        _log.debug("master key loaded", source="environment", key_id=SecretBox(key).key_id)
        return key
    if not key_file.exists():
        key = generate_key()
        if write_private_file(key_file, key):
            _log.info(
                "master key created",
                key_file=str(key_file),
                key_id=SecretBox(key).key_id,
                hint="back this file up: secrets encrypted with it are lost without it",
            )
            return key
        # Another process created it first: fall through and use theirs.
    key = _read_key_file(key_file, what="master key file")
    _log.debug(
        "master key loaded", source="file", key_file=str(key_file), key_id=SecretBox(key).key_id
    )
    return key


def _read_key_file(path: Path, *, what: str) -> bytes:
    """A key from `path`: 32 raw bytes or their base64url text; the file must be private."""
    data = read_private_file(path, what=what)
    if len(data) == KEY_SIZE:
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SecretError(
            f"{what} {path} holds {len(data)} bytes; expected {KEY_SIZE} raw "
            "bytes or their base64url text"
        ) from None
    return decode_key(text, source=f"{what} {path}")


def load_previous_master_keys(
    values: Sequence[str] = (), files: Sequence[Path] = ()
) -> list[bytes]:
    """The previous master keys of a rotation: the ``previous_master_keys`` setting
    (base64url values) and the ``previous_master_key_files`` (like the master key file,
    but never created). For `MasterKeyring`'s `previous`.

    :raises SecretError: a malformed value (named by its position, never shown), or a
        missing, unsafe or malformed file.
    """
    keys = [
        decode_key(value, source=f"previous_master_keys[{i}]") for i, value in enumerate(values)
    ]
    for path in files:
        if not path.is_file():
            raise SecretError(f"previous master key file {path} does not exist")
        keys.append(_read_key_file(path, what="previous master key file"))
    if keys:
        _log.info("previous master keys loaded", key_ids=[SecretBox(k).key_id for k in keys])
    return keys
