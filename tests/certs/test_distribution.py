"""Distribution: only the certificates an agent's sites use, keys encrypted on its disk."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from nxmesh.certs.acme_client import PendingChallenge
from nxmesh.certs.distribution import (
    AgentKeyVault,
    AgentMaterial,
    CertificateDistributor,
    CertificateMaterial,
    CertificateNeed,
    agents_needing,
    certificate_needs,
    is_placeholder,
)
from nxmesh.certs.errors import CertificateConflictError, CertificateError
from nxmesh.certs.http01 import ChallengeBoard
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Listener,
    Location,
    Return,
    Site,
    TLSConfig,
)
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.testing.pki import Pki

pytestmark = pytest.mark.anyio

TOKEN = "T" * 43
KEY_AUTH = TOKEN + "." + "k" * 43


def site(name: str, *names: str, certificate: str | None = None, tls: bool = True) -> Site:
    return Site(
        name=name,
        server_names=names,
        listeners=(Listener(port=80), *((Listener(port=443, tls=True),) if tls else ())),
        tls=(TLSConfig(certificate=certificate) if certificate else TLSConfig(acme=True))
        if tls
        else None,
        locations=(Location(path="/", return_=Return(code=200)),),
    )


WEB = site("web", "www.example.test", certificate="web")
BLOG = site("blog", "blog.example.test", certificate="web")
SHOP = site("shop", "shop.example.test")
PLAIN = site("plain", "plain.example.test", tls=False)


class TestNeeds:
    """What certificates a state uses, and which agents need one."""

    def test_uploads_are_shared_and_acme_is_per_site(self) -> None:
        """Two sites naming one upload share it; an ACME site has its own under certs/acme/."""
        state = DesiredState(
            sites=(WEB, BLOG, SHOP, PLAIN),
            certificates=(
                CertificateRef(name="web", domains=("www.example.test", "blog.example.test")),
                CertificateRef(name="later", domains=("later.example.test",), source="acme"),
            ),
        )
        assert certificate_needs(state) == [
            CertificateNeed(
                name="web",
                stem="certs/web",
                source="upload",
                domains=("www.example.test", "blog.example.test"),
                sites=("web", "blog"),
            ),
            CertificateNeed(
                name="shop",
                stem="certs/acme/shop",
                source="acme",
                domains=("shop.example.test",),
                sites=("shop",),
            ),
            CertificateNeed(
                name="later",
                stem="certs/later",
                source="acme",
                domains=("later.example.test",),
                sites=(),
            ),
        ]

    def test_only_agents_whose_sites_use_it(self) -> None:
        """After 'web' changes, only agents running a site that names it are rolled out."""
        agents = {
            "a1": DesiredState(sites=(WEB,)),
            "a2": DesiredState(sites=(SHOP,)),
            "a3": DesiredState(sites=(PLAIN, BLOG)),
            "a4": DesiredState(sites=(WEB,), workspace="staging"),
        }
        assert agents_needing("web", agents) == ["a1", "a3", "a4"]
        assert agents_needing("web", agents, workspace="default") == ["a1", "a3"]
        assert agents_needing("shop", agents) == ["a2"]


class TestDistributor:
    """The master builds each agent's material from storage."""

    async def test_agent_gets_only_its_certificates(self, storage: SqliteStorage, pki: Pki) -> None:
        """Stored certificates the state does not use never reach the agent."""
        await storage.put_certificate(pki.stored("web", "www.example.test", "blog.example.test"))
        await storage.put_certificate(pki.stored("other", "other.example.test"))
        material = await CertificateDistributor(storage).material_for_state(
            DesiredState(sites=(WEB, PLAIN))
        )
        assert [(c.name, c.stem) for c in material.certificates] == [("web", "certs/web")]
        files = material.plain_files()
        assert set(files) == {"certs/web.crt", "certs/web.key"}
        # Full chain: leaf then intermediate.
        assert files["certs/web.crt"].count(b"BEGIN CERTIFICATE") == 2

    async def test_unissued_acme_certificate_gets_a_stable_placeholder(
        self, storage: SqliteStorage
    ) -> None:
        """Until issuance a self-signed stand-in is sent, the same bytes every time."""
        distributor = CertificateDistributor(storage)
        state = DesiredState(sites=(SHOP,))
        first = await distributor.material_for_state(state)
        second = await distributor.material_for_state(state)
        (cert,) = first.certificates
        assert cert.placeholder
        assert is_placeholder(cert.fullchain_pem)
        assert first.plain_files() == second.plain_files()

    async def test_pending_challenges_follow_the_domains(self, storage: SqliteStorage) -> None:
        """HTTP-01 tokens go to agents serving the domain, and to no other."""
        board = ChallengeBoard()
        board.add(
            [
                PendingChallenge(
                    domain="shop.example.test",
                    type="http-01",
                    token=TOKEN,
                    key_authorization=KEY_AUTH,
                )
            ]
        )
        distributor = CertificateDistributor(storage, board=board)
        shop = await distributor.material_for_state(DesiredState(sites=(SHOP,)))
        plain = await distributor.material_for_state(DesiredState(sites=(PLAIN,)))
        assert shop.challenges == {TOKEN: KEY_AUTH}
        assert shop.plain_files()[f"acme-challenge/{TOKEN}"] == KEY_AUTH.encode()
        assert plain.challenges == {}

    async def test_missing_upload_is_an_error(self, storage: SqliteStorage) -> None:
        """A state naming a certificate that is not stored cannot be distributed."""
        with pytest.raises(CertificateError, match=r"'web'.*upload it first"):
            await CertificateDistributor(storage).material_for_state(DesiredState(sites=(WEB,)))

    async def test_acme_site_named_like_an_upload_is_a_conflict(
        self, storage: SqliteStorage, pki: Pki
    ) -> None:
        """An uploaded certificate is never served in place of a site's ACME one."""
        await storage.put_certificate(pki.stored("shop", "shop.example.test"))
        with pytest.raises(CertificateConflictError, match="rename"):
            await CertificateDistributor(storage).material_for_state(DesiredState(sites=(SHOP,)))


