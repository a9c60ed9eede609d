"""ACME client pieces that need no CA: error mapping, rate limits, keys, the account file."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nxmesh.certs.acme_client import (
    AccountKeyFile,
    AcmeClient,
    _map_error,
    _retry_at,
    generate_private_key,
    normalize_domains,
)
from nxmesh.certs.errors import (
    AcmeAccountError,
    AcmeConnectionError,
    AcmeOrderError,
    AcmeRateLimitedError,
)
from nxmesh.crypto.secrets import MasterKeyring, generate_key

pytestmark = pytest.mark.anyio

RATE_LIMITED = {
    "type": "urn:ietf:params:acme:error:rateLimited",
    "detail": "too many new orders recently",
}


class _RateLimiting(BaseHTTPRequestHandler):
    """Answers every request as a rate-limited CA would: 429, problem+json, Retry-After."""

    def do_GET(self) -> None:
        body = json.dumps(RATE_LIMITED).encode()
        self.send_response(429)
        self.send_header("Content-Type", "application/problem+json")
        self.send_header("Retry-After", "120")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def rate_limited_ca() -> Iterator[str]:
    """A loopback HTTP server that rate-limits everything (Pebble never does)."""
    server = HTTPServer(("127.0.0.1", 0), _RateLimiting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/directory"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class TestErrors:
    """What the CA says becomes a specific NxMesh error."""

    async def test_rate_limit_carries_retry_after(
        self, rate_limited_ca: str, tmp_path: Path
    ) -> None:
        """A 429 rateLimited answer gives retry_at from Retry-After and the CA's detail."""
        key = AccountKeyFile(tmp_path / "k", MasterKeyring(generate_key()), rate_limited_ca)
        client = AcmeClient(rate_limited_ca, key.load_or_create(), agree_tos=True)
        before = time.time()
        with pytest.raises(AcmeRateLimitedError) as exc:
            await client.register()
        await client.aclose()
        assert exc.value.retry_at is not None
        assert before + 119 <= exc.value.retry_at <= time.time() + 121
        assert exc.value.code == "rateLimited"
        assert "too many new orders recently" in str(exc.value)
        assert "retry after" in str(exc.value)

    def test_problem_types_map_to_error_classes(self) -> None:
        """Order-level and account-level problem types get their own classes."""
        order = messages.Error(
            typ="urn:ietf:params:acme:error:rejectedIdentifier", detail="forbidden name"
        )
        account = messages.Error(typ="urn:ietf:params:acme:error:invalidContact", detail="bad")
        mapped = _map_error(order, "creating the order", ["a.test"], None, "https://ca")
        assert isinstance(mapped, AcmeOrderError)
        assert str(mapped) == (
            "creating the order (a.test) failed: the ACME server answered rejectedIdentifier: "
            "forbidden name"
        )
        assert isinstance(_map_error(account, "registering", [], None, "u"), AcmeAccountError)

    def test_network_failures_are_connection_errors(self) -> None:
        """Refused connections and TLS failures name the server; TLS ones hint at ca_bundle."""
        refused = _map_error(
            requests.exceptions.ConnectionError("refused"), "x", [], None, "https://ca/dir"
        )
        tls = _map_error(requests.exceptions.SSLError("bad cert"), "x", [], None, "https://ca/dir")
        assert isinstance(refused, AcmeConnectionError)
        assert "https://ca/dir" in str(refused)
        assert isinstance(tls, AcmeConnectionError)
        assert "ca_bundle" in str(tls)
        assert _map_error(KeyError("bug"), "x", [], None, "u") is None  # bugs stay bugs

    def test_retry_after_accepts_seconds_and_dates(self) -> None:
        """Both Retry-After forms of RFC 9110 are understood."""
        assert _retry_at("30", 1000.0) == 1030.0
        when = email.utils.formatdate(2_000_000_000, usegmt=True)
        assert _retry_at(when, 0.0) == 2_000_000_000
        assert _retry_at("soon", 0.0) is None
        assert _retry_at(None, 0.0) is None


