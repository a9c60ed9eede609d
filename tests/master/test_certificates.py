"""Certificate upload: chain order, key match, expiry and SANs checked; key encrypted at rest."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .certs import NOW, chain, issue
from .conftest import Master

CERTS = "/api/v1/workspaces/default/certificates"


def upload(master: Master, body: dict[str, Any], method: str = "POST", name: str = "") -> Any:
    url = f"{CERTS}/{name}" if name else CERTS
    return master.client.request(
        method, url, json=body, headers=master.headers("admin", subject="admin")
    )


def errors(response: Any) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    return [(e["path"], e["message"]) for e in response.json()["errors"]]


class TestUpload:
    """What an upload must satisfy before anything is stored."""

    def test_valid_chain_is_stored_and_shown_without_the_key(self, master: Master) -> None:
        """Leaf + intermediate with the matching key is accepted; reads never show the key."""
        _, intermediate, leaf = chain()
        body = {
            "name": "www",
            "certificate": leaf.cert_pem + intermediate.cert_pem,
            "private_key": leaf.key_pem,
        }
        response = upload(master, body)
        assert response.status_code == 201, response.text
        view = response.json()
        assert view["domains"] == ["www.example.test", "example.test"]
        assert view["chain_length"] == 2
        assert view["subject"] == "CN=www.example.test"
        assert "private_key" not in view
        listed = master.client.get(CERTS, headers=master.headers("viewer")).json()
        assert [c["name"] for c in listed] == ["www"]
        assert "PRIVATE KEY" not in str(listed)

    def test_private_key_is_encrypted_at_rest(self, master: Master) -> None:
        """The database never holds the PEM key, only an AES-GCM token of it."""
        _, _intermediate, leaf = chain()
        body = {"name": "www", "certificate": leaf.cert_pem, "private_key": leaf.key_pem}
        assert upload(master, body).status_code == 201
        raw = master.call(master.services.storage.dump_raw)  # type: ignore[attr-defined]
        key_body = leaf.key_pem.splitlines()[1].encode()
        assert b"PRIVATE KEY" not in raw
        assert key_body not in raw

    def test_key_must_belong_to_the_leaf(self, master: Master) -> None:
        """Another key than the leaf's is refused at ``private_key``."""
        _, _, leaf = chain()
        other = issue("other", dns=("other.test",))
        body = {"name": "www", "certificate": leaf.cert_pem, "private_key": other.key_pem}
        [(path, message)] = errors(upload(master, body))
        assert path == "private_key"
        assert message.startswith("does not belong to the certificate")

    def test_chain_order_is_checked(self, master: Master) -> None:
        """An intermediate first (or an unrelated certificate) is a chain error."""
        root, intermediate, leaf = chain()
        body = {
            "name": "www",
            "certificate": leaf.cert_pem + root.cert_pem + intermediate.cert_pem,
            "private_key": leaf.key_pem,
        }
        found = errors(upload(master, body))
        assert [path for path, _ in found] == ["certificate.chain[0]", "certificate.chain[1]"]
        assert "wrong chain order" in found[0][1]

    def test_expired_and_not_yet_valid_certificates_are_refused(self, master: Master) -> None:
        """Expiry and notBefore are checked for every certificate."""
        old = issue(
            "old.test",
            dns=("old.test",),
            not_before=NOW - dt.timedelta(days=90),
            not_after=NOW - dt.timedelta(days=1),
        )
        body = {"name": "old", "certificate": old.cert_pem, "private_key": old.key_pem}
        [(path, message)] = errors(upload(master, body))
        assert path == "certificate"
        assert message.startswith("expired on")
        future = issue("new.test", dns=("new.test",), not_before=NOW + dt.timedelta(days=3))
        body = {"name": "new", "certificate": future.cert_pem, "private_key": future.key_pem}
        assert "not valid before" in errors(upload(master, body))[0][1]

    def test_a_dns_san_is_required(self, master: Master) -> None:
        """A certificate naming no DNS name cannot serve a site."""
        bare = issue("bare")
        body = {"name": "bare", "certificate": bare.cert_pem, "private_key": bare.key_pem}
        [(path, message)] = errors(upload(master, body))
        assert path == "certificate"
        assert message.startswith("names no DNS name in its subjectAltName")

    def test_garbage_and_encrypted_keys_are_refused(self, master: Master) -> None:
        """Not-PEM input and passphrase-protected keys get clear messages."""
        _, _, leaf = chain()
        body = {"name": "x", "certificate": "hello", "private_key": leaf.key_pem}
        assert errors(upload(master, body))[0][0] == "certificate"
        body = {
            "name": "x",
            "certificate": leaf.cert_pem,
            "private_key": leaf.encrypted_key_pem(b"hunter22"),
        }
        [(path, message)] = errors(upload(master, body))
        assert path == "private_key"
        assert "encrypted" in message
        body = {"name": "x", "certificate": leaf.cert_pem + leaf.key_pem, "private_key": "x"}
        assert errors(upload(master, body))[0] == (
            "certificate",
            "contains a private key; send it in private_key only",
        )

    def test_expiring_soon_is_a_warning(self, master: Master) -> None:
        """A leaf with days left is stored, with a warning saying so."""
        soon = issue("soon.test", dns=("soon.test",), not_after=NOW + dt.timedelta(days=5))
        body = {"name": "soon", "certificate": soon.cert_pem, "private_key": soon.key_pem}
        response = upload(master, body)
        assert response.status_code == 201
        [warning] = response.json()["warnings"]
        assert (warning["path"], warning["severity"]) == ("certificate", "warning")
        assert "renew it soon" in warning["message"]


