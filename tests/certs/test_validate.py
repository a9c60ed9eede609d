"""Upload validation: key, chain order, expiry and names, each error naming its field."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nxmesh.certs.validate import (
    CertificateCheck,
    check_state_certificates,
    covers,
    uncovered,
    validate_certificate,
)
from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.model import DesiredState, Listener, Location, Return, Site, TLSConfig
from nxmesh.testing.pki import Pki


def problems(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    """Field path → its messages (joined when one field has several)."""
    found: dict[str, list[str]] = {}
    for p in exc.value.problems:
        found.setdefault(p.path, []).append(p.message)
    return {path: " | ".join(messages) for path, messages in found.items()}


def tls_site(name: str, *server_names: str, certificate: str) -> Site:
    return Site(
        name=name,
        server_names=server_names,
        listeners=(Listener(port=443, tls=True),),
        tls=TLSConfig(certificate=certificate),
        locations=(Location(path="/", return_=Return(code=200)),),
    )


class TestValidCertificates:
    """A correct upload is accepted and parsed."""

    def test_leaf_chain_and_key_are_accepted(self, pki: Pki) -> None:
        """Leaf then intermediate with the matching key gives the parts and the names."""
        leaf = pki.leaf("www.example.test", "example.test")
        check = validate_certificate(
            pki.chain(leaf), leaf.key_pem, server_names=["example.test", "www.example.test"]
        )
        assert isinstance(check, CertificateCheck)
        assert check.domains == ("www.example.test", "example.test")
        assert check.chain == (pki.intermediate.cert,)
        assert check.warnings == ()
        stored = check.stored("default", "web")
        assert stored.cert_pem == leaf.pem
        assert stored.chain_pem == pki.intermediate.pem
        assert stored.not_after == leaf.cert.not_valid_after_utc.timestamp()
        assert stored.source == "upload"

    def test_chain_may_come_in_its_own_field(self, pki: Pki) -> None:
        """Intermediates given separately are appended after the certificate field."""
        leaf = pki.leaf("a.example.test")
        check = validate_certificate(leaf.pem, leaf.key_pem, chain=pki.intermediate.pem)
        assert check.chain_pem == pki.intermediate.pem

    def test_rsa_keys_in_pkcs1_are_accepted(self, pki: Pki) -> None:
        """A traditional 'BEGIN RSA PRIVATE KEY' file works and is stored as PKCS#8."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        leaf = pki.leaf("rsa.example.test", key=key)
        pkcs1 = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()
        check = validate_certificate(pki.chain(leaf), pkcs1)
        assert check.key_pem().startswith("-----BEGIN PRIVATE KEY-----")

    def test_soon_expiring_leaf_is_a_warning(self, pki: Pki) -> None:
        """A leaf with less than 30 days left is accepted with a warning naming the field."""
        leaf = pki.leaf("soon.example.test", days=10)
        check = validate_certificate(pki.chain(leaf), leaf.key_pem)
        (warning,) = check.warnings
        assert warning.severity == "warning"
        assert warning.path == "certificate"
        assert "expires in 9 days" in warning.message or "expires in 10 days" in warning.message


