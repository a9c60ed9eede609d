"""The master's ACME client (RFC 8555), on certbot's ``acme`` library.

`AcmeClient` registers an account, orders certificates, answers HTTP-01 or DNS-01
challenges through a `ChallengeSolver`, finalises the order with a *fresh* private key
per certificate (ECDSA P-256 unless ``key_type`` says otherwise), downloads the chain and
revokes. The ``acme`` library is synchronous (``requests``), so every call runs in a
worker thread through ``anyio.to_thread``: the client works on asyncio and trio, and
polling sleeps with ``anyio.sleep`` so a cancelled issuance stops promptly.

Errors are mapped to `nxmesh.certs.errors` (`AcmeRateLimitedError` with the CA's
``Retry-After``, `AcmeOrderError`, `AcmeChallengeError` naming each failed domain and
the CA's reason...). Private keys never reach a log line or an exception.

The account key is an EC P-256 key stored *encrypted* with the master keyring in a 0600
file (`AccountKeyFile`); registering again with the same key finds the same account.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.to_thread
import attrs
import requests
import structlog
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import crypto_util, messages
from acme import errors as acme_errors
from acme.client import ClientV2 as Client
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import errors as jose_errors
from josepy.jwa import ES256, RS256
from josepy.jwk import JWK, JWKEC

from nxmesh.certs.errors import (
    ACME_ERROR_PREFIX,
    AcmeAccountError,
    AcmeChallengeError,
    AcmeConnectionError,
    AcmeError,
    AcmeOrderError,
    AcmeRateLimitedError,
    AcmeTimeoutError,
    ChallengeFailure,
)
from nxmesh.certs.settings import CertsSettings, KeyType, certs_settings
from nxmesh.certs.validate import certificate_domains, fingerprint, load_pem_chain, pem, uncovered
from nxmesh.core.records import StoredCertificate
from nxmesh.crypto.secrets import (
    MasterKeyring,
    SecretError,
    read_private_file,
    write_private_file,
)

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings

__all__ = [
    "ACCOUNT_KEY_DIR",
    "AccountKeyFile",
    "AcmeAccount",
    "AcmeClient",
    "AcmeIssuer",
    "ChallengeSolver",
    "IssuedCertificate",
    "PendingChallenge",
    "account_key_path",
    "generate_private_key",
    "normalize_domains",
    "open_acme_client",
    "rewrap_account_keys",
]

ACCOUNT_KEY_DIR = "acme"
"""Directory under the master's state dir holding the encrypted ACME account keys."""

T = TypeVar("T")
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

log = structlog.get_logger("nxmesh.certs.acme")

_ACCOUNT_CODES = frozenset(
    {
        "accountDoesNotExist",
        "agreementRequired",
        "externalAccountRequired",
        "invalidContact",
        "unsupportedContact",
        "userActionRequired",
    }
)
_ORDER_CODES = frozenset(
    {
        "badCSR",
        "caa",
        "dns",
        "malformed",
        "orderNotReady",
        "rejectedIdentifier",
        "unsupportedIdentifier",
        "badSignatureAlgorithm",
        "badPublicKey",
        "compound",
    }
)
_MAX_RETRY_AFTER_POLL = 10.0


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------


