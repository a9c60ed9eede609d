"""The agent's local cache: what it runs, so it can run it again without the master.

Layout of the state directory (``<state_dir>/agent``, mode 0700, every file 0600)::

    cache.key          32 random bytes: the HMAC key sealing the entries below
    last_good.json     the last bundle that was applied *and confirmed serving*
    desired.json       the newest update received (may not have applied yet)
    master.pub         optional: the master's Ed25519 public key (PEM)

An entry is one JSON document holding the update (version, digest, signature, key id,
the version's signed metadata, desired state), the rendered bundle (base64 per file)
and its digest, sealed with an HMAC-SHA256 over its canonical JSON. One file per entry
makes the write atomic with a plain temp file + fsync + rename: there is no moment where
the state and the bundle of an entry disagree.

`AgentCache.load_verified` refuses an entry that fails *any* check: the seal (someone
edited the file), the state digest, the bundle digest, or the master's signature when
the agent knows the master's key. The agent never boots nginx from a refused entry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
import structlog

from nxmesh.agent.fsutil import atomic_write, make_private_dir, private_random_file
from nxmesh.agent.verify import verify_update
from nxmesh.core.bundle import Bundle
from nxmesh.core.errors import NxMeshError, ValidationError
from nxmesh.core.model import PendingApply
from nxmesh.core.serialization import canonical_json, structure_state, unstructure
from nxmesh.crypto.errors import SecretError

if TYPE_CHECKING:
    from nxmesh.crypto.signing import VerifyKey

__all__ = ["CACHE_FORMAT", "AgentCache", "CacheEntry", "CacheError"]

log = structlog.get_logger("nxmesh.agent.cache")

CACHE_FORMAT = 1
Source = Literal["master", "file"]
Slot = Literal["last_good", "desired"]


class CacheError(NxMeshError):
    """A cache entry failed verification or could not be read."""


@attrs.frozen
class CacheEntry:
    """One cached update, the bundle it rendered to and where it came from."""

    update: PendingApply
    bundle: Bundle
    source: Source = "master"
    saved_at: float = attrs.field(factory=time.time)


class AgentCache:
    """Read and write the agent's cache entries in `directory` (created 0700)."""

    KEY_FILE = "cache.key"
    MASTER_KEY_FILE = "master.pub"

    def __init__(
        self,
        directory: Path,
        *,
        verify_key: VerifyKey | None = None,
        require_signature: bool = False,
    ) -> None:
        self.directory = directory
        self.require_signature = require_signature
        self._verify_key = verify_key
        self._key: bytes | None = None
        self.last_error: str | None = None

    # -- keys ---------------------------------------------------------------------------

    @property
    def verify_key(self) -> VerifyKey | None:
        """The master's key: the one given, else ``master.pub`` in the cache directory."""
        if self._verify_key is None:
            path = self.directory / self.MASTER_KEY_FILE
            try:
                pem = path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise CacheError(f"cannot load the master's key {path}: {exc}") from exc
            # Imported only with a pinned key: a masterless agent never loads cryptography.
            from nxmesh.crypto.signing import SigningError, VerifyKey

            try:
                self._verify_key = VerifyKey.from_pem(pem)
            except SigningError as exc:
                raise CacheError(f"cannot load the master's key {path}: {exc}") from exc
        return self._verify_key

    def pin_master_key(self, key: VerifyKey) -> bool:
        """Trust `key` from now on: write ``master.pub`` and require signed master entries.

        Called when the agent enrolls (the master hands its key over the authenticated
        session). Returns True when the pinned key changed.
        """
        current = None
        try:
            current = self.verify_key
        except CacheError:
            current = None
        changed = current != key
        if changed:
            make_private_dir(self.directory)
            path = self.directory / self.MASTER_KEY_FILE
            atomic_write(path, key.public_key_pem().encode("ascii"), mode=0o600)
        self._verify_key = key
        self.require_signature = True
        return changed

    def _seal_key(self) -> bytes:
        if self._key is None:
            make_private_dir(self.directory)
            path = self.directory / self.KEY_FILE
            try:
                key = private_random_file(path, 32)
            except (OSError, SecretError) as exc:
                raise CacheError(f"cannot use the agent cache key: {exc}") from exc
            if len(key) != 32:
                raise CacheError(f"agent cache key {path} is damaged (not 32 bytes)")
            self._key = key
        return self._key

    def _mac(self, body: bytes) -> str:
        return hmac.new(self._seal_key(), body, hashlib.sha256).hexdigest()

    # -- writing ------------------------------------------------------------------------

    def path(self, slot: Slot) -> Path:
        return self.directory / f"{slot}.json"

    def save(self, slot: Slot, entry: CacheEntry) -> None:
        """Write `entry` into `slot` atomically (temp + fsync + rename + dir fsync)."""
        body = canonical_json(_body(entry))
        document = json.dumps({"mac": self._mac(body), "entry": json.loads(body)})
        make_private_dir(self.directory)
        atomic_write(self.path(slot), document.encode(), mode=0o600)

    def save_last_good(self, entry: CacheEntry) -> None:
        self.save("last_good", entry)

    def save_desired(self, entry: CacheEntry) -> None:
        self.save("desired", entry)

    # -- reading ------------------------------------------------------------------------

    def load(self, slot: Slot) -> CacheEntry:
        """The entry in `slot`; `CacheError` saying why when it is missing or fails a check."""
        path = self.path(slot)
        try:
            document = json.loads(path.read_bytes())
            mac, raw = document["mac"], document["entry"]
        except FileNotFoundError:
            raise CacheError(f"no cached {slot} entry ({path})") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"cache entry {path} is unreadable: {exc}") from None
        if stat_mode_too_open(path):
            raise CacheError(f"cache entry {path} is accessible by other users; refusing it")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(canonical_json(raw))):
            raise CacheError(f"cache entry {path} was modified outside the agent (bad seal)")
        entry = _entry(raw, path)
        problem = verify_update(
            entry.update,
            self.verify_key,
            require_signature=self.require_signature and entry.source == "master",
        )
        if problem:
            raise CacheError(f"cache entry {path} fails verification: {problem}")
        return entry

    def load_verified(self, slot: Slot = "last_good") -> CacheEntry | None:
        """The entry in `slot` when it passes every check, else None (reason in `last_error`)."""
        try:
            entry = self.load(slot)
        except CacheError as exc:
            self.last_error = str(exc)
            if self.path(slot).exists():
                log.warning("refusing cache entry", slot=slot, reason=str(exc))
            return None
        self.last_error = None
        return entry


