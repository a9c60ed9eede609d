"""Password hashing with argon2id (``argon2-cffi``), and the initial admin password.

Costs come from the ``[auth]`` settings (RFC 9106's low-memory profile by default). A
hash made with older costs still verifies; `Passwords.needs_rehash` tells the login path
to upgrade it. `Passwords.dummy_verify` burns the same time as a real check, so a login
for a user that does not exist cannot be told apart by its timing.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import TYPE_CHECKING, Protocol

import anyio
import argon2
import attrs
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.settings import AuthSettings

if TYPE_CHECKING:
    from nxmesh.core.records import User

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "Passwords",
    "check_password_policy",
    "generate_password",
    "replace_hash",
]

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
"""Longer inputs are refused before hashing: argon2 over megabytes is a cheap DoS."""


def generate_password() -> str:
    """A random password of 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def check_password_policy(password: str, *, path: str = "password") -> None:
    """Raise `ValidationError` naming `path` when `password` is too short or too long."""
    if len(password) < MIN_PASSWORD_LENGTH:
        message = f"must be at least {MIN_PASSWORD_LENGTH} characters long"
        raise ValidationError([Problem(path, message)])
    if len(password) > MAX_PASSWORD_LENGTH:
        message = f"must be at most {MAX_PASSWORD_LENGTH} characters long"
        raise ValidationError([Problem(path, message)])


class Passwords:
    """argon2id hashing and verification with the configured costs (thread-safe, blocking)."""

    def __init__(self, settings: AuthSettings | None = None) -> None:
        cfg = settings or AuthSettings()
        self._hasher = argon2.PasswordHasher(
            time_cost=cfg.argon2_time_cost,
            memory_cost=cfg.argon2_memory_kib,
            parallelism=cfg.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self._dummy: str | None = None
        # Each hash or verification holds `argon2_memory_kib` (64 MiB by default) while
        # it runs: a burst of logins must queue, not take the master's memory.
        self._limiter = anyio.CapacityLimiter(cfg.argon2_concurrency)

    async def hash_in_thread(self, password: str) -> str:
        """`hash` in a worker thread, at most ``auth.argon2_concurrency`` at once."""
        return await anyio.to_thread.run_sync(self.hash, password, limiter=self._limiter)

    async def verify_in_thread(self, password_hash: str, password: str) -> bool:
        """`verify` in a worker thread, at most ``auth.argon2_concurrency`` at once.

        A hash made with other (older, cheaper) costs verifies faster than
        `dummy_verify`, which answers for users that do not exist: a dummy runs beside
        it, so the answer takes today's time either way until the hash is upgraded.
        """
        if not self.needs_rehash(password_hash):
            return await anyio.to_thread.run_sync(
                self.verify, password_hash, password, limiter=self._limiter
            )
        verdict = False

        async def check() -> None:
            nonlocal verdict
            verdict = await anyio.to_thread.run_sync(
                self.verify, password_hash, password, limiter=self._limiter
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(self.dummy_verify_in_thread)
            tg.start_soon(check)
        return verdict

    async def dummy_verify_in_thread(self) -> None:
        """`dummy_verify` in a worker thread, at most ``auth.argon2_concurrency`` at once."""
        await anyio.to_thread.run_sync(self.dummy_verify, limiter=self._limiter)

    def hash(self, password: str) -> str:
        """The argon2id PHC string of `password` (random salt)."""
        return self._hasher.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        """True when `password` matches; False for a mismatch or a malformed hash."""
        if len(password) > MAX_PASSWORD_LENGTH:
            self.dummy_verify()
            return False
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def dummy_verify(self) -> None:
        """Spend the time of one verification against a hash nobody knows the password of."""
        if self._dummy is None:
            self._dummy = self._hasher.hash(secrets.token_hex(16))
        with contextlib.suppress(VerificationError):
            self._hasher.verify(self._dummy, "x" * 16)

    def needs_rehash(self, password_hash: str) -> bool:
        """True when `password_hash` was made with other costs than the configured ones."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True


class _HashStore(Protocol):
    async def get_user(self, username: str) -> User | None: ...
    async def put_user(self, user: User) -> None: ...


async def replace_hash(storage: _HashStore, username: str, old_hash: str, new_hash: str) -> bool:
    """Set the password hash of `username` to `new_hash` if it is still `old_hash`,
    changing nothing else; False when the user is gone or its hash changed meanwhile.

    A new hash takes an argon2 computation (a fifth of a second by default): writing back
    the user record read before it would undo what an admin changed meanwhile (disabled,
    other roles, deleted, another password). Storage with ``replace_password_hash``
    (`SqlStorage`) does it in one statement; other backends re-read the user first, which
    leaves a window of one read and one write instead of the whole computation.
    """
    swap = getattr(storage, "replace_password_hash", None)
    if swap is not None:
        return bool(await swap(username, old_hash, new_hash))
    user = await storage.get_user(username)
    if user is None or user.password_hash != old_hash:
        return False
    await storage.put_user(attrs.evolve(user, password_hash=new_hash))
    return True
