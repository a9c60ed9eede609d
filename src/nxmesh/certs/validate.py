"""Validation of certificates before they are stored or served.

`validate_certificate` checks an uploaded certificate, chain and private key and returns a
`CertificateCheck` (the parsed parts, the warnings) or raises
`nxmesh.core.errors.ValidationError` listing *every* problem, each naming the field it is
about (``certificate``, ``certificate.chain[0]``, ``private_key``):

- the PEM parses, and the certificate field holds no private key;
- the private key is an unencrypted RSA (2048 bits or more) or EC key and belongs to the
  leaf (the first certificate);
- chain order: leaf first, then each certificate's issuer (``verify_directly_issued_by``);
  a CA certificate in the leaf's place is reported as such;
- expiry: no certificate is expired or not yet valid; a leaf expiring within
  `warn_days` (30 by default) is a *warning*, not an error;
- names: the leaf has DNS names in its subjectAltName, and they cover every server name
  given (the names of the sites that use it), with the RFC 6125 wildcard rule: ``*.a.com``
  covers exactly one extra label (``www.a.com``), not ``a.com`` nor ``x.www.a.com``.

`check_state_certificates` applies the name and expiry rules across a desired state:
every site with ``tls: {certificate: name}`` against the stored certificate of that name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.model import DesiredState
from nxmesh.core.records import StoredCertificate

__all__ = [
    "DEFAULT_WARN_DAYS",
    "MIN_RSA_BITS",
    "CertificateCheck",
    "certificate_domains",
    "certificate_users",
    "check_state_certificates",
    "covers",
    "fingerprint",
    "load_pem_chain",
    "pem",
    "uncovered",
    "validate_certificate",
]

DEFAULT_WARN_DAYS = 30.0
"""A leaf expiring sooner than this is accepted with a warning."""

MIN_RSA_BITS = 2048

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def pem(cert: x509.Certificate) -> str:
    """`cert` as PEM text."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate: what browsers show as its fingerprint."""
    return cert.fingerprint(hashes.SHA256()).hex()


def load_pem_chain(text: str) -> list[x509.Certificate]:
    """Every certificate in PEM `text`, in order; ``ValueError`` when there is none."""
    return x509.load_pem_x509_certificates(text.encode("utf-8"))


