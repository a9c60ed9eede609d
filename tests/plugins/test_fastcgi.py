"""FastCGI locations against a real nginx and a real PHP-FPM on loopback: scripts, a
front controller's routes and query strings, PATH_INFO, what the application is told,
and what never runs."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from nxmesh.agent.harness import NginxStack
from nxmesh.core.model import (
    BasicAuth,
    BasicAuthUser,
    DesiredState,
    FastCGI,
    FastCGIParam,
    Listener,
    Location,
    Site,
    Upstream,
    UpstreamServer,
)
from nxmesh.testing.nginx import free_port, readable_root
from nxmesh.testing.php_fpm import PhpFpm, find_php_fpm, php_fpm, run_php_fpm

pytestmark = [pytest.mark.anyio, pytest.mark.nginx]

__all__ = ["php_fpm"]  # the fixture, imported for this module's tests

# What the application saw, as JSON.
_ECHO = """<?php
header('Content-Type: application/json');
$s = $_SERVER;
echo json_encode([
    'script' => $s['SCRIPT_FILENAME'], 'name' => $s['SCRIPT_NAME'],
    'path_info' => $s['PATH_INFO'] ?? '', 'query' => $s['QUERY_STRING'],
    'get' => $_GET, 'uri' => $s['REQUEST_URI'], 'method' => $s['REQUEST_METHOD'],
    'body' => file_get_contents('php://input'), 'remote' => $s['REMOTE_ADDR'],
    'host' => $s['HTTP_HOST'] ?? null, 'server_name' => $s['SERVER_NAME'],
    'xfh' => $s['HTTP_X_FORWARDED_HOST'] ?? null, 'xff' => $s['HTTP_X_FORWARDED_FOR'] ?? null,
    'forwarded' => $s['HTTP_FORWARDED'] ?? null, 'proxy' => getenv('HTTP_PROXY'),
    'app_env' => $s['APP_ENV'] ?? null, 'custom' => $s['HTTP_X_CUSTOM'] ?? null,
    'user' => $s['REMOTE_USER'] ?? '', 'ssl' => $s['HTTP_X_FORWARDED_SSL'] ?? '',
    'original_url' => $s['HTTP_X_ORIGINAL_URL'] ?? '',
    'request_id' => $s['HTTP_X_REQUEST_ID'] ?? '',
    'remote_user_header' => $s['HTTP_REMOTE_USER'] ?? '',
]);
"""


@pytest.fixture
def app_root() -> Iterator[Path]:
    """A PHP application under /srv (nginx's workers and PHP-FPM's read it; the model
    accepts it as a root): a front controller, a script, static files, an upload that is
    PHP in disguise, and a hidden directory."""
    files = {
        "index.php": _ECHO,
        "info.php": _ECHO,
        "admin/index.php": _ECHO,
        "style.css": "body{}",
        "uploads/avatar.jpg": "<?php echo 'PWNED';",
        "uploads/evil.phar": "<?php echo 'PHAR';",
        "slow.php": "<?php usleep(300000); echo 'slow';",
        "admin/secret.php": "<?php echo 'SOURCE';",
        ".hidden/tool.php": "<?php echo 'HIDDEN';",
    }
    with readable_root(files) as root:
        yield root


@pytest.fixture
async def stack(nginx_binary: str, anyio_backend: str) -> AsyncIterator[NginxStack]:
    with readable_root() as base:
        async with NginxStack(root=base / "nginx", nginx_binary=nginx_binary) as stack:
            yield stack


def _php_state(
    port: int,
    root: Path,
    address: str,
    *,
    extra: tuple[Location, ...] = (),
    site: dict[str, Any] | None = None,
    **fastcgi: Any,
) -> DesiredState:
    """The usual PHP site: files from `root`, a directory's index.php, other paths to the
    front controller (/index.php), and ``.php`` scripts run by PHP-FPM at `address`;
    `extra` locations first, and the `site`'s own fields."""
    php = Site(
        name="php",
        server_names=("localhost",),
        listeners=(Listener(port=port, address="127.0.0.1"),),
        locations=(
            *extra,
            Location(
                path="/", root=str(root), index=("index.php", "index.html"), fallback="/index.php"
            ),
            Location(
                path=r"\.php(/.*)?$",
                match="regex",
                fastcgi=FastCGI(upstream="php", root=str(root), **fastcgi),
            ),
        ),
        **(site or {}),
    )
    upstream = Upstream(name="php", servers=(UpstreamServer(address=address),))
    return DesiredState(sites=(php,), upstreams=(upstream,))


