"""Built-in password authenticator for the master API (``auth.chain`` name ``password``).

Recognises ``password`` credentials (``username`` + ``password``, sent to
``POST /api/v1/auth/login``) and checks them against the argon2id hashes of the users in
the master's storage.

* **Lockout with backoff** per user *and* client address: after ``auth.lockout_threshold``
  failures in a row every attempt is refused for a delay that doubles with each further
  failure (``lockout_base_delay`` … ``lockout_max_delay``). Failures from one address are
  also counted over all usernames (``lockout_address_threshold``, against spraying many
  names). Attempts count as failures
  from the moment they start, so a burst of parallel guesses cannot slip past the limit.
  A success resets the counter. The counters live in the master's storage when it
  provides the two optional methods ``count_login_failure`` and ``clear_login_failures``
  (`nxmesh.sql.backend.SqlStorage` does: SQLite and PostgreSQL), so every master on one
  database shares them and a restart keeps a lockout; with other backends they live in
  the master process (`Lockout`). Times are wall-clock (epoch) seconds.
* **Constant-time for unknown users**: a username that does not exist (or is disabled)
  still costs one full argon2 verification, against a dummy hash, and gets the same answer
  as a wrong password — timing and wording never reveal which usernames exist. A user
  whose hash has older (cheaper) costs is checked beside such a dummy, for the same
  reason (`Passwords.verify_in_thread`), until its next successful login upgrades the
  hash.
* A hash made with older argon2 costs is upgraded on the next successful login.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, cast

import attrs
import structlog

from nxmesh import hookimpl
from nxmesh.core.interfaces import Authenticator, Credentials, Principal
from nxmesh.core.settings import AuthSettings
from nxmesh.master.auth.errors import AuthenticationError, LockedOutError

if TYPE_CHECKING:
    from nxmesh.core.interfaces import StorageBackend
    from nxmesh.master.app import MasterServices
    from nxmesh.master.auth.passwords import Passwords

__all__ = ["ANY_USER", "Lockout", "LoginFailureStore", "PasswordAuthenticator", "SharedLockout"]

log = structlog.get_logger("nxmesh.auth.password")

ANY_USER = "*"
"""The username under which failures per client address are counted (no user has it)."""


@attrs.define
class _Attempts:
    failures: int = 0
    locked_until: float = 0.0
    last: float = 0.0


class Lockout:
    """Failure counters per key (user, address) with exponential backoff once locked."""

    def __init__(
        self,
        *,
        threshold: int,
        base_delay: float,
        max_delay: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
    ) -> None:
        self.threshold = threshold
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.max_entries = max_entries
        self._state: OrderedDict[tuple[str, str], _Attempts] = OrderedDict()

    @property
    def forget_after(self) -> float:
        """Failures older than this many quiet seconds are forgotten."""
        return 2 * self.max_delay

    def begin(self, key: tuple[str, str]) -> None:
        """Count an attempt as failed until `succeeded` says otherwise.

        :raises LockedOutError: the key is locked; nothing is counted.
        """
        now = self.clock()
        entry = self._state.get(key)
        if entry is not None and now - entry.last > self.forget_after:
            entry = None  # long quiet: forget old failures
        if entry is None:
            entry = _Attempts()
        if entry.locked_until > now:
            raise LockedOutError(entry.locked_until - now)
        entry.failures += 1
        entry.last = now
        if entry.failures >= self.threshold:
            exponent = min(entry.failures - self.threshold, 32)
            entry.locked_until = now + min(self.max_delay, self.base_delay * 2**exponent)
        self._state[key] = entry
        self._state.move_to_end(key)
        while len(self._state) > self.max_entries:  # bounded memory under a spray attack
            self._state.popitem(last=False)

    def succeeded(self, key: tuple[str, str]) -> None:
        """Forget the key's failures after a successful login."""
        self._state.pop(key, None)

    def failures(self, key: tuple[str, str]) -> int:
        entry = self._state.get(key)
        return 0 if entry is None else entry.failures


class LoginFailureStore(Protocol):
    """The optional storage methods that make the lockout shared (see `SqlStorage`)."""

    async def count_login_failure(
        self,
        username: str,
        remote_addr: str,
        *,
        now: float,
        threshold: int,
        base_delay: float,
        max_delay: float,
        forget_after: float,
    ) -> tuple[bool, int, float]: ...

    async def clear_login_failures(self, username: str, remote_addr: str) -> None: ...