def generate_private_key(key_type: KeyType = "ec-p256") -> PrivateKey:
    """A new private key for one certificate: ``ec-p256`` (default), ``ec-p384``, ``rsa-N``."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    bits = int(key_type.removeprefix("rsa-"))
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def account_key_path(settings: Settings, certs: CertsSettings) -> Path:
    """Where the account key for ``certs.acme_directory`` lives (unless configured).

    One file per directory URL, so switching from staging to production does not reuse
    (or clobber) the other CA's account.
    """
    if certs.account_key_file is not None:
        return certs.account_key_file
    tag = hashlib.sha256(certs.acme_directory.encode()).hexdigest()[:16]
    return settings.state_dir / ACCOUNT_KEY_DIR / f"account-{tag}.key"


@attrs.define
class AccountKeyFile:
    """The ACME account key, encrypted with the master keyring in a 0600 file.

    The file holds a keyring token (AES-256-GCM) of the key's PKCS#8 DER, bound to the
    ACME directory URL (associated data): a key file copied to another CA's
    configuration fails to decrypt instead of registering a second account with it.
    The URL (not secret) is kept beside it in ``<file>.directory``, so a master-key
    rotation can re-encrypt the keys of CAs no longer configured (`rewrap_account_keys`).
    """

    path: Path
    keyring: MasterKeyring = attrs.field(repr=False)
    directory_url: str

    @property
    def _aad(self) -> bytes:
        return b"nxmesh:acme-account-key:" + self.directory_url.encode()

    @property
    def directory_file(self) -> Path:
        return directory_file_of(self.path)

    def _remember_directory(self) -> None:
        # Best effort: a configured key file may sit on a read-only mount (a Kubernetes
        # secret); the key still serves, and a rotation rewraps the configured CA's key
        # without the URL file (`rewrap_account_keys`).
        if self.directory_file.exists():
            return
        try:
            write_private_file(self.directory_file, self.directory_url.encode(), replace=True)
        except OSError as exc:
            log.warning("acme directory URL not saved beside the account key; a master-key "
                        "rotation cannot re-encrypt this key once another CA is configured",
                        directory_file=str(self.directory_file),
                        error=exc.strerror or str(exc))  # fmt: skip

    def load_or_create(self) -> JWK:
        """The account key; created (EC P-256) on first use. Blocking: run in a thread.

        :raises SecretError: the file is readable by others, or does not decrypt.
        """
        if not self.path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if write_private_file(self.path, self.keyring.encrypt(der, aad=self._aad)):
                log.info("acme account key created", key_file=str(self.path))
                self._remember_directory()
                return JWKEC(key=key)
            # Another master created it first: use theirs.
        token = read_private_file(self.path, what="ACME account key file")
        der = self.keyring.decrypt(token, aad=self._aad)
        loaded = serialization.load_der_private_key(der, password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise SecretError(f"ACME account key file {self.path} does not hold an EC key")
        self._remember_directory()  # key files written before the sidecar existed
        return JWKEC(key=loaded)

    def rewrap(self) -> bool:
        """Re-encrypt under the keyring's primary key after a rotation; True if rewritten."""
        token = read_private_file(self.path, what="ACME account key file")
        if not self.keyring.needs_rewrap(token):
            return False
        write_private_file(self.path, self.keyring.rewrap(token, aad=self._aad), replace=True)
        return True


def directory_file_of(key_file: Path) -> Path:
    """Where the directory URL of the account key in `key_file` is kept."""
    return key_file.with_name(key_file.name + ".directory")


def rewrap_account_keys(settings: Settings, certs: CertsSettings, keyring: MasterKeyring) -> int:
    """Re-encrypt every ACME account key under the keyring's primary key: the configured
    CA's, and those of CAs configured before (found in the state dir with their
    ``.directory`` file); returns how many files were rewritten. Blocking: run in a thread.

    A key file without its directory URL (written before the URL was kept) cannot be
    re-encrypted; it is named in a warning, and once the previous master key is removed
    the master would register a new account if that CA is configured again.

    :raises SecretError: the configured CA's key file does not decrypt with the keyring
        (an earlier CA's is named in a warning and skipped: it is not in use).
    """
    current = account_key_path(settings, certs)
    moved = 0
    if current.exists():
        moved += AccountKeyFile(current, keyring, certs.acme_directory).rewrap()
    folder = settings.state_dir / ACCOUNT_KEY_DIR
    for path in sorted(folder.glob("account-*.key")) if folder.is_dir() else []:
        if path == current:
            continue
        try:
            url = directory_file_of(path).read_text().strip()
        except OSError:
            url = ""
        expected = f"account-{hashlib.sha256(url.encode()).hexdigest()[:16]}.key"
        if not url or path.name != expected:
            log.warning(
                "acme account key of an unknown CA not re-encrypted; it becomes unreadable "
                "once the previous master key is removed",
                key_file=str(path),
            )
            continue
        try:
            moved += AccountKeyFile(path, keyring, url).rewrap()
        except SecretError as exc:  # one unusable old key must not keep the others back
            log.warning("acme account key of an earlier CA not re-encrypted",
                        key_file=str(path), error=str(exc))  # fmt: skip
    return moved


# ---------------------------------------------------------------------------------------
# Challenges and results
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PendingChallenge:
    """One challenge the CA wants answered before it validates `domain`.

    HTTP-01: serve `key_authorization` at ``http://<domain>/.well-known/acme-challenge/
    <token>``. DNS-01: publish TXT `txt_value` at `record_name`. Neither value is secret
    (the CA and anyone looking can see them), but both are only useful during issuance.
    """

    domain: str
    type: str
    token: str
    key_authorization: str
    record_name: str = ""
    txt_value: str = ""


