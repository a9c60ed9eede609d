"""``nxmesh login`` and the client's credentials against a real master: storage mode,
refresh rotation, exit codes, and no secret in any output or log."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nxmesh.client import Client, CredentialStore, Profile
from nxmesh.client.credentials import CredentialsError, config_dir
from nxmesh.testing.pki import Pki

from .conftest import Cli


def _stored(cli: Cli) -> dict[str, object]:
    data: dict[str, object] = json.loads(cli.credentials.read_text())["profiles"]["default"]
    return data


class TestLogin:
    """Logging in stores a session, never the password."""

    def test_login_stores_session_with_private_modes(self, cli: Cli) -> None:
        """The credentials file is 0600 in a 0700 directory and holds tokens, no password."""
        result = cli.login()
        assert result.exit_code == 0, result.output
        assert f"logged in to {cli.master.url} as admin" in result.stdout
        assert stat.S_IMODE(cli.credentials.stat().st_mode) == 0o600
        assert stat.S_IMODE(cli.credentials.parent.stat().st_mode) == 0o700
        stored = _stored(cli)
        assert stored["url"] == cli.master.url
        assert str(stored["refresh_token"]).startswith("nxr_")
        assert cli.master.admin_password not in cli.credentials.read_text()

    def test_whoami_uses_the_stored_login(self, cli: Cli) -> None:
        """A later command authenticates with the stored session."""
        cli.login()
        result = cli("whoami", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["subject"] == "admin"

    def test_a_session_rotated_during_login_is_the_one_stored(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An access token that expires within the refresh margin (a short
        ``auth.access_token_ttl``) is rotated by login's own ``whoami``: the rotated pair
        is stored, not the spent one (which the master takes as reuse and revokes)."""
        import nxmesh.client.api

        monkeypatch.setattr(nxmesh.client.api, "REFRESH_MARGIN", 10 * 24 * 3600.0)
        assert cli.login().exit_code == 0
        result = cli("whoami", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["subject"] == "admin"

    def test_profiles_are_separate(self, cli: Cli) -> None:
        """``--profile`` logins do not replace the default one."""
        cli.login()
        assert cli.login("admin", None, "--profile", "ops").exit_code == 0
        data = json.loads(cli.credentials.read_text())["profiles"]
        assert set(data) == {"default", "ops"}
        assert data["default"]["refresh_token"] != data["ops"]["refresh_token"]

    def test_logout_ends_the_session(self, cli: Cli) -> None:
        """After logout the stored refresh token is revoked on the master and forgotten."""
        cli.login()
        refresh = str(_stored(cli)["refresh_token"])
        result = cli("logout")
        assert result.exit_code == 0, result.output
        assert "default" not in json.loads(cli.credentials.read_text())["profiles"]
        response = httpx.post(
            f"{cli.master.url}/api/v1/auth/refresh", json={"refresh_token": refresh}
        )
        assert response.status_code == 401
        assert cli("whoami").exit_code == 3

    def test_api_token_login(self, cli: Cli) -> None:
        """An nxm_ API token read from stdin is stored and used instead of a session."""
        cli.login()
        created = cli("token", "create-api", "ci", "--scope", "config:read")
        assert created.exit_code == 0, created.output
        token = created.stdout.strip()
        assert token.startswith("nxm_")
        cli.credentials.unlink()
        result = cli("login", "--url", cli.master.url, "--api-token-stdin", input=token + "\n")
        assert result.exit_code == 0, result.output
        assert _stored(cli)["api_token"] == token
        me = cli("whoami")
        assert me.exit_code == 0, me.output
        assert "token scopes: config:read" in me.output  # not just the owner's grants
        assert cli("versions", "list", "-w", "nothing-here").exit_code == 0
        # The token only reads: writing is forbidden (exit 3).
        assert cli("user", "list").exit_code == 3

    def test_password_stdin_takes_the_saved_user_name(self, cli: Cli) -> None:
        """Without --username, --password-stdin logs in as the profile's previous user and
        prompts for nothing (a prompt would read the password line as the user name)."""
        cli.login()
        added = cli("user", "add", "stdin-sam", "-r", "viewer", "--password-stdin",
                    input="stdin-sam-password-1\n")  # fmt: skip
        assert added.exit_code == 0, added.output
        assert cli.login("stdin-sam", "stdin-sam-password-1").exit_code == 0
        result = cli("login", "--url", cli.master.url, "--password-stdin",
                     input="stdin-sam-password-1\n")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"logged in to {cli.master.url} as stdin-sam" in result.stdout
        assert "Username" not in result.output
        assert _stored(cli)["username"] == "stdin-sam"

    def test_password_stdin_without_user_name_exits_2(self, cli: Cli) -> None:
        """No --username and no previous login: exit 2 asking for --username, stdin unread."""
        result = cli("login", "--url", cli.master.url, "--password-stdin",
                     input=cli.master.admin_password + "\n")  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "pass --username" in result.stderr
        assert "Username" not in result.output
        assert cli.master.admin_password not in result.output
        assert not cli.credentials.exists()
        # --profile names the profile that has no previous login.
        other = cli("login", "--url", cli.master.url, "--password-stdin", "--profile", "ops",
                    input="whatever\n")  # fmt: skip
        assert other.exit_code == 2
        assert "profile 'ops'" in other.stderr


class TestRefresh:
    """Access tokens are renewed with single-use refresh tokens, saved before use."""

    def test_expired_access_token_is_rotated(self, cli: Cli) -> None:
        """A stale access token makes the client refresh once and store the new pair."""
        cli.login()
        before = _stored(cli)
        data = json.loads(cli.credentials.read_text())
        data["profiles"]["default"]["access_expires_at"] = time.time() - 1
        cli.credentials.write_text(json.dumps(data))
        result = cli("whoami")
        assert result.exit_code == 0, result.output
        after = _stored(cli)
        assert after["refresh_token"] != before["refresh_token"]
        assert after["access_token"] != before["access_token"]
        assert stat.S_IMODE(cli.credentials.stat().st_mode) == 0o600
        # The spent refresh token is dead: the master refuses it.
        spent = httpx.post(
            f"{cli.master.url}/api/v1/auth/refresh",
            json={"refresh_token": before["refresh_token"]},
        )
        assert spent.status_code == 401

    def test_rejected_access_token_is_refreshed_on_401(self, cli: Cli) -> None:
        """An access token the master refuses (forged) is replaced through the refresh token."""
        cli.login()
        data = json.loads(cli.credentials.read_text())
        data["profiles"]["default"]["access_token"] = "eyJhbGciOiJub25lIn0.e30."
        cli.credentials.write_text(json.dumps(data))
        result = cli("whoami")
        assert result.exit_code == 0, result.output
        assert _stored(cli)["access_token"] != "eyJhbGciOiJub25lIn0.e30."

    def test_concurrent_client_adopts_rotated_pair(self, cli: Cli) -> None:
        """A second client holding the old pair takes the rotated one instead of reusing it."""
        cli.login()
        store = CredentialStore(cli.credentials)
        stale = store.get("default")
        assert stale is not None
        stale = Profile(**{**stale.to_json(), "access_expires_at": time.time() - 1})
        with Client(stale, store=store) as first:
            first.me()  # rotates and saves
        with Client(stale, store=store) as second:
            assert second.me().subject == "admin"  # adopted, not a reuse (which revokes all)
        assert cli("whoami").exit_code == 0

    def test_revoked_session_asks_to_log_in(self, cli: Cli) -> None:
        """A reused refresh token ends the session: the CLI says to log in (exit 3)."""
        cli.login()
        before = _stored(cli)
        httpx.post(
            f"{cli.master.url}/api/v1/auth/refresh",
            json={"refresh_token": before["refresh_token"]},
        )  # someone else spent it
        data = json.loads(cli.credentials.read_text())
        data["profiles"]["default"]["access_expires_at"] = time.time() - 1
        cli.credentials.write_text(json.dumps(data))
        result = cli("whoami")
        assert result.exit_code == 3
        assert "nxmesh login" in result.stderr


class TestExitCodes:
    """Failures exit with the documented status and a clear message."""

    def test_bad_password_exits_3(self, cli: Cli) -> None:
        """A wrong password is exit 3 with the master's message; nothing is stored."""
        result = cli.login("admin", "wrong password, really")
        assert result.exit_code == 3
        assert "invalid username or password" in result.stderr
        assert not cli.credentials.exists()

    def test_unreachable_master_exits_5(self, cli: Cli) -> None:
        """A port nobody listens on is exit 5 naming the URL."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = cli(
            "login", "--url", f"http://127.0.0.1:{port}", "-u", "admin", "--password-stdin",
            input="whatever-password\n",
        )  # fmt: skip
        assert result.exit_code == 5
        assert f"cannot reach the master at http://127.0.0.1:{port}" in result.stderr

    def test_not_logged_in_exits_3(self, cli: Cli) -> None:
        """Without a stored login a command says how to log in."""
        result = cli("versions", "list")
        assert result.exit_code == 3
        assert "run: nxmesh login" in result.stderr

    def test_forbidden_exits_3(self, cli: Cli) -> None:
        """A viewer may read but not write: exit 3 naming the permission."""
        cli.login()
        assert cli("user", "add", "vera", "-r", "viewer", "--password-stdin",
                   input="vera-password-123\n").exit_code == 0  # fmt: skip
        assert cli.login("vera", "vera-password-123").exit_code == 0
        result = cli("token", "create")
        assert result.exit_code == 3
        assert "bootstrap_token:write" in result.stderr

    def test_bad_url_is_an_error(self, cli: Cli) -> None:
        """A URL carrying credentials is refused before anything is sent."""
        result = cli("login", "--url", "http://user:pw@127.0.0.1:1", "--password-stdin",
                     "-u", "admin", input="x\n")  # fmt: skip
        assert result.exit_code == 1
        assert "must not carry credentials" in result.stderr
        assert "pw" not in result.output.replace("--password-stdin", "")

    def test_invalid_profile_name_exits_2(self, cli: Cli) -> None:
        """A --profile name that cannot be stored is a usage error (exit 2) naming it."""
        for args in (
            ("versions", "list", "--profile", "bad/name"),
            ("whoami", "--profile", "bad/name", "--json"),
            ("logout", "--profile", "bad/name"),
        ):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert "profile name 'bad/name' is invalid" in result.stderr
        login = cli.login("admin", None, "--profile", "bad/name")
        assert login.exit_code == 2
        assert "profile name 'bad/name' is invalid" in login.stderr

    def test_credentials_readable_by_others_exits_2(self, cli: Cli) -> None:
        """A credentials file other users can read is refused: exit 2 saying how to fix it."""
        assert cli.login().exit_code == 0
        cli.credentials.chmod(0o644)
        result = cli("whoami")
        assert result.exit_code == 2, result.output
        assert f"chmod 600 {cli.credentials}" in result.stderr
        as_json = cli("versions", "--json")
        assert as_json.exit_code == 2
        assert "chmod 600" in json.loads(as_json.stderr)["error"]["detail"]


class TestNoSecretsInOutput:
    """Neither the password nor any token ever shows up in output or the master's log."""

    def test_no_secret_printed_or_logged(self, cli: Cli) -> None:
        """Login, refresh, a failing command and JSON output leak no credential."""
        outputs = [cli.login().output, cli("whoami", "--json").output]
        data = json.loads(cli.credentials.read_text())
        first = dict(data["profiles"]["default"])
        data["profiles"]["default"]["access_expires_at"] = time.time() - 1
        cli.credentials.write_text(json.dumps(data))
        outputs.append(cli("versions", "list", "--json").output)
        outputs.append(cli("versions", "show", "99", "--json").output)
        outputs.append(cli.login("admin", "wrong password, really").output)
        second = _stored(cli)
        log = cli.master.log.read_text()
        assert "/api/v1/auth/refresh" in log  # the log is the master's and covers this test
        text = "\n".join([*outputs, log])
        secrets = [
            cli.master.admin_password,
            "wrong password, really",
            *(str(p[k]) for p in (first, second) for k in ("access_token", "refresh_token")),
        ]
        for secret in secrets:
            assert secret not in text
        # The refresh tokens' random part is not in there either (only ids may be logged).
        for p in (first, second):
            assert str(p["refresh_token"]).rsplit("_", 1)[-1] not in text


class TestCredentialStore:
    """The credentials file itself."""

    def test_file_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        """Like ssh with a key: a group/world-readable credentials file is not used."""
        store = CredentialStore(tmp_path / "nxmesh" / "credentials.json")
        store.put("default", Profile(url="http://127.0.0.1:1", api_token="nxm_x_y"))
        store.path.chmod(0o644)
        with pytest.raises(CredentialsError, match="chmod 600"):
            store.get("default")

    def test_config_dir_precedence(self, tmp_path: Path) -> None:
        """NXMESH_TEST_CONFIG_HOME beats XDG_CONFIG_HOME beats ~/.config; relative is ignored."""
        a, b = tmp_path / "a", tmp_path / "b"
        env = {"NXMESH_TEST_CONFIG_HOME": str(a), "XDG_CONFIG_HOME": str(b)}
        assert config_dir(env) == a / "nxmesh"
        assert config_dir({"XDG_CONFIG_HOME": str(b)}) == b / "nxmesh"
        assert config_dir({"XDG_CONFIG_HOME": "relative"}) == Path.home() / ".config" / "nxmesh"

    def test_repr_hides_tokens(self) -> None:
        """A profile's repr (tracebacks, debuggers) shows no secret."""
        profile = Profile(
            url="http://x", access_token="AAA", refresh_token="RRR", api_token="nxm_T"
        )
        assert "AAA" not in repr(profile)
        assert "RRR" not in repr(profile)
        assert "nxm_T" not in repr(profile)


class TestTls:
    """``--ca-file``: an https:// master is verified with the CA given at login."""

    @pytest.fixture
    def tls_server(self, tmp_path: Path) -> Iterator[tuple[str, Path]]:
        """An https server on localhost answering every login with 401; its root CA file."""
        pki = Pki()
        leaf = pki.leaf("localhost")
        chain = tmp_path / "chain.pem"
        chain.write_text(pki.chain(leaf))
        key = tmp_path / "key.pem"
        key.write_text(leaf.key_pem)
        ca = tmp_path / "ca.pem"
        ca.write_text(pki.root.pem)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = b'{"status": 401, "detail": "invalid username or password"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/problem+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"https://localhost:{server.server_address[1]}", ca
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    def test_ca_file_verifies_the_master(self, cli: Cli, tls_server: tuple[str, Path]) -> None:
        """With the master's CA the TLS handshake succeeds (the login is then refused: 3);
        without it the certificate is not trusted (5)."""
        url, ca = tls_server
        args = ["login", "--url", url, "-u", "admin", "--password-stdin"]
        trusted = cli(*args, "--ca-file", str(ca), input="not-the-password\n")
        assert trusted.exit_code == 3, trusted.output
        assert "invalid username or password" in trusted.stderr
        untrusted = cli(*args, input="not-the-password\n")
        assert untrusted.exit_code == 5, untrusted.output
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr

    def test_bad_ca_file_is_an_error(self, cli: Cli, tmp_path: Path) -> None:
        """A CA file that is not PEM is refused naming the file (exit 1)."""
        bad = tmp_path / "bad.pem"
        bad.write_text("not a certificate")
        result = cli("login", "--url", "https://localhost:1", "-u", "admin", "--password-stdin",
                     "--ca-file", str(bad), input="x\n")  # fmt: skip
        assert result.exit_code == 1
        assert f"cannot use CA file {bad}" in result.stderr