class SharedLockout:
    """`Lockout`'s policy with the counters in storage, shared by every master on it.

    Each attempt is one atomic statement in the database (check the lock, count, lock),
    so parallel attempts on several masters count exactly.
    """

    def __init__(self, store: LoginFailureStore, policy: Lockout) -> None:
        self.store = store
        self.policy = policy

    async def begin(self, key: tuple[str, str]) -> None:
        """Count an attempt as failed until `succeeded` says otherwise.

        :raises LockedOutError: the key is locked; nothing is counted.
        """
        now = self.policy.clock()
        counted, _, locked_until = await self.store.count_login_failure(
            *key,
            now=now,
            threshold=self.policy.threshold,
            base_delay=self.policy.base_delay,
            max_delay=self.policy.max_delay,
            forget_after=self.policy.forget_after,
        )
        if not counted:
            raise LockedOutError(locked_until - now)

    async def succeeded(self, key: tuple[str, str]) -> None:
        """Forget the key's failures after a successful login."""
        await self.store.clear_login_failures(*key)


class _ProcessLockout:
    """`Lockout` (this process's counters) behind `SharedLockout`'s async interface."""

    def __init__(self, policy: Lockout) -> None:
        self.policy = policy

    async def begin(self, key: tuple[str, str]) -> None:
        self.policy.begin(key)

    async def succeeded(self, key: tuple[str, str]) -> None:
        self.policy.succeeded(key)


class PasswordAuthenticator:
    """Username + password against the users in storage (argon2id)."""

    name: ClassVar[str] = "password"

    def __init__(
        self,
        storage: StorageBackend,
        passwords: Passwords,
        settings: AuthSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        cfg = settings or AuthSettings()
        self.storage = storage
        self.passwords = passwords
        self.lockout = Lockout(
            threshold=cfg.lockout_threshold,
            base_delay=cfg.lockout_base_delay,
            max_delay=cfg.lockout_max_delay,
            clock=clock,
        )
        # Per address over every username: spraying fresh names from one address never
        # trips the per-user counter.
        self.address_lockout = Lockout(
            threshold=cfg.lockout_address_threshold,
            base_delay=cfg.lockout_base_delay,
            max_delay=cfg.lockout_max_delay,
            clock=clock,
        )
        self.shared: SharedLockout | None = None
        self._gate: SharedLockout | _ProcessLockout
        self._address_gate: SharedLockout | _ProcessLockout
        if callable(getattr(storage, "count_login_failure", None)) and callable(
            getattr(storage, "clear_login_failures", None)
        ):
            # Where attempts are counted: the storage shared by every master when it can,
            # else this process.
            store = cast("LoginFailureStore", storage)
            self.shared = SharedLockout(store, self.lockout)
            self._gate = self.shared
            self._address_gate = SharedLockout(store, self.address_lockout)
        else:
            self._gate = _ProcessLockout(self.lockout)
            self._address_gate = _ProcessLockout(self.address_lockout)

    @classmethod
    def from_services(cls, services: MasterServices) -> PasswordAuthenticator:
        return cls(services.storage, services.auth.passwords, services.settings.auth)

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        if credentials.scheme != "password":
            return None
        username = credentials.values.get("username", "")
        password = credentials.values.get("password", "")
        key = (username, credentials.remote_addr or "")
        # ANY_USER is no valid username, so the address's counter has a row of its own.
        address_key = (ANY_USER, key[1])
        await self._address_gate.begin(address_key)
        await self._gate.begin(key)
        user = await self.storage.get_user(username) if username else None
        if user is None:
            await self.passwords.dummy_verify_in_thread()
            ok = False
        else:  # at today's cost whatever costs the hash was made with (`verify_in_thread`)
            ok = await self.passwords.verify_in_thread(user.password_hash, password)
            ok = ok and not user.disabled
        if ok and user is not None:
            # The check took a while: a user disabled, removed or given another password
            # meanwhile is refused as it would be now (its sessions were just ended).
            now = await self.storage.get_user(username)
            ok = now is not None and not now.disabled and now.password_hash == user.password_hash
        if not ok or user is None:
            log.info("login failed", username=username, remote_addr=credentials.remote_addr)
            raise AuthenticationError("invalid username or password", reason="bad_password")
        await self._gate.succeeded(key)
        await self._address_gate.succeeded(address_key)
        if self.passwords.needs_rehash(user.password_hash):
            # Imported here: argon2 stays out of processes that load this plugin and never
            # check a password (agents).
            from nxmesh.master.auth.passwords import replace_hash

            new_hash = await self.passwords.hash_in_thread(password)
            # Only the hash, and only if unchanged (`replace_hash`): never the stale record.
            await replace_hash(self.storage, user.username, user.password_hash, new_hash)
        return Principal(subject=user.username, roles=tuple(user.roles), authenticator=self.name)


@hookimpl
def nxmesh_register_authenticators() -> Sequence[type[Authenticator]]:
    return [PasswordAuthenticator]