@runtime_checkable
class ChallengeSolver(Protocol):
    """Makes the CA's validation requests succeed, for one challenge type.

    `present` publishes every challenge of one order and returns once they are served
    (the CA is told to validate right after); `cleanup` removes them again and is
    called whatever the outcome, shielded from cancellation. Errors in `present` abort
    the order.
    """

    challenge_type: ClassVar[str]

    async def present(self, challenges: Sequence[PendingChallenge]) -> None: ...
    async def cleanup(self, challenges: Sequence[PendingChallenge]) -> None: ...


@attrs.frozen(kw_only=True)
class IssuedCertificate:
    """A certificate the CA issued: leaf, chain, the fresh private key and facts about it."""

    domains: tuple[str, ...]
    cert_pem: str
    chain_pem: str
    key_pem: str = attrs.field(repr=False)
    not_before: float
    not_after: float
    fingerprint: str
    serial: int

    @property
    def fullchain_pem(self) -> str:
        """Leaf then chain: what nginx's ``ssl_certificate`` reads."""
        return self.cert_pem + self.chain_pem

    def stored(self, workspace: str, name: str) -> StoredCertificate:
        """The storage record (source ``acme``); the backend encrypts the key at rest."""
        return StoredCertificate(
            workspace=workspace,
            name=name,
            cert_pem=self.cert_pem,
            chain_pem=self.chain_pem,
            key_pem=self.key_pem,
            not_after=self.not_after,
            domains=self.domains,
            source="acme",
        )


@attrs.frozen
class AcmeAccount:
    """The registered account: its URL at the CA, contacts and status."""

    uri: str
    contact: tuple[str, ...]
    status: str


def normalize_domains(domains: Sequence[str]) -> tuple[str, ...]:
    """Lower-cased, trailing dots removed, duplicates dropped, order kept; ``_`` removed."""
    cleaned = (d.strip().lower().rstrip(".") for d in domains)
    return tuple(dict.fromkeys(d for d in cleaned if d and d != "_"))


# ---------------------------------------------------------------------------------------
# Error mapping
# ---------------------------------------------------------------------------------------


