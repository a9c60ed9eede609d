"""Which agents get which certificates, and how private keys are kept on the agent.

**Master side.** `certificate_needs` reads a desired state: every certificate its sites
use — uploaded ones by name (``tls: {certificate: web}`` → ``certs/web.crt``), ACME ones
per site (``tls: acme`` → ``certs/acme/<site>.crt``, stored under the site's name) or by
an ACME-sourced `CertificateRef`. `CertificateDistributor.material_for_state` turns the
state an agent runs into the `AgentMaterial` it must receive: only those certificates
(an agent never gets a key its sites do not use), a self-signed *placeholder* for an
ACME certificate not issued yet (so nginx starts and can serve the HTTP-01 challenge),
and the pending HTTP-01 tokens of its domains. `agents_needing` says which agents to roll
out again after a certificate changed.

**Agent side.** `AgentKeyVault` writes private keys *encrypted* (PKCS#8, AES-256-CBC
with a PBKDF2 key) under a per-agent passphrase that lives in one 0600
``ssl_password_file`` outside every release tree; the renderer emits
``ssl_password_file`` for each site whose key is encrypted. Release trees, caches and
bundle dumps therefore never hold a usable key. Encryption is randomised, so the vault
remembers the ciphertext per key: the same key always yields the same bytes and the
bundle digest stays stable.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nxmesh.certs.acme_client import normalize_domains
from nxmesh.certs.errors import CertificateConflictError, CertificateError
from nxmesh.certs.http01 import ChallengeBoard, challenge_files
from nxmesh.certs.validate import fingerprint, load_pem_chain
from nxmesh.core.model import DesiredState, Site
from nxmesh.crypto.secrets import read_private_file, write_private_file
from nxmesh.plugins.render_nginx import certificate_paths, named_certificate_paths

if TYPE_CHECKING:
    from nxmesh.core.interfaces import StorageBackend
    from nxmesh.core.records import StoredCertificate

__all__ = [
    "PASSWORD_FILE",
    "PLACEHOLDER_CN",
    "AgentKeyVault",
    "AgentMaterial",
    "CertificateDistributor",
    "CertificateMaterial",
    "CertificateNeed",
    "acme_needs",
    "agents_needing",
    "certificate_needs",
    "is_placeholder",
    "placeholder_material",
]

PLACEHOLDER_CN = "NxMesh placeholder (ACME certificate not issued yet)"
"""Subject CN of the self-signed stand-in served until the ACME certificate exists."""

PASSWORD_FILE = "ssl_password"  # noqa: S105 - a file name, not a password
"""Name of the agent's passphrase file inside its vault directory."""

_PLACEHOLDER_DAYS = 30


# ---------------------------------------------------------------------------------------
# What a state needs
# ---------------------------------------------------------------------------------------


@attrs.frozen
class CertificateNeed:
    """One certificate a state's sites use.

    :ivar name: the stored certificate's name (an ACME site's certificate is stored under
        the site's name).
    :ivar stem: bundle path without extension (``certs/web``, ``certs/acme/shop``).
    :ivar source: ``upload`` (a person provides it) or ``acme`` (the master obtains it).
    :ivar domains: for ACME, the names to order; for uploads, the names it must cover.
    :ivar sites: names of the sites using it.
    :ivar streams: names of the TCP streams ending TLS with it (`StreamTLS`).
    """

    name: str
    stem: str
    source: Literal["upload", "acme"]
    domains: tuple[str, ...]
    sites: tuple[str, ...]
    streams: tuple[str, ...] = ()

    @property
    def used(self) -> bool:
        """Whether a site or stream serves it (else it is obtained ahead of time)."""
        return bool(self.sites or self.streams)

    @property
    def first_user(self) -> str:
        """Who uses it first, for messages: ``site 'shop'`` or ``stream 'db'``."""
        return f"site {self.sites[0]!r}" if self.sites else f"stream {self.streams[0]!r}"