class TestKeyProblems:
    """Problems with the private key are reported on ``private_key``."""

    def test_mismatched_key_is_rejected(self, pki: Pki) -> None:
        """A key that is not the leaf's is refused, saying the public keys differ."""
        leaf = pki.leaf("www.example.test")
        other = pki.leaf("www.example.test")
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.chain(leaf), other.key_pem)
        assert "does not belong to the certificate" in problems(exc)["private_key"]

    def test_encrypted_key_is_rejected(self, pki: Pki) -> None:
        """A passphrase-protected key is refused with the reason."""
        leaf = pki.leaf("www.example.test")
        encrypted = leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ).decode()
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.chain(leaf), encrypted)
        assert "is encrypted" in problems(exc)["private_key"]

    def test_short_rsa_key_is_rejected(self, pki: Pki) -> None:
        """RSA keys under 2048 bits are refused."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        leaf = pki.leaf("weak.example.test", key=key)
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.chain(leaf), leaf.key_pem)
        assert "1024-bit" in problems(exc)["private_key"]

    def test_key_in_certificate_field_is_rejected(self, pki: Pki) -> None:
        """Pasting the key into the certificate field is refused before parsing."""
        leaf = pki.leaf("www.example.test")
        with pytest.raises(ValidationError) as exc:
            validate_certificate(leaf.pem + leaf.key_pem, leaf.key_pem)
        assert "contains a private key" in problems(exc)["certificate"]


class TestChainOrder:
    """Each certificate must be issued by the next one, leaf first."""

    def test_intermediate_first_is_rejected(self, pki: Pki) -> None:
        """A CA certificate in the leaf's place is named, and where the leaf is."""
        leaf = pki.leaf("www.example.test")
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.intermediate.pem + leaf.pem, leaf.key_pem)
        (problem,) = exc.value.problems
        assert problem.path == "certificate"
        assert "starts with a CA certificate" in problem.message
        assert "the leaf looks like certificate.chain[0]" in problem.message

    def test_a_lone_self_signed_ca_certificate_says_what_it_is(self, pki: Pki) -> None:
        """`openssl req -x509` makes CA:TRUE certificates: alone, the message is about
        that, not about chain order."""
        own = pki.ca("www.example.test", None)
        with pytest.raises(ValidationError) as exc:
            validate_certificate(own.pem, own.key_pem)
        (problem,) = [p for p in exc.value.problems if p.path == "certificate"]
        assert "is a self-signed CA certificate" in problem.message
        assert "CA:FALSE" in problem.message
        assert "put the server (leaf) certificate first" not in problem.message

    def test_swapped_intermediates_are_rejected(self, pki: Pki) -> None:
        """Root before intermediate: the out-of-place entry and its real issuer are named."""
        leaf = pki.leaf("www.example.test")
        pem = leaf.pem + pki.root.pem + pki.intermediate.pem
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pem, leaf.key_pem)
        message = problems(exc)["certificate.chain[0]"]
        assert "wrong chain order" in message
        assert "issued by certificate.chain[1]" in message

    def test_unrelated_chain_is_rejected(self, pki: Pki) -> None:
        """An intermediate of another PKI is reported as not the issuer."""
        other = Pki()
        leaf = pki.leaf("www.example.test")
        with pytest.raises(ValidationError) as exc:
            validate_certificate(leaf.pem, leaf.key_pem, chain=other.intermediate.pem)
        assert "did not issue certificate" in problems(exc)["chain[0]"]


class TestExpiry:
    """Expired and not-yet-valid certificates are refused."""

    def test_expired_leaf_is_rejected(self, pki: Pki) -> None:
        """An expired leaf names its expiry date."""
        leaf = pki.leaf("old.example.test", days=-1, not_before_days=-90)
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.chain(leaf), leaf.key_pem)
        assert problems(exc)["certificate"].startswith("expired on ")

    def test_not_yet_valid_leaf_is_rejected(self, pki: Pki) -> None:
        """A leaf valid only from tomorrow is refused."""
        leaf = pki.leaf("new.example.test", not_before_days=1)
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.chain(leaf), leaf.key_pem)
        assert "is not valid before" in problems(exc)["certificate"]

    def test_validity_is_checked_at_the_given_time(self, pki: Pki) -> None:
        """`now` moves the clock: a valid leaf is expired a year later."""
        leaf = pki.leaf("www.example.test", days=90)
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
        with pytest.raises(ValidationError, match="expired on"):
            validate_certificate(pki.chain(leaf), leaf.key_pem, now=later)

    def test_every_problem_is_reported_at_once(self, pki: Pki) -> None:
        """An expired leaf with the wrong key yields both problems in one error."""
        leaf = pki.leaf("old.example.test", days=-1, not_before_days=-90)
        other = pki.leaf("old.example.test")
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.chain(leaf), other.key_pem)
        assert set(problems(exc)) == {"certificate", "private_key"}


