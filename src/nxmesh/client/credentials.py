"""Where the CLI keeps its logins: ``~/.config/nxmesh/credentials.json``, mode 0600.

The file holds one `Profile` per name (``default`` unless ``--profile`` says otherwise):
the master's URL and either a login session (access token, refresh token, their expiry
times) or an API token for automation. Passwords are never stored.

The directory is ``$XDG_CONFIG_HOME/nxmesh`` (``~/.config/nxmesh`` when unset);
``NXMESH_TEST_CONFIG_HOME`` replaces ``XDG_CONFIG_HOME`` for tests, so a test never
touches the real home directory and nothing else reading ``XDG_CONFIG_HOME`` is affected.

Writes are atomic (temp file + rename) and the file is created 0600 in a 0700 directory;
a credentials file other users can read is refused, like ssh refuses such a key. Refresh
tokens are single-use — presenting a spent one again revokes the whole session — so two
``nxmesh`` processes refreshing at once must not both spend the same token: `locked`
serialises refreshes across processes with an ``flock`` on a lock file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from nxmesh.client.errors import EXIT_USAGE, ClientError
from nxmesh.crypto.secrets import SecretError, read_private_file, write_private_file

__all__ = [
    "CREDENTIALS_FILE",
    "DEFAULT_PROFILE",
    "ENV_CONFIG_HOME",
    "CredentialStore",
    "CredentialsError",
    "Profile",
    "config_dir",
]

ENV_CONFIG_HOME: Final = "NXMESH_TEST_CONFIG_HOME"
"""Replaces ``XDG_CONFIG_HOME`` for the CLI's files (``NXMESH_TEST_`` is not a setting)."""
CREDENTIALS_FILE: Final = "credentials.json"
DEFAULT_PROFILE: Final = "default"
_FORMAT: Final = 1
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CredentialsError(ClientError):
    """The credentials file cannot be used (unreadable, readable by others, corrupt), or a
    profile name is invalid: a local configuration problem, so a usage error (exit 2)."""

    exit_code = EXIT_USAGE


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$NXMESH_TEST_CONFIG_HOME/nxmesh``, else ``$XDG_CONFIG_HOME/nxmesh``, else
    ``~/.config/nxmesh`` (a relative ``XDG_CONFIG_HOME`` is ignored, as the spec says)."""
    env = os.environ if environ is None else environ
    for var in (ENV_CONFIG_HOME, "XDG_CONFIG_HOME"):
        value = env.get(var, "")
        if value and Path(value).is_absolute():
            return Path(value) / "nxmesh"
    return Path.home() / ".config" / "nxmesh"


def check_profile_name(name: str) -> str:
    """`name` when it is a usable profile name; `CredentialsError` otherwise."""
    if not _PROFILE_NAME.fullmatch(name):
        raise CredentialsError(
            f"profile name {name!r} is invalid: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


@attrs.frozen(kw_only=True)
class Profile:
    """One master and how to authenticate to it. Secrets stay out of ``repr``."""

    url: str
    username: str | None = None
    access_token: str | None = attrs.field(default=None, repr=False)
    access_expires_at: float | None = None
    refresh_token: str | None = attrs.field(default=None, repr=False)
    refresh_expires_at: float | None = None
    api_token: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    """PEM CA bundle an ``https://`` master's certificate is verified with (else the system's)."""

    @property
    def kind(self) -> Literal["session", "api_token", "none"]:
        """How requests authenticate: a login session, an API token, or not at all."""
        if self.api_token:
            return "api_token"
        if self.refresh_token or self.access_token:
            return "session"
        return "none"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: object, *, where: str) -> Profile:
        if not isinstance(data, Mapping) or not isinstance(data.get("url"), str):
            raise CredentialsError(f"{where}: not a profile (no 'url'); run nxmesh login again")
        known = {f.name for f in attrs.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CredentialsError(f"{where}: {exc}; run nxmesh login again") from None


@attrs.define
class CredentialStore:
    """The credentials file: profiles by name, read and written whole."""

    path: Path

    @classmethod
    def default(cls, environ: Mapping[str, str] | None = None) -> CredentialStore:
        """The store in the user's config directory (see `config_dir`)."""
        return cls(config_dir(environ) / CREDENTIALS_FILE)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": _FORMAT, "profiles": {}}
        try:
            raw = read_private_file(self.path, what="credentials file")
        except SecretError as exc:
            raise CredentialsError(str(exc)) from None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
            raise CredentialsError(
                f"credentials file {self.path} is corrupt; delete it and run nxmesh login"
            )
        return data

    def _write(self, data: Mapping[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        try:
            write_private_file(self.path, text.encode(), replace=True)
        except OSError as exc:
            raise CredentialsError(
                f"cannot write credentials file {self.path}: {exc.strerror or exc}"
            ) from None

    def profiles(self) -> dict[str, Profile]:
        """Every stored profile by name."""
        data = self._read()
        return {
            name: Profile.from_json(value, where=f"{self.path} profile {name!r}")
            for name, value in data["profiles"].items()
        }

    def get(self, name: str) -> Profile | None:
        """The profile `name`, or None when there is none."""
        value = self._read()["profiles"].get(check_profile_name(name))
        if value is None:
            return None
        return Profile.from_json(value, where=f"{self.path} profile {name!r}")

    def put(self, name: str, profile: Profile) -> None:
        """Store (or replace) the profile `name`."""
        data = self._read()
        data["format"] = _FORMAT
        data["profiles"][check_profile_name(name)] = profile.to_json()
        self._write(data)

    def remove(self, name: str) -> bool:
        """Forget the profile `name`; False when there was none."""
        data = self._read()
        if data["profiles"].pop(check_profile_name(name), None) is None:
            return False
        self._write(data)
        return True

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock (across processes) for a read-refresh-write cycle."""
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            write_private_file(lock_path, b"")  # creates the 0700 directory too
            fd = os.open(lock_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CredentialsError(
                f"cannot lock credentials file {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