def certificate_domains(cert: x509.Certificate) -> list[str]:
    """The DNS names of `cert`'s subjectAltName, lower-cased, in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.value.get_values_for_type(x509.DNSName)]


def covers(san: str, hostname: str) -> bool:
    """Whether certificate name `san` is valid for `hostname` (RFC 6125, section 6.4.3).

    Names compare case-insensitively. A wildcard is only ``*`` as the whole left-most
    label and matches exactly one non-empty label. A server name that is itself a
    wildcard (nginx's ``*.example.com``) is covered only by the same wildcard.
    """
    san, hostname = san.lower().rstrip("."), hostname.lower().rstrip(".")
    if san == hostname:
        return True
    if not san.startswith("*.") or "*" in san[2:] or hostname.startswith("*."):
        return False
    label, _, rest = hostname.partition(".")
    return bool(label) and rest == san[2:]


def uncovered(sans: Iterable[str], server_names: Iterable[str]) -> list[str]:
    """The server names no certificate name in `sans` covers (``_`` is never checked)."""
    names = list(sans)
    return [
        name for name in server_names if name != "_" and not any(covers(san, name) for san in names)
    ]


def _spki(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        return b""
    data: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class CertificateCheck:
    """A certificate that passed validation: its parts, and the warnings to show."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey = attrs.field(repr=False)
    domains: tuple[str, ...]
    warnings: tuple[Problem, ...] = ()

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.leaf)

    @property
    def cert_pem(self) -> str:
        return pem(self.leaf)

    @property
    def chain_pem(self) -> str:
        return "".join(pem(c) for c in self.chain)

    def key_pem(self) -> str:
        """The private key as unencrypted PKCS#8 PEM (storage encrypts it at rest)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")

    def stored(self, workspace: str, name: str, *, source: str = "upload") -> StoredCertificate:
        """The storage record for this certificate (its key is encrypted by the backend)."""
        return StoredCertificate(
            workspace=workspace,
            name=name,
            cert_pem=self.cert_pem,
            chain_pem=self.chain_pem,
            key_pem=self.key_pem(),
            not_after=self.not_after.timestamp(),
            domains=self.domains,
            source=source,
        )


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _load_key(text: str, field: str, found: list[Problem]) -> PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(text.encode("utf-8"), password=None)
    except TypeError:
        found.append(
            Problem(
                field,
                "is encrypted; upload it without a passphrase (NxMesh encrypts it at rest "
                "with the master key and on every agent)",
            )
        )
        return None
    except (ValueError, UnsupportedAlgorithm):
        found.append(Problem(field, "is not a PEM private key"))
        return None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            found.append(
                Problem(field, f"is a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits")
            )
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    found.append(Problem(field, f"is a {type(key).__name__}; use an RSA or EC key"))
    return None


def _check_order(
    certs: Sequence[x509.Certificate], where: Sequence[str], found: list[Problem]
) -> bool:
    """Report chain-order problems; False when the first certificate is not a leaf."""
    leaf = certs[0]
    if _is_ca(leaf) and len(certs) == 1 and _issued_by(leaf, leaf):
        found.append(
            Problem(
                where[0],
                f"is a self-signed CA certificate ({_subject(leaf)}; basicConstraints "
                "CA:TRUE, which `openssl req -x509` sets by default), not a server "
                "certificate: issue one with CA:FALSE (openssl req -x509 ... -addext "
                '"basicConstraints=critical,CA:FALSE"), or sign one with this CA',
            )
        )
        return False
    if _is_ca(leaf):
        leaves = [i for i, c in enumerate(certs) if not _is_ca(c)]
        hint = f" (the leaf looks like {where[leaves[0]]})" if leaves else ""
        found.append(
            Problem(
                where[0],
                f"starts with a CA certificate ({_subject(leaf)}); put the server (leaf) "
                f"certificate first, then its issuers{hint}",
            )
        )
        return False
    for i in range(len(certs) - 1):
        cert, nxt = certs[i], certs[i + 1]
        if _issued_by(cert, nxt):
            continue
        issuer = next(
            (k for k, other in enumerate(certs) if k != i and _issued_by(cert, other)), None
        )
        if issuer is not None:
            reason = (
                f"wrong chain order: {where[i]} ({_subject(cert)}) is issued by "
                f"{where[issuer]}, not by {where[i + 1]}; order the chain leaf first, "
                "then each certificate's issuer"
            )
        else:
            reason = (
                f"did not issue {where[i]} ({_subject(cert)}): it belongs to another chain; "
                "order the chain leaf first, then each certificate's issuer"
            )
        found.append(Problem(where[i + 1], reason))
    return True


def validate_certificate(
    certificate: str,
    private_key: str,
    *,
    chain: str = "",
    server_names: Sequence[str] = (),
    now: dt.datetime | None = None,
    warn_days: float = DEFAULT_WARN_DAYS,
    certificate_field: str = "certificate",
    key_field: str = "private_key",
    chain_field: str = "chain",
) -> CertificateCheck:
    """Check a certificate (leaf first, optionally followed by its chain) and its key.

    :param certificate: PEM: the leaf, optionally followed by intermediates.
    :param private_key: the leaf's private key, unencrypted PEM (PKCS#1, SEC1 or PKCS#8).
    :param chain: more intermediates as PEM, appended after those in `certificate`.
    :param server_names: names the certificate must cover (the sites using it).
    :param now: the time to check validity at (default: now).
    :param warn_days: a leaf expiring within this many days gets a warning.
    :raises ValidationError: every problem found, each naming its field.
    """
    at = now or dt.datetime.now(dt.UTC)
    found: list[Problem] = []
    if "PRIVATE KEY" in certificate:
        raise ValidationError(
            [Problem(certificate_field, f"contains a private key; send it in {key_field} only")]
        )
    certs: list[x509.Certificate] = []
    where: list[str] = []
    for field, text in ((certificate_field, certificate), (chain_field, chain)):
        if field == chain_field and not text.strip():
            continue
        try:
            parsed = load_pem_chain(text)
        except ValueError as exc:
            raise ValidationError([Problem(field, f"is not PEM certificate data: {exc}")]) from None
        for k, cert in enumerate(parsed):
            if field == certificate_field:
                where.append(field if k == 0 else f"{field}.chain[{k - 1}]")
            else:
                where.append(f"{field}[{k}]")
            certs.append(cert)

    key = _load_key(private_key, key_field, found)
    leaf = certs[0]
    # With a CA in the leaf's place, key and name checks would only add noise.
    leaf_first = _check_order(certs, where, found)
    if leaf_first and key is not None and _spki(key.public_key()) != _spki(leaf.public_key()):
        found.append(
            Problem(
                key_field,
                f"does not belong to the certificate ({_subject(leaf)}): their public keys differ",
            )
        )

    warnings: list[Problem] = []
    for cert, field in zip(certs, where, strict=True):
        if cert.not_valid_after_utc <= at:
            found.append(Problem(field, f"expired on {_day(cert.not_valid_after_utc)}"))
        elif cert.not_valid_before_utc > at:
            found.append(Problem(field, f"is not valid before {_day(cert.not_valid_before_utc)}"))
    left = leaf.not_valid_after_utc - at
    if dt.timedelta(0) < left < dt.timedelta(days=warn_days):
        warnings.append(
            Problem(
                certificate_field,
                f"expires in {left.days} days ({_day(leaf.not_valid_after_utc)}); renew it soon",
                severity="warning",
            )
        )

    domains = certificate_domains(leaf)
    if leaf_first and not domains:
        found.append(
            Problem(
                certificate_field,
                "names no DNS name in its subjectAltName (a Common Name alone is not "
                "accepted by browsers)",
            )
        )
    elif leaf_first:
        missing = uncovered(domains, server_names)
        if missing:
            found.append(
                Problem(
                    certificate_field,
                    f"does not cover server name{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(n) for n in missing)}; it is valid for "
                    f"{', '.join(domains)}",
                )
            )
    if found:
        raise ValidationError(found)
    assert key is not None  # a missing key is always a problem above
    return CertificateCheck(
        leaf=leaf,
        chain=tuple(certs[1:]),
        key=key,
        domains=tuple(dict.fromkeys(domains)),
        warnings=tuple(warnings),
    )


def certificate_users(
    state: DesiredState,
) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Who in `state` serves a named certificate, and the names it must cover there:
    ``(where, certificate, [(path, name), ...])``.

    A site's are its server names. A TCP stream has none; its clients check the names
    they connect to, which are the domains the state declares for the certificate
    (``certificates[].domains``).
    """
    refs = {ref.name: (i, ref) for i, ref in enumerate(state.certificates)}
    users: list[tuple[str, str, list[tuple[str, str]]]] = []
    for i, site in enumerate(state.sites):
        if site.tls is not None and site.tls.certificate is not None:
            names = [(f"sites[{i}].server_names[{n}]", h) for n, h in enumerate(site.server_names)]
            users.append((f"sites[{i}]", site.tls.certificate, names))
    for i, stream in enumerate(state.streams):
        if stream.tls is None:
            continue
        cert = stream.tls.certificate
        j, ref = refs.get(cert, (None, None))
        declared = ref.domains if ref is not None else ()
        names = [(f"certificates[{j}].domains[{n}]", d) for n, d in enumerate(declared)]
        users.append((f"streams[{i}]", cert, names))
    return users


