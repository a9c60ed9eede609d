"""The renderer's ACME and encrypted-key support, and the certs policy plugin."""

from __future__ import annotations

from pathlib import Path

import crossplane
import pytest

from nxmesh.certs.acme_client import PendingChallenge
from nxmesh.certs.errors import CertificateError
from nxmesh.certs.http01 import ChallengeBoard, challenge_files
from nxmesh.certs.plugin import acme_problems
from nxmesh.certs.settings import CertsSettings, certs_settings
from nxmesh.core.bundle import Bundle
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Listener,
    Location,
    Return,
    Site,
    TLSConfig,
)
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.policy import policy_problems
from nxmesh.core.settings import load_settings
from nxmesh.plugins.render_nginx import NginxRenderer, RenderError, RenderSettings

TOKEN = "A" * 43
KEY_AUTH = TOKEN + "." + "B" * 43
CHALLENGE_LOCATION = ["^~", "/.well-known/acme-challenge/"]


def site(
    name: str,
    *names: str,
    tls: TLSConfig | None = None,
    plain: bool = True,
) -> Site:
    listeners = (
        *((Listener(port=80),) if plain else ()),
        *((Listener(port=443, tls=True),) if tls else ()),
    )
    return Site(
        name=name,
        server_names=names or (f"{name}.example.test",),
        listeners=listeners,
        tls=tls,
        locations=(Location(path="/", return_=Return(code=200)),),
    )


def servers(bundle: Bundle, name: str, tmp_path: Path) -> list[dict[str, object]]:
    """The parsed server blocks of one site's file."""
    path = tmp_path / f"{name}.conf"
    path.write_bytes(bundle.files[f"conf.d/site-{name}.conf"])
    parsed = crossplane.parse(str(path), single=True, check_ctx=False, check_args=False)
    return [d for d in parsed["config"][0]["parsed"] if d["directive"] == "server"]


def locations(server: dict[str, object]) -> dict[tuple[str, ...], list[dict[str, object]]]:
    block = server["block"]
    assert isinstance(block, list)
    return {tuple(d["args"]): d["block"] for d in block if d["directive"] == "location"}


class TestChallengeLocation:
    """HTTP-01 is answered from the bundle's acme-challenge/ directory, before redirects."""

    def test_acme_site_serves_tokens_on_its_plain_server(self, tmp_path: Path) -> None:
        """The redirect server has the exact-prefix location aliasing the live tree's tokens."""
        state = DesiredState(sites=(site("shop", tls=TLSConfig(acme=True)),))
        bundle = NginxRenderer().render(state, extra_files=challenge_files({TOKEN: KEY_AUTH}))
        redirect, main = servers(bundle, "shop", tmp_path)
        block = locations(redirect)[tuple(CHALLENGE_LOCATION)]
        assert {"directive": "alias", "args": ["current/acme-challenge/"]} in [
            {"directive": d["directive"], "args": d["args"]} for d in block
        ]
        assert tuple(CHALLENGE_LOCATION) not in locations(main)
        assert bundle.files[f"acme-challenge/{TOKEN}"] == KEY_AUTH.encode()

    def test_uploaded_certificate_site_has_no_challenge_location(self, tmp_path: Path) -> None:
        """Sites not using ACME do not expose the challenge path."""
        state = DesiredState(sites=(site("web", tls=TLSConfig(certificate="web")),))
        for server in servers(NginxRenderer().render(state), "web", tmp_path):
            assert tuple(CHALLENGE_LOCATION) not in locations(server)

    def test_acme_sourced_certificate_gets_the_location(self, tmp_path: Path) -> None:
        """A site naming a certificate with source acme is validated over HTTP-01 too."""
        state = DesiredState(
            sites=(site("app", tls=TLSConfig(certificate="shared")),),
            certificates=(
                CertificateRef(name="shared", domains=("app.example.test",), source="acme"),
            ),
        )
        redirect, _ = servers(NginxRenderer().render(state), "app", tmp_path)
        assert tuple(CHALLENGE_LOCATION) in locations(redirect)

    def test_without_redirect_the_main_server_serves_tokens(self, tmp_path: Path) -> None:
        """With redirect_http off the one server answers HTTP-01 itself."""
        tls = TLSConfig(acme=True, redirect_http=False)
        (main,) = servers(
            NginxRenderer().render(DesiredState(sites=(site("shop", tls=tls),))), "shop", tmp_path
        )
        assert next(iter(locations(main))) == tuple(CHALLENGE_LOCATION)

    @pytest.mark.parametrize("token", ["../../certs/web.key", "a/b", "short", "x" * 43 + "$"])
    def test_malformed_tokens_never_become_files(self, token: str) -> None:
        """Only base64url tokens of ACME's length are written."""
        with pytest.raises(CertificateError):
            challenge_files({token: token + "." + "B" * 43})

    def test_key_authorization_must_match_its_token(self) -> None:
        """A key authorization for another token is refused."""
        with pytest.raises(CertificateError, match="malformed"):
            challenge_files({TOKEN: "C" * 43 + "." + "B" * 43})

    def test_board_tracks_tokens_per_domain(self) -> None:
        """Adding and removing challenges leaves exactly the pending tokens."""
        board = ChallengeBoard()
        pending = PendingChallenge(
            domain="shop.example.test", type="http-01", token=TOKEN, key_authorization=KEY_AUTH
        )
        assert board.add([pending]) == frozenset({"shop.example.test"})
        assert board.for_domains(["shop.example.test", "x.test"]) == {TOKEN: KEY_AUTH}
        board.remove([pending])
        assert len(board) == 0
        assert board.domains() == frozenset()