class TestKeyVault:
    """On the agent, private keys are written encrypted under its own passphrase."""

    async def test_keys_are_encrypted_pkcs8_under_the_password_file(
        self, storage: SqliteStorage, pki: Pki, tmp_path: Path
    ) -> None:
        """The key file is encrypted PKCS#8 that the 0600 passphrase file opens."""
        stored = pki.stored("web", "www.example.test", "blog.example.test")
        await storage.put_certificate(stored)
        material = await CertificateDistributor(storage).material_for_state(
            DesiredState(sites=(WEB,))
        )
        vault = AgentKeyVault(tmp_path / "vault")
        files = vault.extra_files(material)
        key = files["certs/web.key"]
        assert key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert stat.S_IMODE(vault.password_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(vault.directory.stat().st_mode) == 0o700
        passphrase = vault.password_file.read_bytes().strip()
        loaded = serialization.load_pem_private_key(key, password=passphrase)
        original = serialization.load_pem_private_key(stored.key_pem.encode(), password=None)
        assert loaded.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == original.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with pytest.raises(ValueError, match=r"(?i)bad decrypt|incorrect password"):
            serialization.load_pem_private_key(key, password=b"wrong")

    def test_same_key_gives_the_same_bytes_across_restarts(self, pki: Pki, tmp_path: Path) -> None:
        """Encryption is randomised, but a key is encrypted once: bundles stay stable."""
        leaf = pki.leaf("www.example.test")
        first = AgentKeyVault(tmp_path / "vault").encrypted_key(leaf.key_pem)
        again = AgentKeyVault(tmp_path / "vault").encrypted_key(leaf.key_pem)
        other = AgentKeyVault(tmp_path / "other").encrypted_key(leaf.key_pem)
        assert first == again
        assert first != other  # another agent, another passphrase

    def test_prune_drops_keys_no_longer_used(self, pki: Pki, tmp_path: Path) -> None:
        """Cached encrypted keys of certificates no state uses are deleted."""
        vault = AgentKeyVault(tmp_path / "vault")
        old, new = pki.leaf("old.example.test"), pki.leaf("new.example.test")
        vault.encrypted_key(old.key_pem)
        vault.encrypted_key(new.key_pem)
        keep = AgentMaterial(
            certificates=(
                CertificateMaterial(
                    name="new",
                    stem="certs/new",
                    fullchain_pem=new.pem,
                    key_pem=new.key_pem,
                    not_after=0.0,
                    fingerprint="x",
                ),
            )
        )
        assert vault.prune([keep]) == 1
        assert len(list((vault.directory / "keys").iterdir())) == 1

    def test_prune_unreferenced_keeps_what_kept_trees_hold(self, pki: Pki, tmp_path: Path) -> None:
        """Keys whose encrypted bytes no kept release tree holds are deleted."""
        vault = AgentKeyVault(tmp_path / "vault")
        old, new = pki.leaf("old.example.test"), pki.leaf("new.example.test")
        vault.encrypted_key(old.key_pem)
        current = tmp_path / "releases" / "current"
        (current / "certs").mkdir(parents=True)
        (current / "certs" / "web.key").write_bytes(vault.encrypted_key(new.key_pem))
        (current / "nginx.conf").write_text("events {}\n")
        assert vault.prune_unreferenced([current]) == 1
        [kept] = (vault.directory / "keys").iterdir()
        assert kept.read_bytes() == (current / "certs" / "web.key").read_bytes()
        assert vault.prune_unreferenced([current]) == 0

    def test_material_repr_never_shows_the_key(self, pki: Pki) -> None:
        """Key material stays out of repr (and so out of logs and tracebacks)."""
        leaf = pki.leaf("www.example.test")
        material = CertificateMaterial(
            name="web",
            stem="certs/web",
            fullchain_pem=leaf.pem,
            key_pem=leaf.key_pem,
            not_after=0.0,
            fingerprint="x",
        )
        assert "PRIVATE KEY" not in repr(material)
        assert "PRIVATE KEY" not in repr(AgentMaterial(certificates=(material,)))