def _retry_at(header: str | None, now: float) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) as seconds since the epoch."""
    if not header:
        return None
    value = header.strip()
    if value.isdigit():
        return now + int(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return email.utils.parsedate_to_datetime(value).timestamp()
    return None


def _problem_text(error: messages.Error) -> str:
    parts = [error.detail or error.title or error.description or str(error.typ)]
    for sub in error.subproblems or ():
        who = f"{sub.identifier.value}: " if sub.identifier is not None else ""
        parts.append(f"{who}{sub.detail or sub.typ}")
    return "; ".join(parts)


def _map_error(
    exc: Exception, what: str, domains: Sequence[str], retry_after: str | None, url: str
) -> AcmeError | None:
    """The NxMesh error for an exception of the ``acme`` stack, or None to re-raise it."""
    names = ", ".join(domains)
    subject = f"{what} ({names})" if names else what
    if isinstance(exc, messages.Error):
        code = exc.code or str(exc.typ).removeprefix(ACME_ERROR_PREFIX)
        detail = _problem_text(exc)
        typ = str(exc.typ)
        if code == "rateLimited":
            retry_at = _retry_at(retry_after, time.time())
            when = (
                f"; retry after {dt.datetime.fromtimestamp(retry_at, dt.UTC):%Y-%m-%d %H:%M} UTC"
                if retry_at is not None
                else ""
            )
            return AcmeRateLimitedError(
                f"the ACME server rate-limited {subject}: {detail}{when}",
                retry_at=retry_at,
                acme_type=typ,
                detail=detail,
                domains=domains,
            )
        cls: type[AcmeError] = AcmeError
        if code in _ACCOUNT_CODES:
            cls = AcmeAccountError
        elif code in _ORDER_CODES:
            cls = AcmeOrderError
        return cls(
            f"{subject} failed: the ACME server answered {code}: {detail}",
            acme_type=typ,
            detail=detail,
            domains=domains,
        )
    if isinstance(exc, acme_errors.IssuanceError):
        return _map_error(exc.error, what, domains, retry_after, url)
    if isinstance(exc, requests.exceptions.SSLError):
        return AcmeConnectionError(
            f"{subject} failed: cannot verify the TLS certificate of the ACME server {url} "
            f"({exc.__class__.__name__}); trust its CA with [plugins.certs] ca_bundle",
            domains=domains,
        )
    if isinstance(exc, requests.exceptions.RequestException):
        return AcmeConnectionError(
            f"{subject} failed: cannot reach the ACME server {url}: {exc}", domains=domains
        )
    if isinstance(exc, acme_errors.Error | jose_errors.Error):
        return AcmeError(
            f"{subject} failed: {exc.__class__.__name__}: {exc}".rstrip(": "), domains=domains
        )
    return None


# ---------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------


class AcmeClient:
    """An ACME account at one CA, and the operations the master needs from it.

    :param directory_url: the CA's directory (``[plugins.certs] acme_directory``).
    :param account_key: the account's private JWK (see `AccountKeyFile`).
    :param contact_email: registered as ``mailto:`` contact when given.
    :param agree_tos: agree to the CA's terms of service when registering.
    :param ca_bundle: PEM file of CAs to trust for the ACME server's HTTPS.
    :param key_type: the key type of each certificate's fresh private key.
    """

    def __init__(
        self,
        directory_url: str,
        account_key: JWK,
        *,
        contact_email: str = "",
        agree_tos: bool = False,
        ca_bundle: Path | None = None,
        key_type: KeyType = "ec-p256",
        network_timeout: float = 30.0,
        poll_interval: float = 1.0,
        order_timeout: float = 180.0,
        user_agent: str = "nxmesh",
    ) -> None:
        self.directory_url = directory_url
        self._account_key = account_key
        self.contact_email = contact_email
        self.agree_tos = agree_tos
        self.ca_bundle = ca_bundle
        self.key_type: KeyType = key_type
        self.network_timeout = network_timeout
        self.poll_interval = poll_interval
        self.order_timeout = order_timeout
        self.user_agent = user_agent
        self._client: acme_client.ClientV2 | None = None
        self._account: AcmeAccount | None = None
        self._lock = anyio.Lock()
        self._retry_after: str | None = None

    def __repr__(self) -> str:
        return f"AcmeClient({self.directory_url!r}, account={self.account_uri!r})"

    @classmethod
    def from_settings(cls, certs: CertsSettings, account_key: JWK) -> AcmeClient:
        """A client configured by the ``[plugins.certs]`` section."""
        from nxmesh import __version__

        return cls(
            certs.acme_directory,
            account_key,
            contact_email=certs.contact_email,
            agree_tos=certs.agree_tos,
            ca_bundle=certs.ca_bundle,
            key_type=certs.key_type,
            network_timeout=certs.network_timeout,
            poll_interval=certs.poll_interval,
            order_timeout=certs.order_timeout,
            user_agent=f"nxmesh/{__version__}",
        )

    @property
    def account_uri(self) -> str | None:
        """The account URL at the CA, once registered."""
        return self._account.uri if self._account else None

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._client is not None:
            self._client.net.session.close()
            self._client = None

    # -- plumbing --------------------------------------------------------------------------

    def _connect(self) -> acme_client.ClientV2:
        """The ``acme`` client, fetching the directory on first use (runs in a thread)."""
        if self._client is None:
            net = acme_client.ClientNetwork(
                self._account_key,
                alg=ES256 if isinstance(self._account_key, JWKEC) else RS256,
                user_agent=self.user_agent,
                timeout=max(1, int(self.network_timeout)),
            )
            if self.ca_bundle is not None:
                # requests takes a CA bundle path wherever it takes True.
                net.verify_ssl = str(self.ca_bundle)  # type: ignore[assignment]
            # requests' public hook API: remember Retry-After for rate-limit errors.
            net.session.hooks["response"].append(self._remember_retry_after)
            directory = acme_client.ClientV2.get_directory(self.directory_url, net)
            self._client = acme_client.ClientV2(directory, net)
        return self._client

    def _remember_retry_after(self, response: requests.Response, *_: Any, **__: Any) -> None:
        self._retry_after = response.headers.get("Retry-After")

    async def _call(self, what: str, domains: Sequence[str], fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking ``acme`` call in a thread, mapping its errors.

        One call at a time per client: the library's nonce pool is not thread-safe.
        A cancelled caller abandons the thread, which ends within the network timeout.
        """

        def work() -> T:
            self._retry_after = None
            try:
                return fn(*args)
            except Exception as exc:
                mapped = _map_error(exc, what, domains, self._retry_after, self.directory_url)
                if mapped is None:
                    raise
                raise mapped from exc

        async with self._lock:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def _client_call(
        self, what: str, domains: Sequence[str], method: Callable[..., T], *args: Any
    ) -> T:
        """`_call` of ``method(client, *args)`` on the connected ``acme`` client."""
        return await self._call(what, domains, lambda: method(self._connect(), *args))

    def _post_as_get(self, client: acme_client.ClientV2, url: str) -> requests.Response:
        # ACME's POST-as-GET (RFC 8555 §6.3) through the network layer's public post().
        return client.net.post(url, None, new_nonce_url=client.directory["newNonce"])

    # -- account ---------------------------------------------------------------------------

    async def register(self) -> AcmeAccount:
        """Register the account (or find the existing one for this key); cached afterwards.

        :raises AcmeAccountError: the CA refused (terms not agreed, invalid contact...).
        """
        if self._account is not None:
            return self._account
        if not self.agree_tos:
            raise AcmeAccountError(
                f"registering an ACME account at {self.directory_url} needs your agreement to "
                "the CA's terms of service: set [plugins.certs] agree_tos = true"
            )

        def register(client: acme_client.ClientV2) -> messages.RegistrationResource:
            body = messages.NewRegistration.from_data(
                email=self.contact_email or None, terms_of_service_agreed=True
            )
            try:
                return client.new_account(body)
            except acme_errors.ConflictError as exc:
                # The key already has an account: look it up instead.
                existing = messages.RegistrationResource(
                    uri=exc.location, body=messages.Registration()
                )
                return client.query_registration(existing)

        regr = await self._client_call("registering the ACME account", (), register)
        self._account = AcmeAccount(
            uri=str(regr.uri),
            contact=tuple(regr.body.contact or ()),
            status=str(regr.body.status or "valid"),
        )
        log.info("acme account ready", account=self._account.uri, directory=self.directory_url)
        return self._account

    # -- issuance --------------------------------------------------------------------------

    async def issue(self, domains: Sequence[str], solver: ChallengeSolver) -> IssuedCertificate:
        """Obtain a certificate for `domains`, proving control with `solver`.

        A new private key is generated for every call (never reused across renewals).

        :raises AcmeOrderError: the CA refused the names, or the order became invalid.
        :raises AcmeChallengeError: validation failed; names each domain and the reason.
        :raises AcmeRateLimitedError: rate-limited; ``retry_at`` says until when.
        :raises AcmeTimeoutError: the order did not complete within ``order_timeout``.
        """
        names = normalize_domains(domains)
        if not names:
            raise AcmeOrderError("cannot order a certificate without any domain name")
        kind = solver.challenge_type
        wildcards = [n for n in names if n.startswith("*.")]
        if wildcards and kind != "dns-01":
            raise AcmeOrderError(
                f"wildcard names ({', '.join(wildcards)}) can only be validated with DNS-01; "
                f"set [plugins.certs] challenge = 'dns-01' (the solver here is {kind})",
                domains=names,
            )
        await self.register()
        key = generate_private_key(self.key_type)
        key_pem = _pkcs8(key)
        csr_pem = crypto_util.make_csr(key_pem, list(names))
        deadline = time.monotonic() + self.order_timeout

        order = await self._client_call(
            "creating the certificate order", names, Client.new_order, csr_pem
        )
        log.info("acme order created", domains=list(names), order=order.uri)
        pending = self._pending_challenges(order, kind, names)
        if pending:
            try:
                await solver.present([p for _, _, p in pending])
                for _authzr, challb, challenge in pending:
                    await self._answer(challb, challenge)
                await self._wait_for_authorizations([a for a, _, _ in pending], deadline, names)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._cleanup(solver, [p for _, _, p in pending])
        fullchain = await self._finalize(order, deadline, names)
        issued = self._issued(fullchain, key, names)
        log.info(
            "certificate issued",
            domains=list(issued.domains),
            fingerprint=issued.fingerprint,
            not_after=dt.datetime.fromtimestamp(issued.not_after, dt.UTC).isoformat(),
        )
        return issued

    def _pending_challenges(
        self, order: messages.OrderResource, kind: str, names: Sequence[str]
    ) -> list[tuple[messages.AuthorizationResource, messages.ChallengeBody, PendingChallenge]]:
        found = []
        for authzr in order.authorizations:
            body = authzr.body
            domain = ("*." if body.wildcard else "") + body.identifier.value
            if body.status == messages.STATUS_VALID:
                continue  # the CA reuses a recent validation
            if body.status != messages.STATUS_PENDING:
                raise AcmeOrderError(
                    f"the authorization of {domain} is {body.status}, not pending",
                    domains=names,
                )
            challb = next((c for c in body.challenges if c.chall.typ == kind), None)
            if challb is None:
                offered = ", ".join(sorted({c.chall.typ for c in body.challenges})) or "none"
                raise AcmeOrderError(
                    f"the ACME server offers no {kind} challenge for {domain} (offered: "
                    f"{offered}); choose another [plugins.certs] challenge",
                    domains=names,
                )
            found.append((authzr, challb, self._challenge(domain, challb)))
        return found

    def _challenge(self, domain: str, challb: messages.ChallengeBody) -> PendingChallenge:
        chall = challb.chall
        token = chall.encode("token")
        if isinstance(chall, acme_challenges.DNS01):
            base = domain.removeprefix("*.")
            return PendingChallenge(
                domain=domain,
                type=chall.typ,
                token=token,
                key_authorization=chall.key_authorization(self._account_key),
                record_name=chall.validation_domain_name(base) + ".",
                txt_value=chall.validation(self._account_key),
            )
        if isinstance(chall, acme_challenges.KeyAuthorizationChallenge):
            return PendingChallenge(
                domain=domain,
                type=chall.typ,
                token=token,
                key_authorization=chall.key_authorization(self._account_key),
            )
        raise AcmeOrderError(f"unsupported challenge type {chall.typ} for {domain}")

    async def _answer(self, challb: messages.ChallengeBody, challenge: PendingChallenge) -> None:
        response = challb.chall.response(self._account_key)
        await self._client_call(
            f"answering the {challenge.type} challenge",
            (challenge.domain,),
            Client.answer_challenge,
            challb,
            response,
        )
        log.info("acme challenge answered", domain=challenge.domain, type=challenge.type)

    async def _cleanup(self, solver: ChallengeSolver, pending: Sequence[PendingChallenge]) -> None:
        try:
            await solver.cleanup(pending)
        except Exception as exc:  # cleanup must not hide the issuance outcome
            log.warning(
                "acme challenge cleanup failed",
                domains=[p.domain for p in pending],
                error=str(exc),
                error_type=type(exc).__name__,
            )

    async def _wait_for_authorizations(
        self,
        authzrs: Sequence[messages.AuthorizationResource],
        deadline: float,
        names: Sequence[str],
    ) -> None:
        waiting = list(authzrs)
        failures: list[ChallengeFailure] = []
        while waiting:
            for authzr in list(waiting):
                domain = authzr.body.identifier.value
                updated, _ = await self._client_call(
                    "checking the authorization", (domain,), Client.poll, authzr
                )
                body = updated.body
                if body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                    continue
                waiting.remove(authzr)
                if body.status != messages.STATUS_VALID:
                    failures.extend(_failures(updated))
            if not waiting:
                break
            if time.monotonic() >= deadline:
                raise AcmeTimeoutError(
                    f"the ACME server did not validate {', '.join(names)} within "
                    f"{self.order_timeout:.0f} s",
                    domains=names,
                )
            await anyio.sleep(self.poll_interval)
        if failures:
            raise AcmeChallengeError(
                f"the ACME server could not validate control of {', '.join(names)}",
                failures=failures,
                domains=names,
            )

    async def _finalize(
        self, order: messages.OrderResource, deadline: float, names: Sequence[str]
    ) -> str:
        order = await self._client_call(
            "finalizing the order", names, Client.begin_finalization, order
        )
        body = order.body
        while True:
            if body.status == messages.STATUS_VALID and body.certificate:
                url = body.certificate
                response = await self._client_call(
                    "downloading the certificate", names, self._post_as_get, url
                )
                return response.text
            if body.status == messages.STATUS_INVALID:
                detail = _problem_text(body.error) if body.error else "no reason given"
                raise AcmeOrderError(
                    f"the ACME server marked the order for {', '.join(names)} invalid: {detail}",
                    acme_type=str(body.error.typ) if body.error else "",
                    detail=detail,
                    domains=names,
                )
            if time.monotonic() >= deadline:
                raise AcmeTimeoutError(
                    f"the order for {', '.join(names)} was not issued within "
                    f"{self.order_timeout:.0f} s (status {body.status})",
                    domains=names,
                )
            delay = self.poll_interval
            retry = _retry_at(self._retry_after, time.time())
            if retry is not None:
                delay = min(max(retry - time.time(), self.poll_interval), _MAX_RETRY_AFTER_POLL)
            await anyio.sleep(delay)
            uri = order.uri
            assert uri is not None
            response = await self._client_call("checking the order", names, self._post_as_get, uri)
            body = messages.Order.from_json(response.json())

    def _issued(self, fullchain: str, key: PrivateKey, names: Sequence[str]) -> IssuedCertificate:
        try:
            certs = load_pem_chain(fullchain)
        except ValueError:
            raise AcmeOrderError(
                "the ACME server returned no PEM certificate chain", domains=names
            ) from None
        leaf = certs[0]
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if leaf.public_key().public_bytes(der, public) != key.public_key().public_bytes(
            der, public
        ):
            raise AcmeOrderError(
                "the ACME server returned a certificate for another key", domains=names
            )
        sans = certificate_domains(leaf)
        missing = uncovered(sans, [n for n in names if not n.startswith("*.")])
        missing += [n for n in names if n.startswith("*.") and n not in sans]
        if missing:
            raise AcmeOrderError(
                f"the issued certificate does not name {', '.join(missing)}", domains=names
            )
        return IssuedCertificate(
            domains=tuple(names),
            cert_pem=pem(leaf),
            chain_pem="".join(pem(c) for c in certs[1:]),
            key_pem=_pkcs8(key).decode("ascii"),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            fingerprint=fingerprint(leaf),
            serial=leaf.serial_number,
        )

    # -- revocation ------------------------------------------------------------------------

    async def revoke(self, cert_pem: str, *, reason: int = 0) -> None:
        """Revoke a certificate this account (or its key) obtained.

        :param reason: RFC 5280 reason code (0 unspecified, 1 key compromise, 4
            superseded, 5 cessation of operation).
        :raises AcmeError: the CA refused (``alreadyRevoked``, ``unauthorized``...).
        """
        leaf = load_pem_chain(cert_pem)[0]
        names = certificate_domains(leaf)
        await self.register()
        await self._client_call("revoking the certificate", names, Client.revoke, leaf, reason)
        log.info("certificate revoked", domains=names, fingerprint=fingerprint(leaf))