class TestLifecycle:
    """Replace, reference from the desired state, delete."""

    def test_replace_reference_and_delete(self, master: Master) -> None:
        """A site may use an uploaded certificate, which then cannot be deleted."""
        _, _, leaf = chain()
        body = {"name": "www", "certificate": leaf.cert_pem, "private_key": leaf.key_pem}
        assert upload(master, body).status_code == 201
        assert upload(master, body).status_code == 409
        assert upload(master, body, method="PUT", name="www").status_code == 200
        admin = master.headers("admin", subject="admin")
        state = {
            "certificates": [{"name": "www", "domains": ["www.example.test"]}],
            "sites": [
                {
                    "name": "www",
                    "server_names": ["www.example.test"],
                    "listeners": [{"port": 443, "tls": True}],
                    "tls": {"certificate": "www"},
                    "locations": [{"path": "/", "return": {"code": 200, "body": "hi"}}],
                }
            ],
        }
        put = master.client.put("/api/v1/workspaces/default/state", json=state, headers=admin)
        assert put.status_code == 200, put.text
        assert master.client.delete(f"{CERTS}/www", headers=admin).status_code == 409
        master.client.put("/api/v1/workspaces/default/state", json={}, headers=admin)
        assert master.client.delete(f"{CERTS}/www", headers=admin).status_code == 204
        assert master.client.get(f"{CERTS}/www", headers=admin).status_code == 404

    def test_renewal_must_cover_the_sites_using_it(self, master: Master) -> None:
        """A replacement that drops a server name in use is refused; states are checked too."""
        _, _, leaf = chain()
        admin = master.headers("admin", subject="admin")
        body = {"name": "www", "certificate": leaf.cert_pem, "private_key": leaf.key_pem}
        assert upload(master, body).status_code == 201
        state = {
            "certificates": [{"name": "www", "domains": ["www.example.test"]}],
            "sites": [
                {
                    "name": "www",
                    "server_names": ["www.example.test"],
                    "listeners": [{"port": 443, "tls": True}],
                    "tls": {"certificate": "www"},
                    "locations": [{"path": "/", "return": {"code": 200}}],
                }
            ],
        }
        master.client.put("/api/v1/workspaces/default/state", json=state, headers=admin)
        other = issue("other.test", dns=("other.test",))
        body = {"name": "www", "certificate": other.cert_pem, "private_key": other.key_pem}
        [(path, message)] = errors(upload(master, body, method="PUT", name="www"))
        assert path == "certificate"
        assert "www.example.test" in message
        state["sites"][0]["server_names"] = ["api.example.test"]  # type: ignore[index]
        response = master.client.put("/api/v1/workspaces/default/state", json=state, headers=admin)
        assert errors(response)[0][0] == "sites[0].server_names[0]"

    def test_state_naming_a_missing_certificate_is_refused(self, master: Master) -> None:
        """A certificate reference must name an uploaded certificate."""
        state = {"certificates": [{"name": "ghost", "domains": ["a.example.test"]}]}
        response = master.client.put(
            "/api/v1/workspaces/default/state",
            json=state,
            headers=master.headers("admin", subject="admin"),
        )
        assert errors(response)[0][0] == "certificates[0].name"


class TestStreams:
    """TCP streams ending TLS name certificates as sites do."""

    def test_a_stream_names_a_stored_certificate_and_hears_of_its_expiry(
        self, master: Master
    ) -> None:
        """Through the streams resource: the certificate's expiry is checked as a site's
        (no names to cover), it cannot be deleted while declared, and a TLS UDP stream is
        refused by field."""
        soon = issue("db.test", dns=("db.test",), not_after=NOW + dt.timedelta(days=5))
        body = {"name": "db", "certificate": soon.cert_pem, "private_key": soon.key_pem}
        assert upload(master, body).status_code == 201
        admin = master.headers("admin", subject="admin")
        state = {
            "certificates": [{"name": "db", "domains": ["db.test"]}],
            "upstreams": [{"name": "pg", "servers": [{"address": "127.0.0.1:5432"}]}],
        }
        put = master.client.put("/api/v1/workspaces/default/state", json=state, headers=admin)
        assert put.status_code == 200, put.text
        streams = "/api/v1/workspaces/default/streams"
        stream = {"name": "pg", "port": 6432, "upstream": "pg", "tls": {"certificate": "db"}}
        created = master.client.post(streams, json=stream, headers=admin)
        assert created.status_code == 201, created.text
        [warning] = created.json()["warnings"]
        assert warning["path"] == "streams[0].tls.certificate"
        assert "expires in" in warning["message"]
        assert master.client.get(f"{streams}/pg", headers=admin).json()["tls"] == {
            "certificate": "db",
            "protocols": ["TLSv1.2", "TLSv1.3"],
        }
        udp = {**stream, "name": "dns", "port": 53, "protocol": "udp"}
        [(path, message)] = errors(master.client.post(streams, json=udp, headers=admin))
        assert path == "tls"
        assert "no DTLS" in message
        typo = {**stream, "name": "pg2", "port": 6433, "tls": {"certificate": "dbb"}}
        [(path, message)] = errors(master.client.post(streams, json=typo, headers=admin))
        assert path == "streams[1].tls.certificate"
        assert "did you mean 'db'" in message
        # A replacement must cover the domains the state declares for it: the names the
        # stream's clients check.
        other = issue("evil.test", dns=("evil.test",))
        body = {"name": "db", "certificate": other.cert_pem, "private_key": other.key_pem}
        [(path, message)] = errors(upload(master, body, method="PUT", name="db"))
        assert path == "certificate"
        assert "db.test" in message