class TestKeys:
    """Certificate keys are fresh and of the configured type; the account key is sealed."""

    @pytest.mark.parametrize(
        ("key_type", "cls", "size"),
        [
            ("ec-p256", ec.EllipticCurvePrivateKey, 256),
            ("ec-p384", ec.EllipticCurvePrivateKey, 384),
            ("rsa-2048", rsa.RSAPrivateKey, 2048),
        ],
    )
    def test_key_types(self, key_type: str, cls: type, size: int) -> None:
        """Each key type gives a key of that algorithm and size."""
        key = generate_private_key(key_type)  # type: ignore[arg-type]
        assert isinstance(key, cls)
        assert key.key_size == size

    def test_domains_are_normalized(self) -> None:
        """Case, trailing dots, duplicates and '_' are cleaned; order is kept."""
        assert normalize_domains(["WWW.Example.test.", "_", "www.example.test", "a.test"]) == (
            "www.example.test",
            "a.test",
        )

    def test_account_key_survives_master_key_rotation(self, tmp_path: Path) -> None:
        """After a rotation the file is rewrapped under the new key and still loads."""
        old = generate_key()
        path = tmp_path / "acme" / "account.key"
        original = AccountKeyFile(path, MasterKeyring(old), "https://ca/dir").load_or_create()
        rotated = AccountKeyFile(path, MasterKeyring(generate_key(), [old]), "https://ca/dir")
        assert rotated.rewrap() is True
        assert rotated.rewrap() is False
        assert rotated.load_or_create().thumbprint() == original.thumbprint()

    def test_a_key_file_in_a_read_only_place_still_loads(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A configured ``account_key_file`` may sit on a read-only mount (a Kubernetes
        secret): the ``.directory`` file beside it cannot be written, and that must not
        keep the key from loading (the configured CA's key is rewrapped without it)."""
        import errno

        from nxmesh.certs import acme_client

        path = tmp_path / "secret" / "account.key"
        keyring = MasterKeyring(generate_key())
        created = AccountKeyFile(path, keyring, "https://ca/dir").load_or_create()
        path.with_name("account.key.directory").unlink()
        real_write = acme_client.write_private_file

        def read_only(target: Path, data: bytes, *, replace: bool = False) -> bool:
            if target.parent == path.parent:
                raise OSError(errno.EROFS, "Read-only file system", str(target))
            return real_write(target, data, replace=replace)

        monkeypatch.setattr(acme_client, "write_private_file", read_only)
        loaded = AccountKeyFile(path, keyring, "https://ca/dir").load_or_create()
        assert loaded.thumbprint() == created.thumbprint()

    def test_account_keys_of_earlier_cas_are_rewrapped_too(self, tmp_path: Path) -> None:
        """A rotation re-encrypts the keys of CAs configured before (found with their
        directory URL), not just the current CA's; after it the new key alone opens
        them all. A key file whose URL is unknown is named in a warning, not lost."""
        from structlog.testing import capture_logs

        from nxmesh.certs.acme_client import account_key_path, rewrap_account_keys
        from nxmesh.certs.settings import CertsSettings
        from nxmesh.core.pluginmanager import get_plugin_manager
        from nxmesh.core.settings import load_settings

        settings = load_settings(
            get_plugin_manager(environ={}), environ={}, overrides={"state_dir": tmp_path}
        )
        old = generate_key()
        cas = [CertsSettings(acme_directory=f"https://ca{i}.test/dir") for i in range(2)]
        paths = [account_key_path(settings, c) for c in cas]
        thumbprints = [
            AccountKeyFile(p, MasterKeyring(old), c.acme_directory).load_or_create().thumbprint()
            for p, c in zip(paths, cas, strict=True)
        ]
        orphan = paths[0].with_name("account-0123456789abcdef.key")
        orphan.write_bytes(paths[0].read_bytes())
        orphan.chmod(0o600)
        # An earlier CA's key under a key the ring does not hold: skipped, not fatal.
        stranger = CertsSettings(acme_directory="https://ca-stranger.test/dir")
        unreadable = account_key_path(settings, stranger)
        AccountKeyFile(
            unreadable, MasterKeyring(generate_key()), stranger.acme_directory
        ).load_or_create()
        new = generate_key()
        with capture_logs() as logs:
            assert rewrap_account_keys(settings, cas[1], MasterKeyring(new, [old])) == 2
        assert rewrap_account_keys(settings, cas[1], MasterKeyring(new, [old])) == 0
        for path, ca, thumbprint in zip(paths, cas, thumbprints, strict=True):
            alone = AccountKeyFile(path, MasterKeyring(new), ca.acme_directory)
            assert alone.load_or_create().thumbprint() == thumbprint
        warned = sorted(e["key_file"] for e in logs if e["log_level"] == "warning")
        assert warned == sorted([str(orphan), str(unreadable)])

    def test_account_key_is_bound_to_its_ca(self, tmp_path: Path) -> None:
        """The same file does not open for another directory URL."""
        from nxmesh.crypto.secrets import SecretError

        keyring = MasterKeyring(generate_key())
        path = tmp_path / "account.key"
        AccountKeyFile(path, keyring, "https://staging/dir").load_or_create()
        with pytest.raises(SecretError):
            AccountKeyFile(path, keyring, "https://production/dir").load_or_create()