def stat_mode_too_open(path: Path) -> bool:
    """True when a cache file is readable or writable by group or others."""
    return bool(path.stat().st_mode & 0o077)


def _body(entry: CacheEntry) -> dict[str, Any]:
    update = entry.update
    return {
        "format": CACHE_FORMAT,
        "source": entry.source,
        "saved_at": entry.saved_at,
        "version": update.version,
        "digest": update.digest,
        "signature": update.signature,
        "key_id": update.key_id,
        "parent_digest": update.parent_digest,
        "author": update.author,
        "message": update.message,
        "created_at": update.created_at,
        "state": unstructure(update.state),
        "bundle_digest": entry.bundle.digest,
        "files": {p: base64.b64encode(d).decode("ascii") for p, d in entry.bundle.files.items()},
    }


def _entry(raw: Any, path: Path) -> CacheEntry:
    try:
        fmt, source = raw["format"], raw["source"]
        files = {p: base64.b64decode(d, validate=True) for p, d in raw["files"].items()}
        bundle = Bundle(files)
        update = PendingApply(
            version=int(raw["version"]),
            digest=str(raw["digest"]),
            state=structure_state(raw["state"], source=str(path)),
            signature=str(raw["signature"]),
            key_id=str(raw["key_id"]),
            # The version's signed metadata (entries of older agents lack it: unsigned).
            parent_digest=raw.get("parent_digest"),
            author=str(raw.get("author", "")),
            message=str(raw.get("message", "")),
            created_at=float(raw.get("created_at", 0.0)),
        )
        saved_at = float(raw["saved_at"])
        recorded_digest = str(raw["bundle_digest"])
    except (KeyError, TypeError, ValueError, binascii.Error, ValidationError) as exc:
        raise CacheError(f"cache entry {path} is malformed: {exc}") from None
    if fmt != CACHE_FORMAT:
        raise CacheError(f"cache entry {path} has unknown format {fmt!r}")
    if source not in ("master", "file"):
        raise CacheError(f"cache entry {path} has unknown source {source!r}")
    if not hmac.compare_digest(bundle.digest, recorded_digest):
        raise CacheError(f"cache entry {path}: bundle files do not match their digest")
    return CacheEntry(update=update, bundle=bundle, source=source, saved_at=saved_at)