class TestEncryptedKeys:
    """Sites whose key file is encrypted get ssl_password_file."""

    ENCRYPTED = (
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )

    def test_password_file_is_emitted_for_encrypted_keys_only(self, tmp_path: Path) -> None:
        """Only the site with an encrypted key names the passphrase file."""
        state = DesiredState(
            sites=(
                site("a", tls=TLSConfig(certificate="a")),
                site("b", tls=TLSConfig(certificate="b")),
            )
        )
        renderer = NginxRenderer(
            settings=RenderSettings(ssl_password_file="/var/lib/nxmesh/ssl_password")
        )
        bundle = renderer.render(
            state,
            extra_files={
                "certs/a.crt": b"c",
                "certs/a.key": self.ENCRYPTED,
                "certs/b.crt": b"c",
                "certs/b.key": b"-----BEGIN PRIVATE KEY-----\n",
            },
        )
        (_, main_a) = servers(bundle, "a", tmp_path)
        (_, main_b) = servers(bundle, "b", tmp_path)

        def directive(server: dict[str, object], name: str) -> list[list[str]]:
            block = server["block"]
            assert isinstance(block, list)
            return [d["args"] for d in block if d["directive"] == name]

        assert directive(main_a, "ssl_password_file") == [["/var/lib/nxmesh/ssl_password"]]
        assert directive(main_b, "ssl_password_file") == []

    def test_encrypted_key_without_password_file_is_refused(self) -> None:
        """Rendering an encrypted key nginx could not open is an error naming the file."""
        state = DesiredState(sites=(site("a", tls=TLSConfig(certificate="a")),))
        with pytest.raises(RenderError, match=r"certs/a\.key is encrypted"):
            NginxRenderer().render(state, extra_files={"certs/a.key": self.ENCRYPTED})

    def test_password_file_must_be_absolute(self) -> None:
        """A relative passphrase path would resolve inside the release tree: refused."""
        with pytest.raises(ValueError, match="absolute"):
            RenderSettings(ssl_password_file="ssl_password")

    def test_extra_files_only_under_certs_and_acme_challenge(self) -> None:
        """Other directories stay closed to extra files."""
        with pytest.raises(RenderError, match="acme-challenge/"):
            NginxRenderer().render(DesiredState(), extra_files={"conf.d/x.conf": b"x"})
        with pytest.raises(RenderError):
            NginxRenderer().render(DesiredState(), extra_files={"acme-challenge": b"x"})


class TestPolicy:
    """The certs plugin's settings section and nxmesh_validate_state checks."""

    def test_settings_section_reads_env(
        self, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """[plugins.certs] is declared by the built-in plugin and filled from NXMESH_*."""
        settings = load_settings(
            plugin_manager,
            environ={
                "NXMESH_PLUGINS__CERTS__RENEW_BEFORE_DAYS": "20",
                "NXMESH_PLUGINS__CERTS__CONTACT_EMAIL": "ops@example.test",
                "NXMESH_PLUGINS__CERTS__CA_BUNDLE": "/etc/ssl/private-ca.pem",
            },
            overrides={"state_dir": tmp_path},
        )
        section = certs_settings(settings)
        assert isinstance(section, CertsSettings)
        assert section.renew_before_days == 20
        assert section.contact_email == "ops@example.test"
        assert section.ca_bundle == Path("/etc/ssl/private-ca.pem")
        assert section.key_type == "ec-p256"

    def test_bad_settings_are_refused(self) -> None:
        """Invalid values name the setting."""
        with pytest.raises(ValueError, match="challenge"):
            CertsSettings(challenge="tls-alpn-01")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="dns_command"):
            CertsSettings(dns_command=("",))
        with pytest.raises(ValueError, match="contact_email"):
            CertsSettings(contact_email="a@b, c@d")

    def test_policy_reports_acme_mistakes(self, plugin_manager: NxMeshPluginManager) -> None:
        """Name clashes block the state; wildcards and unreachable HTTP-01 are warnings."""
        state = DesiredState(
            sites=(
                site("web", tls=TLSConfig(acme=True)),
                site("wild", "*.example.test", tls=TLSConfig(acme=True)),
                site("closed", tls=TLSConfig(acme=True, redirect_http=False), plain=False),
            ),
            certificates=(CertificateRef(name="web", domains=("web.example.test",)),),
        )
        found = {(p.path, p.severity) for p in policy_problems(plugin_manager, state)}
        assert ("sites[0].name", "error") in found
        assert ("sites[1].server_names[0]", "warning") in found
        assert ("sites[2].tls.redirect_http", "warning") in found
        assert acme_problems(DesiredState(sites=(site("ok", tls=TLSConfig(acme=True)),))) == []