def _failures(authzr: messages.AuthorizationResource) -> list[ChallengeFailure]:
    body = authzr.body
    domain = ("*." if body.wildcard else "") + body.identifier.value
    failed = [
        ChallengeFailure(
            domain,
            str(c.chall.typ),
            str(c.error.typ),
            _problem_text(c.error),
        )
        for c in body.challenges
        if c.error is not None
    ]
    return failed or [ChallengeFailure(domain, "?", "", f"authorization is {body.status}")]


class AcmeIssuer:
    """Issues certificates with one client and one solver (what the renewal scheduler uses)."""

    def __init__(self, client: AcmeClient, solver: ChallengeSolver) -> None:
        self.client = client
        self.solver = solver

    async def issue(self, domains: Sequence[str]) -> IssuedCertificate:
        return await self.client.issue(domains, self.solver)


async def open_acme_client(
    settings: Settings, keyring: MasterKeyring, *, certs: CertsSettings | None = None
) -> AcmeClient:
    """An `AcmeClient` for the master: settings section, encrypted account key, registered.

    :raises SecretError: the account key file is unsafe or does not decrypt.
    :raises AcmeError: the CA is unreachable or refused the registration.
    """
    section = certs or certs_settings(settings)
    key_file = AccountKeyFile(
        account_key_path(settings, section), keyring, directory_url=section.acme_directory
    )
    account_key = await anyio.to_thread.run_sync(key_file.load_or_create)
    client = AcmeClient.from_settings(section, account_key)
    try:
        await client.register()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await client.aclose()
        raise
    return client