def _hash(password: str) -> str:
    """A SHA-512 crypt hash of `password`, made as the docs say to (``openssl passwd``)."""
    made = subprocess.run(
        ["openssl", "passwd", "-6", password], capture_output=True, text=True, check=True
    )
    return made.stdout.strip()


async def _apply(stack: NginxStack, state: DesiredState) -> None:
    report = await stack.driver.apply(stack.update(state), stack.render(state))
    assert report.outcome == "applied", report.message


async def _request(port: int, raw: str) -> tuple[int, str]:
    """Send one raw HTTP/1.0 request (no chunked answer to decode); its status and body."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(raw.encode())
        data = b""
        with anyio.fail_after(10):
            while True:
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode(errors="replace")


async def _get(port: int, target: str, *headers: str) -> tuple[int, str]:
    extra = "".join(f"{h}\r\n" for h in headers)
    return await _request(
        port, f"GET {target} HTTP/1.0\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
    )


async def _seen(port: int, target: str, *headers: str) -> dict[str, Any]:
    status, body = await _get(port, target, *headers)
    assert status == 200, (target, status, body)
    seen: dict[str, Any] = json.loads(body)
    return seen


class TestScripts:
    async def test_routes_reach_the_front_controller_with_their_query(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """A path with no file behind it runs /index.php, which still gets the query
        string (try_files alone drops it) and the URI the client asked for; files are
        served as files."""
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        seen = await _seen(stack.web_port, "/users/42?tab=posts&page=2")
        assert seen["script"] == f"{app_root}/index.php"
        assert seen["query"] == "tab=posts&page=2"
        assert seen["get"] == {"tab": "posts", "page": "2"}
        assert seen["uri"] == "/users/42?tab=posts&page=2"
        assert await _get(stack.web_port, "/style.css") == (200, "body{}")

    async def test_scripts_path_info_and_directory_index(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """A script's path runs that script; what follows ``.php`` is PATH_INFO; a
        directory's URI runs its index script."""
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        seen = await _seen(stack.web_port, "/info.php/reports/2026?x=1")
        assert (seen["script"], seen["name"]) == (f"{app_root}/info.php", "/info.php")
        assert (seen["path_info"], seen["get"]) == ("/reports/2026", {"x": "1"})
        seen = await _seen(stack.web_port, "/admin/")
        assert seen["script"] == f"{app_root}/admin/index.php"

    async def test_a_post_body_reaches_the_script(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        body = "name=ada&role=admin"
        status, text = await _request(
            stack.web_port,
            "POST /info.php HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}",
        )
        assert status == 200, text
        seen = json.loads(text)
        assert (seen["method"], seen["body"]) == ("POST", body)

    async def test_params(self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm) -> None:
        """A location's own parameters reach the application."""
        state = _php_state(
            stack.web_port,
            app_root,
            php_fpm.address,
            params=(FastCGIParam(name="APP_ENV", value="production"),),
        )
        await _apply(stack, state)
        assert (await _seen(stack.web_port, "/info.php"))["app_env"] == "production"

    async def test_more_requests_than_workers_wait_their_turn(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """Three slow requests at once on a pool of two workers: the third waits for a
        free worker and is answered. (With ``fastcgi_keep_conn`` a worker stays tied to
        nginx's idle kept connection, and the third timed out with 504 after 60 s.)"""
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        answers: list[tuple[int, str]] = []

        async def one() -> None:
            answers.append(await _get(stack.web_port, "/slow.php"))

        for _ in range(2):
            answers.clear()
            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(one)
            assert answers == [(200, "slow")] * 3

    async def test_php_fpm_on_a_tcp_port(
        self, stack: NginxStack, app_root: Path, tmp_path: Path
    ) -> None:
        """An upstream server at host:port works as a unix socket does."""
        port = free_port()
        with run_php_fpm(tmp_path, find_php_fpm(), port=port) as server:
            await _apply(stack, _php_state(stack.web_port, app_root, server.address))
            seen = await _seen(stack.web_port, "/info.php")
        assert seen["script"] == f"{app_root}/info.php"


class TestWhatNeverRuns:
    async def test_only_existing_scripts_run(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """An upload with PHP inside, asked for as ``avatar.jpg/x.php`` (PHP's
        ``cgi.fix_pathinfo`` would walk back to it), a missing script and a hidden
        directory's script are nginx's 404: PHP-FPM never sees them."""
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        for target in (
            "/uploads/avatar.jpg/x.php",
            "/uploads/avatar.jpg/x.php/more",
            "/uploads/evil.phar/x.php",
            "/missing.php",
            "/.hidden/tool.php",
            "/%2ehidden/tool.php",
        ):
            status, body = await _get(stack.web_port, target)
            assert status == 404, (target, body)
            assert "PWNED" not in body, target
            assert "PHAR" not in body, target
            assert "HIDDEN" not in body, target
            assert "nginx" in body, (target, body)  # nginx's page, not PHP-FPM's
        status, body = await _get(stack.web_port, "/uploads/avatar.jpg")
        assert (status, body) == (200, "<?php echo 'PWNED';")  # a file, served as one

    async def test_without_the_check_php_fpm_still_refuses_uploads(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """``check_script: false`` (nginx cannot see the scripts) leaves it to PHP-FPM,
        whose ``security.limit_extensions`` refuses to run a .jpg."""
        state = _php_state(stack.web_port, app_root, php_fpm.address, check_script=False)
        await _apply(stack, state)
        status, body = await _get(stack.web_port, "/uploads/avatar.jpg/x.php")
        assert status in (403, 404), body
        assert "PWNED" not in body
        # PHP-FPM would walk this one back to the .phar and run it: nginx refuses.
        status, body = await _get(stack.web_port, "/uploads/evil.phar/x.php")
        assert status == 404, body
        assert "PHAR" not in body
        assert (await _seen(stack.web_port, "/info.php"))["script"] == f"{app_root}/info.php"

    async def test_a_location_running_everything_runs_only_php(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """A prefix location handing every request to PHP-FPM still runs .php scripts
        only: an uploaded .phar (which PHP-FPM would run) and other files are 404."""
        site = Site(
            name="all",
            server_names=("localhost",),
            listeners=(Listener(port=stack.web_port, address="127.0.0.1"),),
            locations=(Location(path="/", fastcgi=FastCGI(upstream="php", root=str(app_root))),),
        )
        upstream = Upstream(name="php", servers=(UpstreamServer(address=php_fpm.address),))
        await _apply(stack, DesiredState(sites=(site,), upstreams=(upstream,)))
        for target in ("/uploads/evil.phar", "/uploads/evil.phar/x", "/style.css"):
            status, body = await _get(stack.web_port, target)
            assert status == 404, (target, body)
            assert "PHAR" not in body, target
        assert (await _seen(stack.web_port, "/info.php"))["name"] == "/info.php"
        assert (await _seen(stack.web_port, "/"))["name"] == "/index.php"

    async def test_a_static_location_never_hands_out_a_scripts_source(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """A ``prefix_priority`` static location takes /admin/secret.php before the
        FastCGI regex location can: on a site with FastCGI it answers 404, not the
        script's source."""
        admin = Location(path="/admin/", match="prefix_priority", root=str(app_root))
        state = _php_state(stack.web_port, app_root, php_fpm.address, extra=(admin,))
        await _apply(stack, state)
        status, body = await _get(stack.web_port, "/admin/secret.php")
        assert status == 404, body
        assert "SOURCE" not in body


class TestWhatTheApplicationIsTold:
    async def test_forged_forwarding_headers_are_replaced(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """The application sees the client nginx saw and the host nginx chose, whatever
        the client claims; a ``Proxy`` header never becomes HTTP_PROXY (httpoxy); other
        headers pass."""
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        seen = await _seen(
            stack.web_port,
            "/info.php",
            "X-Forwarded-Host: evil.example",
            "X-Forwarded-For: 203.0.113.9",
            "Forwarded: for=203.0.113.9;host=evil.example",
            "Proxy: http://evil.example:8080",
            "X-Forwarded-Ssl: on",
            "X-Original-URL: /admin/secret.php",
            "X-Request-ID: forged",
            "Remote-User: admin",
            "X-Custom: kept",
        )
        assert (seen["remote"], seen["xff"]) == ("127.0.0.1", "127.0.0.1")
        assert (seen["host"], seen["xfh"]) == ("localhost", "localhost")
        assert seen["forwarded"] in (None, "")  # PHP drops an empty one
        assert seen["proxy"] in (False, "")
        assert (seen["ssl"], seen["original_url"]) == ("", "")
        assert seen["remote_user_header"] == ""  # header authentication of another proxy
        assert len(seen["request_id"]) == 32  # nginx's
        assert seen["custom"] == "kept"

    async def test_the_port_the_client_wrote_stays_in_http_host(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """Frameworks build links from HTTP_HOST: on a port other than 80 it keeps the
        port the client's Host names, with nginx's host before it."""
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        status, body = await _request(
            stack.web_port,
            f"GET /info.php HTTP/1.0\r\nHost: LocalHost:{stack.web_port}\r\n"
            "Connection: close\r\n\r\n",
        )
        assert status == 200, body
        assert json.loads(body)["host"] == f"localhost:{stack.web_port}"

    async def test_remote_user_is_only_a_checked_name(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """nginx reads $remote_user from any Authorization header. The application gets
        it only where the password was checked: not on a site without basic_auth, nor
        where ``satisfy any`` lets a listed address in with a wrong password."""
        basic = "Authorization: Basic " + base64.b64encode(b"bob:wrong").decode()
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        assert (await _seen(stack.web_port, "/info.php", basic))["user"] == ""

        users = (BasicAuthUser(name="alice", password_hash=_hash("secret")),)
        guarded = {
            "allow": ("127.0.0.1",),
            "basic_auth": BasicAuth(users=users),
            "satisfy": "any",
        }
        state = _php_state(stack.web_port, app_root, php_fpm.address, site=guarded)
        await _apply(stack, state)
        assert (await _seen(stack.web_port, "/info.php", basic))["user"] == ""

        checked = {"basic_auth": BasicAuth(users=users)}
        state = _php_state(stack.web_port, app_root, php_fpm.address, site=checked)
        await _apply(stack, state)
        assert (await _get(stack.web_port, "/info.php", basic))[0] == 401
        alice = "Authorization: Basic " + base64.b64encode(b"alice:secret").decode()
        assert (await _seen(stack.web_port, "/info.php", alice))["user"] == "alice"

    async def test_an_absolute_form_request_cannot_choose_http_host(
        self, stack: NginxStack, app_root: Path, php_fpm: PhpFpm
    ) -> None:
        """``GET http://localhost/... `` with ``Host: evil:9999``: nginx serves localhost,
        and so does HTTP_HOST (Debian's fastcgi_params fix), without the ignored header's
        port."""
        await _apply(stack, _php_state(stack.web_port, app_root, php_fpm.address))
        status, body = await _request(
            stack.web_port,
            "GET http://localhost/info.php HTTP/1.0\r\nHost: evil.example:9999\r\n"
            "Connection: close\r\n\r\n",
        )
        assert status == 200, body
        assert json.loads(body)["host"] == "localhost"