def _stem(site: Site) -> str:
    return certificate_paths(site).certificate.removesuffix(".crt")


def _named_stem(name: str) -> str:
    return named_certificate_paths(name).certificate.removesuffix(".crt")


def certificate_needs(state: DesiredState) -> list[CertificateNeed]:
    """Every certificate `state` uses, by stored name, in order of first use.

    ACME-sourced `CertificateRef` entries are included even when no site uses them yet
    (the master obtains them ahead of time).
    """
    refs = {ref.name: ref for ref in state.certificates}
    needs: dict[str, CertificateNeed] = {}

    def add(name: str, stem: str, source: str, domains: Sequence[str], site: str | None) -> None:
        known = needs.get(name)
        if known is None:
            needs[name] = CertificateNeed(
                name=name,
                stem=stem,
                source="acme" if source == "acme" else "upload",
                domains=normalize_domains(domains),
                sites=(site,) if site else (),
            )
            return
        merged = normalize_domains([*known.domains, *(domains if source == "upload" else ())])
        sites = (*known.sites, site) if site and site not in known.sites else known.sites
        needs[name] = attrs.evolve(known, domains=merged, sites=sites)

    for site in state.sites:
        if site.tls is None:
            continue
        if site.tls.acme:
            add(site.name, _stem(site), "acme", site.server_names, site.name)
            continue
        cert = site.tls.certificate
        assert cert is not None  # TLSConfig guarantees one of acme / certificate
        ref = refs.get(cert)
        if ref is not None and ref.source == "acme":
            add(cert, _stem(site), "acme", ref.domains, site.name)
        else:
            add(cert, _stem(site), "upload", site.server_names, site.name)
    for stream in state.streams:
        if stream.tls is None:
            continue
        name = stream.tls.certificate
        ref = refs.get(name)
        acme = ref is not None and ref.source == "acme"
        # An upload has no names to cover here: a stream has no server names.
        add(name, _named_stem(name), "acme" if acme else "upload",
            ref.domains if acme and ref else (), None)  # fmt: skip
        known = needs[name]
        if stream.name not in known.streams:
            needs[name] = attrs.evolve(known, streams=(*known.streams, stream.name))
    for ref in state.certificates:
        if ref.source == "acme" and ref.name not in needs:
            add(ref.name, f"certs/{ref.name}", "acme", ref.domains, None)
    return list(needs.values())


def acme_needs(state: DesiredState) -> list[CertificateNeed]:
    """The certificates of `state` the master must obtain and renew by ACME."""
    return [need for need in certificate_needs(state) if need.source == "acme"]


def agents_needing(
    name: str, agent_states: Mapping[str, DesiredState], *, workspace: str | None = None
) -> list[str]:
    """Ids of the agents whose state uses certificate `name` (to roll out after a change).

    :param agent_states: agent id → the desired state the agent runs (or should run).
    :param workspace: only agents whose state belongs to this workspace.
    """
    return sorted(
        agent_id
        for agent_id, state in agent_states.items()
        if (workspace is None or state.workspace == workspace)
        and any(need.name == name and need.used for need in certificate_needs(state))
    )


# ---------------------------------------------------------------------------------------
# What an agent receives
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CertificateMaterial:
    """One certificate as an agent receives it: bundle stem, full chain, private key.

    `key_pem` is unencrypted PKCS#8 on the wire (inside the authenticated, encrypted
    master↔agent channel); the agent encrypts it before it touches disk (`AgentKeyVault`).
    """

    name: str
    stem: str
    fullchain_pem: str
    key_pem: str = attrs.field(repr=False)
    not_after: float
    fingerprint: str
    placeholder: bool = False

    @classmethod
    def from_stored(cls, stored: StoredCertificate, stem: str) -> CertificateMaterial:
        leaf = load_pem_chain(stored.cert_pem)[0]
        return cls(
            name=stored.name,
            stem=stem,
            fullchain_pem=stored.cert_pem + stored.chain_pem,
            key_pem=stored.key_pem,
            not_after=stored.not_after,
            fingerprint=fingerprint(leaf),
            placeholder=is_placeholder(stored.cert_pem),
        )