class TestNames:
    """The certificate's subjectAltName must cover the sites' server names."""

    def test_uncovered_server_name_is_rejected(self, pki: Pki) -> None:
        """The missing name and the names the certificate has are both in the message."""
        leaf = pki.leaf("www.example.test")
        with pytest.raises(ValidationError) as exc:
            validate_certificate(
                pki.chain(leaf), leaf.key_pem, server_names=["www.example.test", "api.example.test"]
            )
        message = problems(exc)["certificate"]
        assert "does not cover server name 'api.example.test'" in message
        assert "valid for www.example.test" in message

    def test_wildcard_covers_one_label(self, pki: Pki) -> None:
        """*.example.test covers www.example.test but not the apex or a deeper name."""
        leaf = pki.leaf("*.example.test")
        validate_certificate(pki.chain(leaf), leaf.key_pem, server_names=["www.example.test"])
        with pytest.raises(ValidationError) as exc:
            validate_certificate(
                pki.chain(leaf), leaf.key_pem, server_names=["example.test", "a.b.example.test"]
            )
        message = problems(exc)["certificate"]
        assert "'example.test'" in message
        assert "'a.b.example.test'" in message

    def test_certificate_without_san_is_rejected(self, pki: Pki) -> None:
        """A Common Name alone does not name a host for browsers."""
        leaf = pki.leaf("cn-only.example.test", san=False)
        with pytest.raises(ValidationError) as exc:
            validate_certificate(pki.chain(leaf), leaf.key_pem)
        assert "subjectAltName" in problems(exc)["certificate"]

    @pytest.mark.parametrize(
        ("san", "host", "expected"),
        [
            ("www.example.test", "WWW.Example.Test", True),
            ("*.example.test", "www.example.test", True),
            ("*.example.test", "example.test", False),
            ("*.example.test", "a.www.example.test", False),
            ("*.example.test", "*.example.test", True),
            ("www.example.test", "*.example.test", False),
            ("w*.example.test", "www.example.test", False),
            ("*.*.example.test", "a.b.example.test", False),
        ],
    )
    def test_covers_follows_rfc_6125(self, san: str, host: str, expected: bool) -> None:
        """Wildcards match exactly one whole left-most label; names compare caselessly."""
        assert covers(san, host) is expected

    def test_catch_all_server_name_is_never_required(self) -> None:
        """nginx's '_' is not a host name and needs no coverage."""
        assert uncovered(["www.example.test"], ["_", "www.example.test"]) == []


class TestStateCertificates:
    """Sites are checked against the stored certificate they name."""

    def test_site_names_and_expiry_are_checked(self, pki: Pki) -> None:
        """Uncovered names are errors at the server name; near expiry is a warning."""
        state = DesiredState(
            sites=(
                tls_site("web", "www.example.test", "api.example.test", certificate="web"),
                tls_site("soon", "soon.example.test", certificate="soon"),
            )
        )
        stored = {
            "web": pki.stored("web", "www.example.test"),
            "soon": pki.stored("soon", "soon.example.test", days=5),
        }
        found = check_state_certificates(state, stored)
        assert (
            Problem(
                "sites[0].server_names[1]",
                "is not covered by certificate 'web' (valid for www.example.test)",
            )
            in found
        )
        (warning,) = [p for p in found if p.severity == "warning"]
        assert warning.path == "sites[1].tls.certificate"

    def test_expired_stored_certificate_is_an_error(self, pki: Pki) -> None:
        """A stored certificate past its expiry blocks the state."""
        state = DesiredState(sites=(tls_site("web", "www.example.test", certificate="web"),))
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
        found = check_state_certificates(
            state, {"web": pki.stored("web", "www.example.test")}, now=later
        )
        assert [p.severity for p in found] == ["error"]
        assert "expired on" in found[0].message

    def test_ec_key_of_another_curve_still_matches_by_public_key(self, pki: Pki) -> None:
        """Key matching compares public keys, so a P-384 leaf works with its own key."""
        key = ec.generate_private_key(ec.SECP384R1())
        leaf = pki.leaf("p384.example.test", key=key)
        assert validate_certificate(pki.chain(leaf), leaf.key_pem).domains == ("p384.example.test",)