def check_state_certificates(
    state: DesiredState,
    certificates: Mapping[str, StoredCertificate],
    *,
    now: dt.datetime | None = None,
    warn_days: float = DEFAULT_WARN_DAYS,
) -> list[Problem]:
    """Problems of `state`'s sites and TLS streams with the stored certificates they name.

    :param certificates: stored certificates of the state's workspace, by name; a name a
        site refers to but which is missing here is left to the caller (the master
        reports it as "upload it first").

    Errors: a certificate that does not cover the names it serves (`certificate_users`),
    or has expired. Warnings: one expiring within `warn_days`.
    """
    at = now or dt.datetime.now(dt.UTC)
    found: list[Problem] = []
    for here, cert, names in certificate_users(state):
        stored = certificates.get(cert)
        if stored is None:
            continue
        name = stored.name
        try:
            leaf = load_pem_chain(stored.cert_pem)[0]
        except ValueError:
            found.append(Problem(f"{here}.tls.certificate", f"certificate {name!r} is unreadable"))
            continue
        sans = certificate_domains(leaf)
        for path, server_name in names:
            if uncovered(sans, [server_name]):
                found.append(
                    Problem(
                        path,
                        f"is not covered by certificate {name!r} (valid for "
                        f"{', '.join(sans) or 'no DNS name'})",
                    )
                )
        left = leaf.not_valid_after_utc - at
        if left <= dt.timedelta(0):
            found.append(
                Problem(
                    f"{here}.tls.certificate",
                    f"certificate {name!r} expired on {_day(leaf.not_valid_after_utc)}",
                )
            )
        elif left < dt.timedelta(days=warn_days):
            found.append(
                Problem(
                    f"{here}.tls.certificate",
                    f"certificate {name!r} expires in {left.days} days",
                    severity="warning",
                )
            )
    return list(dict.fromkeys(found))  # two streams of one certificate: one problem