@attrs.frozen(kw_only=True)
class AgentMaterial:
    """Everything certificate-related one agent needs for one state.

    :ivar certificates: the certificates its sites use, no others.
    :ivar challenges: pending HTTP-01 tokens for its domains (token → key authorization).
    """

    certificates: tuple[CertificateMaterial, ...] = ()
    challenges: Mapping[str, str] = attrs.field(factory=dict)

    def plain_files(self) -> dict[str, bytes]:
        """Bundle extra files with *unencrypted* keys: previews and tests only, never an
        agent's disk (use `AgentKeyVault.extra_files` there)."""
        files = challenge_files(self.challenges)
        for cert in self.certificates:
            files[f"{cert.stem}.crt"] = cert.fullchain_pem.encode("ascii")
            files[f"{cert.stem}.key"] = cert.key_pem.encode("ascii")
        return files


def is_placeholder(cert_pem: str) -> bool:
    """Whether `cert_pem` is the stand-in `placeholder_material` makes."""
    try:
        leaf = load_pem_chain(cert_pem)[0]
    except ValueError:
        return False
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(names) and names[0].value == PLACEHOLDER_CN


def placeholder_material(name: str, stem: str, domains: Sequence[str]) -> CertificateMaterial:
    """A self-signed stand-in for an ACME certificate that does not exist yet.

    It lets nginx load the site (and serve the HTTP-01 challenge on its plain-HTTP
    server) before the first issuance; clients see an untrusted certificate meanwhile.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PLACEHOLDER_CN)])
    names = [x509.DNSName(d) for d in normalize_domains(domains)] or [
        x509.DNSName("placeholder.invalid")
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_PLACEHOLDER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertificateMaterial(
        name=name,
        stem=stem,
        fullchain_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii"),
        not_after=cert.not_valid_after_utc.timestamp(),
        fingerprint=fingerprint(cert),
        placeholder=True,
    )


class CertificateDistributor:
    """Master side: the certificate material of the state each agent runs.

    :param storage: where certificates are stored (keys decrypted by the backend).
    :param board: pending HTTP-01 challenges, when HTTP-01 is in use.

    Placeholders are cached per (workspace, name, domains) so repeated builds give the
    same bytes (and the same bundle digest) within a master process.
    """

    def __init__(self, storage: StorageBackend, *, board: ChallengeBoard | None = None) -> None:
        self.storage = storage
        self.board = board
        self._placeholders: dict[tuple[str, str, tuple[str, ...]], CertificateMaterial] = {}

    async def material_for_state(self, state: DesiredState) -> AgentMaterial:
        """The material an agent running `state` needs.

        :raises CertificateError: an uploaded certificate the state names is not stored
            (the master's validation prevents such a version).
        """
        found: list[CertificateMaterial] = []
        for need in certificate_needs(state):
            if not need.used:
                continue  # obtained ahead of time; no agent serves it yet
            stored = await self.storage.get_certificate(state.workspace, need.name)
            if stored is not None and need.source == "acme" and stored.source != "acme":
                raise CertificateConflictError(
                    f"{need.first_user} gets its certificate by ACME, but the name "
                    f"{need.name!r} is taken by an uploaded certificate; rename one of them"
                )
            if stored is not None:
                found.append(CertificateMaterial.from_stored(stored, need.stem))
            elif need.source == "acme":
                found.append(self._placeholder(state.workspace, need))
            else:
                raise CertificateError(
                    f"certificate {need.name!r} used by {need.first_user} is not stored "
                    f"in workspace {state.workspace!r}; upload it first"
                )
        challenges = self.board.for_state(state) if self.board is not None else {}
        return AgentMaterial(certificates=tuple(found), challenges=challenges)

    def _placeholder(self, workspace: str, need: CertificateNeed) -> CertificateMaterial:
        key = (workspace, need.name, need.domains)
        cached = self._placeholders.get(key)
        if cached is None or cached.stem != need.stem:
            cached = placeholder_material(need.name, need.stem, need.domains)
            self._placeholders[key] = cached
        return cached


# ---------------------------------------------------------------------------------------
# Agent side: encrypted keys
# ---------------------------------------------------------------------------------------


class AgentKeyVault:
    """The agent's private keys at rest: encrypted PKCS#8 plus one passphrase file.

    Layout of `directory` (0700)::

        ssl_password         the passphrase (0600); the renderer's ssl_password_file
        keys/<sha256>.pem    encrypted key per key fingerprint (0600), reused while the
                             key is in use so bundles stay byte-identical

    All methods are blocking file I/O; async callers use ``anyio.to_thread.run_sync``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"AgentKeyVault({str(self.directory)!r})"

    @property
    def password_file(self) -> Path:
        """Absolute path for the renderer's ``ssl_password_file`` setting."""
        return (self.directory / PASSWORD_FILE).absolute()

    def _passphrase(self) -> bytes:
        path = self.password_file
        if not path.exists():
            # 256 random bits as text: nginx reads passphrases line by line.
            text = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=") + b"\n"
            write_private_file(path, text)  # False: another process won the race; read it
        data = read_private_file(path, what="ssl_password_file")
        line = data.splitlines()[0].strip() if data.strip() else b""
        if not line:
            raise CertificateError(f"ssl_password_file {path} is empty")
        return line

    def encrypted_key(self, key_pem: str) -> bytes:
        """`key_pem` as encrypted PKCS#8 PEM under this agent's passphrase."""
        key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cached = self.directory / "keys" / f"{hashlib.sha256(der).hexdigest()}.pem"
        if cached.exists():
            return read_private_file(cached, what="encrypted key")
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase()),
        )
        if write_private_file(cached, encrypted):
            return encrypted
        return read_private_file(cached, what="encrypted key")

    def extra_files(self, material: AgentMaterial) -> dict[str, bytes]:
        """The bundle extra files for `material`: chains, encrypted keys, HTTP-01 tokens."""
        files = challenge_files(material.challenges)
        for cert in material.certificates:
            files[f"{cert.stem}.crt"] = cert.fullchain_pem.encode("ascii")
            files[f"{cert.stem}.key"] = self.encrypted_key(cert.key_pem)
        return files

    def prune(self, keep: Iterable[AgentMaterial]) -> int:
        """Delete cached encrypted keys no material in `keep` uses; returns how many."""
        wanted = set()
        for material in keep:
            for cert in material.certificates:
                key = serialization.load_pem_private_key(cert.key_pem.encode("ascii"), None)
                der = key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                wanted.add(f"{hashlib.sha256(der).hexdigest()}.pem")
        return self._remove_keys(lambda path: path.name in wanted)

    def prune_unreferenced(self, trees: Iterable[Path]) -> int:
        """Delete cached encrypted keys no ``*.key`` file under `trees` holds; returns how
        many. `trees` are the release trees kept on disk (the live one and the rollback
        targets): bundles carry the vault's bytes verbatim, so a key is in use exactly
        while a kept tree holds them. A tree that cannot be read raises (nothing is
        deleted on a partial view)."""
        in_use: set[bytes] = set()
        for tree in trees:
            for path in tree.rglob("*.key"):
                if path.is_file() and not path.is_symlink():
                    in_use.add(hashlib.sha256(path.read_bytes()).digest())
        return self._remove_keys(lambda path: hashlib.sha256(path.read_bytes()).digest() in in_use)

    def _remove_keys(self, keep: Callable[[Path], bool]) -> int:
        removed = 0
        keys = self.directory / "keys"
        if keys.is_dir():
            for path in keys.iterdir():
                if path.suffix == ".pem" and not keep(path):
                    os.unlink(path)
                    removed += 1
        return removed
