"""TCP and UDP streams (``stream {}``): the model's rules, the rendered files, and real
nginx forwarding bytes and datagrams to real servers on loopback."""

from __future__ import annotations

import contextlib
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest

from nxmesh.agent.harness import NginxStack
from nxmesh.agent.process import nginx_stream_module
from nxmesh.core.errors import ValidationError
from nxmesh.core.loader import load_state_files
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Listener,
    Location,
    Site,
    SniRoute,
    Stream,
    StreamTLS,
    TLSConfig,
    Upstream,
    UpstreamServer,
    UpstreamTLS,
    check_state,
)
from nxmesh.core.serialization import state_digest, structure, unstructure
from nxmesh.core.validation import Invalid
from nxmesh.plugins.render_nginx import NginxRenderer, RenderSettings
from nxmesh.plugins.render_nginx.renderer import STREAMS_FILE, RenderError
from nxmesh.testing.nginx import free_port


def _upstream(name: str = "db", *addresses: str, **fields: Any) -> Upstream:
    servers = tuple(UpstreamServer(address=a) for a in addresses or ("127.0.0.1:5432",))
    return Upstream(name=name, servers=servers, **fields)


def _state(*streams: Stream, upstreams: tuple[Upstream, ...] = (), **fields: Any) -> DesiredState:
    return DesiredState(upstreams=upstreams or (_upstream(),), streams=streams, **fields)


def _site(name: str, *listeners: Listener, **fields: Any) -> Site:
    return Site(
        name=name,
        server_names=(f"{name}.test",),
        listeners=listeners or (Listener(),),
        locations=(Location(path="/", upstream="db"),),
        **fields,
    )


def _problems(state: DesiredState) -> dict[str, str]:
    return {p.path: p.message for p in check_state(state)}


def _refused(cls: type[Any], fields: dict[str, Any], path: str, says: str) -> None:
    """Building `cls` from `fields` is refused at `path`, with `says` in the reason."""
    with pytest.raises(Invalid) as caught:
        cls(**fields)
    problems = dict(caught.value.problems)
    assert path in problems, problems
    assert says in problems[path]


class TestModel:
    @pytest.mark.parametrize(
        ("fields", "path", "says"),
        [
            ({"port": 0}, "port", "from 1 to 65535"),
            ({"protocol": "sctp"}, "protocol", "tcp"),
            ({"address": "db.internal"}, "address", ""),
            ({"allow": ("10.0.0.0/33",)}, "allow[0]", ""),
            ({"upstream": "a b"}, "upstream", ""),
            ({"timeout": 0}, "timeout", "from 1 to 86400"),
            ({"protocol": "udp", "proxy_protocol": True}, "proxy_protocol", "TCP streams"),
            ({"udp_responses": 1}, "udp_responses", "UDP streams"),
            ({"protocol": "udp", "udp_responses": 0}, "udp_responses", "from 1 to 1000"),
            ({"protocol": "udp", "tls": StreamTLS(certificate="c")}, "tls", "no DTLS"),
            ({"max_connections_per_client": 0}, "max_connections_per_client", "from 1"),
            (
                {"protocol": "udp", "proxy_protocol_from": ("10.0.0.1",)},
                "proxy_protocol_from",
                "TCP streams",
            ),
            ({"proxy_protocol_from": ("0.0.0.0/0",)}, "proxy_protocol_from[0]", "every address"),
        ],
    )
    def test_bad_fields_are_refused_by_name(
        self, fields: dict[str, Any], path: str, says: str
    ) -> None:
        """Each bad field is named, with its reason."""
        _refused(Stream, {"name": "pg", "port": 15432, "upstream": "db", **fields}, path, says)

    def test_a_state_without_streams_keeps_its_digest(self) -> None:
        """`streams` is left out of the canonical form while empty, so the states and
        signed versions written before streams existed keep their digests."""
        state = DesiredState(upstreams=(_upstream(),))
        assert "streams" not in unstructure(state)
        with_one = attrs.evolve(state, streams=(Stream(name="pg", port=15432, upstream="db"),))
        assert unstructure(with_one)["streams"][0]["name"] == "pg"
        assert state_digest(with_one) != state_digest(state)
        assert structure(unstructure(with_one), DesiredState) == with_one

    def test_a_valid_state_has_no_problems(self) -> None:
        """A TCP and a UDP stream on one port number, a site on another: nothing to say."""
        state = _state(
            Stream(name="pg", port=15432, upstream="db"),
            Stream(name="dns", port=15432, protocol="udp", upstream="db", udp_responses=1),
            sites=(_site("web", Listener(port=8080)),),
        )
        assert _problems(state) == {}

    def test_names_and_upstreams_are_checked(self) -> None:
        """A repeated name, an unknown upstream (with a did-you-mean)."""
        state = _state(
            Stream(name="pg", port=15432, upstream="db"),
            Stream(name="pg", port=15433, upstream="dbb"),
        )
        assert _problems(state) == {
            "streams[1].name": "stream name 'pg' is already used by streams[0]",
            "streams[1].upstream": "refers to unknown upstream 'dbb' (did you mean 'db'?)",
        }

    @pytest.mark.parametrize(
        ("upstream", "protocol", "says"),
        [
            (_upstream(lb_method="ip_hash"), "tcp", "ip_hash"),
            (_upstream(tls=UpstreamTLS(server_name="db.internal")), "udp", "no DTLS"),
            (_upstream("db", "unix:/run/dns.sock"), "udp", "unix socket"),
        ],
        ids=["ip_hash", "udp-over-tls", "udp-to-unix"],
    )
    def test_upstreams_a_stream_cannot_use(
        self, upstream: Upstream, protocol: str, says: str
    ) -> None:
        """What nginx's stream module cannot do with an upstream is refused at the stream."""
        stream = Stream(name="s", port=15432, upstream="db", protocol=protocol)  # type: ignore[arg-type]
        problems = _problems(_state(stream, upstreams=(upstream,)))
        assert list(problems) == ["streams[0].upstream"]
        assert says in problems["streams[0].upstream"]

    def test_a_unix_socket_serves_a_tcp_stream(self) -> None:
        upstream = _upstream("db", "unix:/run/postgresql/.s.PGSQL.5432")
        assert (
            _problems(_state(Stream(name="s", port=15432, upstream="db"), upstreams=(upstream,)))
            == {}
        )

    def test_ports_belong_to_sites_or_to_one_stream(self) -> None:
        """A TCP stream on a port a site listens on, whatever the addresses, or on the
        port 80 a site's HTTPS redirect takes; two streams of one protocol on one port."""
        sites = (
            _site("web", Listener(port=8080, address="127.0.0.1")),
            _site("secure", Listener(port=8443, tls=True), tls=TLSConfig(certificate="b")),
        )
        state = _state(
            Stream(name="a", port=8080, address="10.0.0.1", upstream="db"),
            Stream(name="b", port=80, upstream="db"),
            Stream(name="c", port=9000, upstream="db"),
            Stream(name="d", port=9000, address="127.0.0.2", upstream="db"),
            Stream(name="e", port=8080, protocol="udp", upstream="db"),
            sites=sites,
        )
        problems = {p: m for p, m in _problems(state).items() if p.startswith("streams")}
        assert problems == {
            "streams[0].port": "port 8080 is sites[0] ('web')'s, over HTTP; a TCP port "
            "belongs to the sites or to one stream (nginx's http and stream modules cannot "
            "share a socket)",
            "streams[1].port": "port 80 is sites[1] ('secure')'s, over HTTP; a TCP port "
            "belongs to the sites or to one stream (nginx's http and stream modules cannot "
            "share a socket)",
            "streams[3].port": "TCP port 9000 is already streams[2]'s; each stream needs a "
            "port of its own",
        }

    def test_state_files_merge_streams_and_locate_their_problems(self, tmp_path: Path) -> None:
        """Masterless state files: a stream in one file uses an upstream of another; a
        problem is reported in the file and at the index the user wrote."""
        (tmp_path / "upstreams.yaml").write_text(
            "upstreams:\n  - name: db\n    servers: [{address: '127.0.0.1:5432'}]\n"
        )
        (tmp_path / "a.yaml").write_text("streams:\n  - {name: pg, port: 15432, upstream: db}\n")
        (tmp_path / "b.yaml").write_text("streams:\n  - {name: mq, port: 15672, upstream: mq}\n")
        files = [tmp_path / n for n in ("upstreams.yaml", "a.yaml")]
        state = load_state_files(files)
        assert [s.name for s in state.streams] == ["pg"]
        with pytest.raises(ValidationError) as caught:
            load_state_files([*files, tmp_path / "b.yaml"])
        assert caught.value.source == str(tmp_path / "b.yaml")
        [problem] = caught.value.problems
        assert problem.path == "streams[0].upstream"
        assert "unknown upstream 'mq'" in problem.message


class TestRender:
    def test_nothing_of_streams_without_one(self) -> None:
        """A state without streams renders no stream block, file nor module."""
        bundle = NginxRenderer(
            settings=RenderSettings(stream_module="/m/ngx_stream_module.so")
        ).render(DesiredState())
        conf = bundle.files["nginx.conf"].decode()
        assert "stream {" not in conf
        assert "load_module" not in conf
        assert STREAMS_FILE not in bundle.files

    def test_streams_file_module_and_shared_upstream(self) -> None:
        """The module is loaded first when it is a dynamic one; the stream block includes
        streams.conf; an upstream a site also uses is written in both blocks, without
        http's keepalive in the stream one."""
        state = _state(
            Stream(name="pg", port=15432, upstream="db", allow=("10.0.0.0/8",)),
            Stream(name="dns", port=15353, protocol="udp", upstream="db", udp_responses=1),
            Stream(name="raw", port=15000, upstream="db", proxy_protocol=True, address="::1"),
            sites=(_site("web"),),
        )
        module = "/usr/lib/nginx/modules/ngx_stream_module.so"
        settings = RenderSettings(stream_module=module, listen_ipv6=True)
        bundle = NginxRenderer(settings=settings).render(state)
        conf = bundle.files["nginx.conf"].decode()
        assert conf.splitlines()[2] == f"load_module {module};"
        assert "stream {\n    include streams.conf;\n}\n" in conf
        assert "upstream db {" in bundle.files["conf.d/upstreams.conf"].decode()
        streams = bundle.files[STREAMS_FILE].decode()
        assert (
            "upstream db {\n    server 127.0.0.1:5432 weight=1 max_fails=1 fail_timeout=10s;\n}"
            in streams
        )
        assert "keepalive" not in streams
        servers = [
            [line.strip() for line in server.splitlines() if line.strip()[:1] not in ("", "#")]
            for server in streams.split("server {")[1:]
        ]
        assert servers[0] == [
            "listen 15432;",
            "listen [::]:15432;",
            "allow 10.0.0.0/8;",
            "deny all;",
            "proxy_pass db;",
            "proxy_connect_timeout 5s;",
            "proxy_timeout 600s;",
            "}",
        ]
        assert servers[1][:3] == [
            "listen 15353 udp reuseport;",
            "listen [::]:15353 udp reuseport;",
            "proxy_pass db;",
        ]
        assert "proxy_responses 1;" in servers[1]
        assert not any(line.startswith("proxy_connect_timeout") for line in servers[1])
        assert servers[2][:2] == ["listen [::1]:15000;", "proxy_pass db;"]
        assert "proxy_protocol on;" in servers[2]

    def test_built_in_module_is_not_loaded(self) -> None:
        bundle = NginxRenderer().render(_state(Stream(name="pg", port=15432, upstream="db")))
        assert "load_module" not in bundle.files["nginx.conf"].decode()

    def test_listen_address_binds_address_less_streams(self) -> None:
        settings = RenderSettings(listen_address="10.1.2.3", listen_ipv6=True)
        bundle = NginxRenderer(settings=settings).render(
            _state(Stream(name="pg", port=15432, upstream="db"))
        )
        streams = bundle.files[STREAMS_FILE].decode()
        assert "listen 10.1.2.3:15432;" in streams
        assert "[::]" not in streams

    @pytest.mark.parametrize(
        ("status", "address", "ipv6", "clash"),
        [
            ("127.0.0.1", None, False, True),
            ("127.0.0.1", "127.0.0.1", False, True),
            ("127.0.0.1", "0.0.0.0", False, True),
            ("127.0.0.1", "*", False, True),
            ("127.0.0.1", "127.0.0.2", False, False),
            ("127.0.0.1", "::1", False, False),
            ("0.0.0.0", "127.0.0.2", False, True),  # the status server takes every address
            ("::1", "0:0:0:0:0:0:0:1", False, True),  # one address, two spellings
            ("::1", "0::0", False, True),
            ("::1", None, False, False),
            ("::1", None, True, True),  # the [::] twin
            ("::", "::1", False, True),
        ],
    )
    def test_the_status_servers_socket_is_refused(
        self, status: str, address: str | None, ipv6: bool, clash: bool
    ) -> None:
        """A TCP stream on the agent's status server's socket: nginx -t passes it and the
        reload fails to bind (the stream module binds apart from the http module)."""
        settings = RenderSettings(status_address=status, listen_ipv6=ipv6)
        stream = Stream(name="pg", port=9480, upstream="db", address=address)
        render = NginxRenderer(settings=settings).render
        if clash:
            with pytest.raises(RenderError, match="status server"):
                render(_state(stream))
        else:
            render(_state(stream))
        render(_state(attrs.evolve(stream, protocol="udp")))  # the status server is TCP

    def test_a_main_template_without_the_stream_block_is_refused(self, tmp_path: Path) -> None:
        """An nginx.conf.j2 override copied before streams existed: streams.conf would be
        written and never read, nginx -t would pass, and no port would open."""
        source = NginxRenderer().template_source("nginx.conf.j2")
        assert source is not None
        builtin = Path(source).read_text()
        old = builtin.split("{% if state.streams %}\n\n# TCP")[0]
        assert "include streams.conf" not in old
        (tmp_path / "nginx.conf.j2").write_text(old)
        renderer = NginxRenderer(template_dir=tmp_path)
        renderer.render(DesiredState())  # without streams, nothing is missing
        with pytest.raises(RenderError, match=r"does not include streams\.conf"):
            renderer.render(_state(Stream(name="pg", port=15432, upstream="db")))

    @pytest.mark.parametrize(
        ("tail", "included"),
        [
            ("stream { include streams.conf; }\n", True),
            ("stream {\n    # forwarded ports\n    include 'streams.conf';\n}\n", True),
            (
                "stream {\n    map $remote_addr $x { default 1; }\n    include streams.conf;\n}\n",
                True,
            ),
            ("# stream {\n#     include streams.conf;\n# }\n", False),
            ("stream {\n    # include streams.conf;\n}\n", False),
            ("stream { }\ninclude streams.conf;\n", False),
            ('events { }\n# "\nstream { include streams.conf; }\n', True),
            ('error_log "stream {\ninclude streams.conf;\n}";\n', False),
        ],
    )
    def test_the_stream_block_is_read_as_nginx_reads_it(
        self, tmp_path: Path, tail: str, included: bool
    ) -> None:
        """An override's stream block is found however it is spelled, and not where
        nginx would not read it (a comment, a quoted string, outside the block)."""
        source = NginxRenderer().template_source("nginx.conf.j2")
        assert source is not None
        builtin = Path(source).read_text().split("{% if state.streams %}\n\n# TCP")[0]
        (tmp_path / "nginx.conf.j2").write_text(builtin + tail)
        render = NginxRenderer(template_dir=tmp_path).render
        state = _state(Stream(name="pg", port=15432, upstream="db"))
        if included:
            assert STREAMS_FILE in render(state).files
        else:
            with pytest.raises(RenderError, match=r"does not include streams\.conf"):
                render(state)

    def test_an_unknown_upstream_is_a_render_error(self) -> None:
        """A stored state the master did not check: refused by name, not a KeyError."""
        state = DesiredState(streams=(Stream(name="pg", port=15432, upstream="gone"),))
        with pytest.raises(RenderError, match="stream 'pg' names upstream 'gone'"):
            NginxRenderer().render(state)

    def test_an_upstream_the_stream_cannot_use_is_a_render_error(self) -> None:
        """As the master would refuse it, rather than a bundle nginx -t refuses."""
        state = _state(
            Stream(name="pg", port=15432, upstream="db"),
            upstreams=(_upstream(lb_method="ip_hash"),),
        )
        with pytest.raises(RenderError, match="stream 'pg': upstream 'db' balances with ip_hash"):
            NginxRenderer().render(state)


class TestModuleDetection:
    @pytest.mark.nginx
    def test_this_hosts_nginx(self, nginx_binary: str) -> None:
        """Debian's nginx has the module as a dynamic one, installed by setup.sh."""
        module = nginx_stream_module(nginx_binary)
        assert module is not None
        assert Path(module).is_file()

    @pytest.mark.parametrize(
        ("configure", "expected"),
        [
            (
                "--prefix=/usr/share/nginx --modules-path=/usr/lib/nginx/modules "
                "--with-stream=dynamic --with-http_ssl_module",
                "/usr/lib/nginx/modules/ngx_stream_module.so",
            ),
            (
                "--prefix=/opt/nginx/ --with-stream=dynamic",
                "/opt/nginx/modules/ngx_stream_module.so",
            ),
            ("--with-stream=dynamic", "/usr/local/nginx/modules/ngx_stream_module.so"),
            ("--prefix=/etc/nginx --with-stream --with-stream_ssl_module", None),
            ("--prefix=/etc/nginx --with-http_ssl_module", None),
        ],
        ids=["debian", "prefix", "default-prefix", "built-in", "none"],
    )
    def test_builds_of_nginx(self, tmp_path: Path, configure: str, expected: str | None) -> None:
        """Other builds' ``nginx -V``, from a stand-in binary that prints it to stderr as
        nginx does (only this host's build can run here)."""
        binary = tmp_path / "nginx"
        binary.write_text(
            "#!/bin/sh\n"
            "echo 'nginx version: nginx/1.26.0' >&2\n"
            f"echo 'configure arguments: {configure}' >&2\n"
        )
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
        assert nginx_stream_module(str(binary)) == expected

    def test_a_binary_that_cannot_run(self, tmp_path: Path) -> None:
        """None, and asked again next time: a run that failed (could not start, or
        exited with an error) is not remembered."""
        binary = tmp_path / "nginx"
        says = "echo 'configure arguments: --with-stream=dynamic' >&2\n"
        binary.write_text("#!/bin/sh\n" + says)
        assert nginx_stream_module(str(binary)) is None  # not executable yet
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
        binary.write_text("#!/bin/sh\n" + says + "exit 1\n")
        assert nginx_stream_module(str(binary)) is None
        binary.write_text("#!/bin/sh\n" + says)
        assert nginx_stream_module(str(binary)) == "/usr/local/nginx/modules/ngx_stream_module.so"


# ---------------------------------------------------------------------------------------
# Real nginx
# ---------------------------------------------------------------------------------------

nginx_tests = [pytest.mark.anyio, pytest.mark.nginx]


@pytest.fixture
async def stack(nginx_binary: str, tmp_path: Path, anyio_backend: str) -> AsyncIterator[NginxStack]:
    async with NginxStack(root=tmp_path / "nginx", nginx_binary=nginx_binary) as stack:
        yield stack


async def _apply(stack: NginxStack, state: DesiredState) -> None:
    report = await stack.driver.apply(stack.update(state), stack.render(state))
    assert report.outcome == "applied", report.message


@contextlib.asynccontextmanager
async def _tcp_server(first: list[bytes]) -> AsyncIterator[int]:
    """A TCP server on loopback answering each chunk with ``echo:`` + the chunk; `first`
    gets the first chunk of every connection (a PROXY protocol line shows there)."""
    port = free_port()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            async with stream:
                chunk = await stream.receive()
                first.append(chunk)
                while True:
                    await stream.send(b"echo:" + chunk)
                    chunk = await stream.receive()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield port
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _udp_server(
    prefix: bytes = b"echo:", peers: set[int] | None = None
) -> AsyncIterator[int]:
    """A UDP server on loopback answering each datagram with `prefix` + the datagram;
    `peers` gets the source port of each datagram."""
    port = free_port()
    async with await anyio.create_udp_socket(local_host="127.0.0.1", local_port=port) as sock:

        async def serve() -> None:
            async for data, peer in sock:
                if peers is not None:
                    peers.add(peer[1])
                await sock.sendto(prefix + data, *peer)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            yield port
            tg.cancel_scope.cancel()


def _tcp_state(backend: int, port: int, **fields: Any) -> DesiredState:
    upstream = _upstream("backend", f"127.0.0.1:{backend}")
    stream = Stream(name="tcp", port=port, address="127.0.0.1", upstream="backend", **fields)
    return DesiredState(upstreams=(upstream,), streams=(stream,))


async def _exchange(port: int, data: bytes) -> bytes:
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            await client.send(data)
            return await client.receive()


class TestNginx:
    pytestmark = nginx_tests

    async def test_tcp_stream_forwards_both_ways(self, stack: NginxStack) -> None:
        """Bytes go to the upstream's server and its answers come back, over one
        connection; a state without the stream closes the port again."""
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port = free_port()
            await _apply(stack, _tcp_state(backend, port))
            with anyio.fail_after(10):
                async with await anyio.connect_tcp("127.0.0.1", port) as client:
                    for word in (b"one", b"two"):
                        await client.send(word)
                        assert await client.receive() == b"echo:" + word
            assert first == [b"one"]
            log = (stack.root / "logs" / "stream.log").read_text()
            assert f"TCP port={port} status=200" in log
            assert log.splitlines()[0].startswith("127.0.0.1 ")
            # peer= only where a stream reads PROXY lines (the stream realip module's).
            assert " peer=" not in log
            await _apply(stack, DesiredState())
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", port)

    async def test_allow_admits_only_the_listed_clients(self, stack: NginxStack) -> None:
        """A client outside `allow` is disconnected before the server hears of it."""
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port = free_port()
            await _apply(stack, _tcp_state(backend, port, allow=("192.0.2.0/24",)))
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await _exchange(port, b"let me in")
            assert first == []
            await _apply(stack, _tcp_state(backend, port, allow=("127.0.0.0/8",)))
            assert await _exchange(port, b"let me in") == b"echo:let me in"

    async def test_proxy_protocol_names_the_client(self, stack: NginxStack) -> None:
        """The server's first bytes are the PROXY protocol line: the client's address and
        port, and nginx's."""
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port = free_port()
            await _apply(stack, _tcp_state(backend, port, proxy_protocol=True))
            with anyio.fail_after(10):
                async with await anyio.connect_tcp("127.0.0.1", port) as client:
                    client_port = client.extra(anyio.abc.SocketAttribute.local_port)
                    await client.send(b"hello")
                    await client.receive()
        line = first[0].split(b"\r\n")[0].decode()
        assert line == f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}"

    async def test_max_connections_per_client(self, stack: NginxStack) -> None:
        """A client with its limit of connections open has the next closed before the
        server hears of it; once one closes, the next is let through. The count is per
        stream: the same client's connection to another stream is not refused."""
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port, other = free_port(), free_port()
            upstream = _upstream("backend", f"127.0.0.1:{backend}")
            limited = Stream(
                name="limited",
                port=port,
                address="127.0.0.1",
                upstream="backend",
                max_connections_per_client=2,
            )
            second = attrs.evolve(limited, name="other", port=other)
            await _apply(stack, DesiredState(upstreams=(upstream,), streams=(limited, second)))
            conf = (stack.root / "current" / STREAMS_FILE).read_text()
            assert "limit_conn nxmesh_stream_conn 2;" in conf
            with anyio.fail_after(10):
                async with await anyio.connect_tcp("127.0.0.1", port) as one:
                    await one.send(b"one")
                    assert await one.receive() == b"echo:one"
                    async with await anyio.connect_tcp("127.0.0.1", port) as two:
                        await two.send(b"two")
                        assert await two.receive() == b"echo:two"
                        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                            await _exchange(port, b"three")
                        assert await _exchange(other, b"elsewhere") == b"echo:elsewhere"
                assert await _exchange(port, b"four") == b"echo:four"
            assert b"three" not in first
            log = (stack.root / "logs" / "error.log").read_text()
            assert 'limiting connections by zone "nxmesh_stream_conn"' in log

    async def test_the_client_address_comes_from_the_load_balancers_proxy_line(
        self, stack: NginxStack
    ) -> None:
        """Behind a load balancer speaking PROXY protocol (`proxy_protocol_from`): the
        client its line names is the one `allow` admits, the log shows and the server's
        own PROXY line carries; a client outside `allow` and a connection without the
        line are closed before the server hears of them."""
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port = free_port()
            state = _tcp_state(
                backend,
                port,
                proxy_protocol_from=("127.0.0.1",),
                allow=("203.0.113.0/24",),
                proxy_protocol=True,
            )
            await _apply(stack, state)

            def line(client: str) -> bytes:
                return f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n".encode()

            answer = await _exchange(port, line("203.0.113.7") + b"hello")
            assert answer.startswith(b"echo:PROXY TCP4 203.0.113.7 127.0.0.1 40000 ")
            for refused in (line("198.51.100.1") + b"hello", b"hello"):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await _exchange(port, refused)
            assert len(first) == 1
            log = (stack.root / "logs" / "stream.log").read_text()
            assert log.startswith("203.0.113.7 "), log
            assert log.splitlines()[0].endswith(" peer=127.0.0.1"), log  # the balancer

    async def test_udp_stream_forwards_datagrams(self, stack: NginxStack) -> None:
        """A datagram reaches the server and its one answer comes back."""
        async with _udp_server() as backend:
            port = free_port()
            upstream = _upstream("dns", f"127.0.0.1:{backend}")
            stream = Stream(
                name="dns",
                port=port,
                address="127.0.0.1",
                protocol="udp",
                upstream="dns",
                udp_responses=1,
            )
            await _apply(stack, DesiredState(upstreams=(upstream,), streams=(stream,)))
            with anyio.fail_after(10):
                async with await anyio.create_connected_udp_socket(
                    remote_host="127.0.0.1", remote_port=port
                ) as client:
                    await client.send(b"query")
                    assert await client.receive() == b"echo:query"

    async def test_udp_keeps_each_client_on_one_server(self, stack: NginxStack) -> None:
        """With several workers, all of a client's datagrams are one session: one server
        of the upstream, from one nginx port (``reuseport``). Without it each worker
        took some datagrams of every client into sessions of its own."""
        stack.renderer = NginxRenderer(
            settings=attrs.evolve(stack.render_settings, worker_processes=2)
        )
        peers: set[int] = set()
        async with _udp_server(b"a:", peers) as a, _udp_server(b"b:", peers) as b:
            port = free_port()
            upstream = _upstream("pair", f"127.0.0.1:{a}", f"127.0.0.1:{b}")
            stream = Stream(
                name="pair", port=port, address="127.0.0.1", protocol="udp", upstream="pair"
            )
            await _apply(stack, DesiredState(upstreams=(upstream,), streams=(stream,)))
            servers = {}
            for client in range(6):
                answered = set()
                with anyio.fail_after(10):
                    async with await anyio.create_connected_udp_socket(
                        remote_host="127.0.0.1", remote_port=port
                    ) as sock:
                        # A burst wakes every worker: all of them would read some.
                        for n in range(40):
                            await sock.send(b"%d" % n)
                        for _ in range(40):
                            answered.add((await sock.receive()).split(b":")[0])
                servers[client] = answered
        assert all(len(answered) == 1 for answered in servers.values()), servers
        assert len(peers) == 6  # one nginx port per client

    async def test_a_missing_module_fails_the_apply_naming_it(
        self, stack: NginxStack, tmp_path: Path
    ) -> None:
        """A ``stream_module`` nginx cannot load fails ``nginx -t`` with the file's name,
        and what was live stays live."""
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port = free_port()
            await _apply(stack, _tcp_state(backend, port))
            missing = str(tmp_path / "no" / "ngx_stream_module.so")
            stack.renderer = NginxRenderer(
                settings=attrs.evolve(stack.render_settings, stream_module=missing)
            )
            state = _tcp_state(backend, free_port())
            report = await stack.driver.apply(stack.update(state), stack.render(state))
            assert report.outcome != "applied"
            assert missing in report.message
            assert await _exchange(port, b"still") == b"echo:still"


# ---------------------------------------------------------------------------------------
# TLS: ended for the clients (`Stream.tls`), spoken to the servers (the upstream's `tls`)
# ---------------------------------------------------------------------------------------


def _tls_stream(port: int = 15432, upstream: str = "db", **tls: Any) -> Stream:
    return Stream(
        name="pg",
        port=port,
        address="127.0.0.1",
        upstream=upstream,
        tls=StreamTLS(certificate="dbcert", **tls),
    )


class TestTlsModel:
    def test_tls_is_left_out_of_the_canonical_form_while_unset(self) -> None:
        """Streams stored before `tls` existed keep their digests."""
        plain = Stream(name="pg", port=15432, upstream="db")
        assert "tls" not in unstructure(plain)
        assert unstructure(_tls_stream())["tls"] == {
            "certificate": "dbcert",
            "protocols": ["TLSv1.2", "TLSv1.3"],
        }

    @pytest.mark.parametrize(
        ("fields", "path", "says"),
        [
            ({"certificate": "a b"}, "certificate", ""),
            ({"certificate": "c", "protocols": ("TLSv1.3", "TLSv1.3")}, "protocols", "twice"),
            ({"certificate": "c", "protocols": ("SSLv3",)}, "protocols[0]", ""),
            ({"certificate": "c", "protocols": ()}, "protocols", ""),
        ],
    )
    def test_bad_fields_are_refused_by_name(
        self, fields: dict[str, Any], path: str, says: str
    ) -> None:
        _refused(StreamTLS, fields, path, says)

    def test_client_certificates_need_the_cas(self) -> None:
        """A CRL without the CAs to check is refused by name; CA text other than PEM
        certificates too; both stay out of the canonical form while unset."""
        from nxmesh.testing.pki import Pki

        pki = Pki()
        _refused(StreamTLS, {"certificate": "c", "client_crl": Pki.crl(pki.root)},
                 "client_crl", "only applies with client_ca")  # fmt: skip
        _refused(StreamTLS, {"certificate": "c", "client_ca": "trust me"}, "client_ca", "PEM")
        assert set(unstructure(StreamTLS(certificate="c"))) == {"certificate", "protocols"}

    def test_the_certificate_must_be_declared(self) -> None:
        """As a site's: named in the state's `certificates`, with a did-you-mean."""
        declared = (CertificateRef("dbcert", ("db.example.test",)),)
        assert _problems(_state(_tls_stream(), certificates=declared)) == {}
        typo = _state(_tls_stream(), certificates=(CertificateRef("dbcrt", ("db.test",)),))
        assert _problems(typo) == {
            "streams[0].tls.certificate": "refers to unknown certificate 'dbcert' "
            "(did you mean 'dbcrt'?)"
        }
        assert (
            "certificates: [{name: dbcert"
            in _problems(_state(_tls_stream()))["streams[0].tls.certificate"]
        )

    def test_a_tcp_stream_may_speak_tls_to_its_servers(self) -> None:
        upstream = _upstream(tls=UpstreamTLS(server_name="db.internal"))
        stream = Stream(name="pg", port=15432, upstream="db")
        assert _problems(_state(stream, upstreams=(upstream,))) == {}

    def test_certificate_needs_and_expiry_count_streams(self) -> None:
        """The master sends a stream's certificate to the agents running it (uploaded:
        no names to cover; ACME: the reference's domains), and refuses an expired one."""
        from nxmesh.certs.distribution import certificate_needs
        from nxmesh.certs.validate import check_state_certificates
        from nxmesh.testing.pki import Pki

        state = _state(
            _tls_stream(),
            Stream(name="mq", port=15671, upstream="db", tls=StreamTLS(certificate="mq")),
            certificates=(
                CertificateRef("dbcert", ("db.example.test",)),
                CertificateRef("mq", ("mq.example.test",), source="acme"),
            ),
        )
        needs = {need.name: need for need in certificate_needs(state)}
        assert needs["dbcert"].stem == "certs/dbcert"
        assert (needs["dbcert"].source, needs["dbcert"].domains) == ("upload", ())
        assert (needs["mq"].source, needs["mq"].domains) == ("acme", ("mq.example.test",))
        assert [need.streams for need in needs.values()] == [("pg",), ("mq",)]
        assert all(need.used and not need.sites for need in needs.values())
        assert needs["mq"].first_user == "stream 'mq'"
        # A replaced or renewed certificate rolls out to the agents whose streams use it.
        from nxmesh.certs.distribution import agents_needing

        agents = {"a": state, "b": _state(Stream(name="pg", port=15432, upstream="db"))}
        assert agents_needing("dbcert", agents) == ["a"]
        pki = Pki()
        expired = pki.stored("dbcert", "db.example.test", days=-1)
        [problem] = check_state_certificates(state, {"dbcert": expired})
        assert problem.path == "streams[0].tls.certificate"
        assert "expired" in problem.message
        soon = pki.stored("dbcert", "db.example.test", days=3)
        [warning] = check_state_certificates(state, {"dbcert": soon})
        assert (warning.path, warning.severity) == ("streams[0].tls.certificate", "warning")
        # The names its clients check are the domains the state declares for it; two
        # streams of one certificate make one problem.
        shared = attrs.evolve(
            state, streams=(*state.streams, attrs.evolve(_tls_stream(15434), name="pg2"))
        )
        other = pki.stored("dbcert", "other.test")
        [uncovered] = check_state_certificates(shared, {"dbcert": other})
        assert uncovered.path == "certificates[0].domains[0]"
        assert uncovered.message == (
            "is not covered by certificate 'dbcert' (valid for other.test)"
        )


class TestTlsRender:
    def test_tls_stream_and_tls_upstream(self) -> None:
        """A stream ending TLS listens with ``ssl`` and its certificate's files (the
        passphrase file for an encrypted key); a stream before a TLS upstream opens its
        own TLS connection, verified against the upstream's CA."""
        from nxmesh.testing.pki import Pki

        pki = Pki()
        state = _state(
            _tls_stream(protocols=("TLSv1.3",)),
            Stream(name="api", port=15433, upstream="secure"),
            upstreams=(
                _upstream(),
                _upstream("secure", tls=UpstreamTLS(server_name="api.internal", ca=pki.root.pem)),
            ),
            certificates=(CertificateRef("dbcert", ("db.example.test",)),),
        )
        files = {
            "certs/dbcert.crt": b"cert",
            "certs/dbcert.key": b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n",
        }
        renderer = NginxRenderer(settings=RenderSettings(ssl_password_file="/v/ssl_password"))
        bundle = renderer.render(state, extra_files=files)
        conf = bundle.files[STREAMS_FILE].decode()
        pg, api = conf.split("# Stream ")[1:]
        assert pg.startswith("pg (tcp, TLS).")
        for line in (
            "listen 127.0.0.1:15432 ssl;",
            "ssl_certificate certs/dbcert.crt;",
            "ssl_certificate_key certs/dbcert.key;",
            "ssl_password_file /v/ssl_password;",
            "ssl_protocols TLSv1.3;",
        ):
            assert f"    {line}\n" in pg, line
        assert "proxy_ssl" not in pg
        assert "ssl_certificate" not in api
        for line in (
            "proxy_ssl on;",
            "proxy_ssl_name api.internal;",
            "proxy_ssl_verify on;",
            "proxy_ssl_trusted_certificate upstream-ca/secure.pem;",
        ):
            assert f"    {line}\n" in api, line
        assert bundle.files["upstream-ca/secure.pem"] == pki.root.pem.encode()
        assert "ssl_session_cache shared:nxmesh_stream_tls:10m;" in conf
        plain = renderer.render(_state(Stream(name="pg", port=15432, upstream="db")))
        assert b"ssl" not in plain.files[STREAMS_FILE]
        assert b"limit_conn" not in plain.files[STREAMS_FILE]


class TestTlsNginx:
    pytestmark = nginx_tests
    _files: dict[str, bytes]  # the certificate files `_tls_stack` applied

    @contextlib.asynccontextmanager
    async def _tls_stack(
        self, stack: NginxStack, tmp_path: Path, state: DesiredState, pki: Any
    ) -> AsyncIterator[None]:
        """Apply `state` as an agent does: the certificate material the master sends for
        it (`CertificateDistributor`), its key encrypted by the agent's vault."""
        from nxmesh.certs.distribution import AgentKeyVault, CertificateDistributor
        from nxmesh.crypto.secrets import MasterKeyring, generate_key
        from nxmesh.plugins.storage_sqlite import SqliteStorage

        storage = SqliteStorage("sqlite://", keyring=MasterKeyring(generate_key()))
        await storage.open()
        try:
            await storage.put_certificate(pki.stored("dbcert", "db.example.test"))
            material = await CertificateDistributor(storage).material_for_state(state)
        finally:
            await storage.aclose()
        assert [c.stem for c in material.certificates] == ["certs/dbcert"]
        vault = AgentKeyVault(tmp_path / "vault")
        files = self._files = vault.extra_files(material)
        assert b"ENCRYPTED" in files["certs/dbcert.key"]
        stack.renderer = NginxRenderer(
            settings=attrs.evolve(stack.render_settings, ssl_password_file=str(vault.password_file))
        )
        bundle = stack.renderer.render(state, extra_files=files)
        report = await stack.driver.apply(stack.update(state), bundle)
        assert report.outcome == "applied", report.message
        yield

    async def test_nginx_ends_the_clients_tls(self, stack: NginxStack, tmp_path: Path) -> None:
        """A client speaking TLS to the stream gets the certificate's chain (verified up
        to the root, by name) and the server gets the bytes inside, in clear; a client
        offering only a protocol the stream does not take is refused its handshake. The
        sites' TLS settings hold: no cipher without forward secrecy or AEAD, no session
        tickets."""
        import ssl

        from nxmesh.testing.pki import Pki

        pki = Pki()
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port, both = free_port(), free_port()
            state = DesiredState(
                upstreams=(_upstream("backend", f"127.0.0.1:{backend}"),),
                streams=(
                    _tls_stream(port, "backend", protocols=("TLSv1.3",)),
                    attrs.evolve(_tls_stream(both, "backend"), name="both"),
                ),
                certificates=(CertificateRef("dbcert", ("db.example.test",)),),
            )
            async with self._tls_stack(stack, tmp_path, state, pki):
                context = ssl.create_default_context(cadata=pki.root.pem)
                with anyio.fail_after(10):
                    async with await anyio.connect_tcp(
                        "127.0.0.1", port, tls=True, ssl_context=context,
                        tls_hostname="db.example.test",
                        tls_standard_compatible=False,
                    ) as client:  # fmt: skip
                        assert client.extra(anyio.streams.tls.TLSAttribute.tls_version) == (
                            "TLSv1.3"
                        )
                        await client.send(b"select 1")
                        assert await client.receive() == b"echo:select 1"
                assert first == [b"select 1"]
                old = ssl.create_default_context(cadata=pki.root.pem)
                old.maximum_version = ssl.TLSVersion.TLSv1_2
                with anyio.fail_after(10), pytest.raises((ssl.SSLError, anyio.BrokenResourceError)):
                    await anyio.connect_tcp(
                        "127.0.0.1", port, tls=True, ssl_context=old,
                        tls_hostname="db.example.test",
                        tls_standard_compatible=False,
                    )  # fmt: skip
                # Plain bytes on the TLS port never reach the server.
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await _exchange(port, b"GET / HTTP/1.0\r\n\r\n")
                assert first == [b"select 1"]
                # TLS 1.2 where the stream takes it: AEAD with forward secrecy, no ticket.
                with anyio.fail_after(10):
                    async with await anyio.connect_tcp(
                        "127.0.0.1", both, tls=True, ssl_context=old,
                        tls_hostname="db.example.test",
                        tls_standard_compatible=False,
                    ) as client:  # fmt: skip
                        cipher = client.extra(anyio.streams.tls.TLSAttribute.cipher)
                        assert cipher[0].startswith("ECDHE-"), cipher
                        assert "GCM" in cipher[0], cipher
                        await client.send(b"v1.2")
                        assert await client.receive() == b"echo:v1.2"
                        ssl_object = client.extra(anyio.streams.tls.TLSAttribute.ssl_object)
                        assert ssl_object.session is not None
                        assert not ssl_object.session.has_ticket
                cbc = ssl.create_default_context(cadata=pki.root.pem)
                cbc.maximum_version = ssl.TLSVersion.TLSv1_2
                cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
                with anyio.fail_after(10), pytest.raises((ssl.SSLError, anyio.BrokenResourceError)):
                    await anyio.connect_tcp(
                        "127.0.0.1", both, tls=True, ssl_context=cbc,
                        tls_hostname="db.example.test",
                        tls_standard_compatible=False,
                    )  # fmt: skip

    async def test_mutual_tls_admits_only_clients_of_the_listed_cas(
        self, stack: NginxStack, tmp_path: Path
    ) -> None:
        """`client_ca`: a client certificate of the listed CA is let through to the
        server; none, one of another CA, or one the CRL revokes gets no connection."""
        import ssl

        from nxmesh.testing.pki import Pki

        pki, clients, strangers = Pki(), Pki(), Pki()
        good, revoked, foreign = (
            clients.leaf("good.clients.test"),
            clients.leaf("revoked.clients.test"),
            strangers.leaf("foreign.clients.test"),
        )
        first: list[bytes] = []
        async with _tcp_server(first) as backend:
            port = free_port()
            stream = _tls_stream(
                port,
                "backend",
                client_ca=clients.root.pem,
                client_crl=Pki.crl(clients.root) + Pki.crl(clients.intermediate, revoked),
            )
            state = DesiredState(
                upstreams=(_upstream("backend", f"127.0.0.1:{backend}"),),
                streams=(stream,),
                certificates=(CertificateRef("dbcert", ("db.example.test",)),),
            )
            async with self._tls_stack(stack, tmp_path, state, pki):

                async def connect(leaf: Any, issuer: Pki | None) -> bytes:
                    context = ssl.create_default_context(cadata=pki.root.pem)
                    if leaf is not None and issuer is not None:
                        chain = tmp_path / "client.pem"
                        chain.write_text(leaf.pem + issuer.intermediate.pem + leaf.key_pem)
                        context.load_cert_chain(chain)
                    with anyio.fail_after(10):
                        async with await anyio.connect_tcp(
                            "127.0.0.1", port, tls=True, ssl_context=context,
                            tls_hostname="db.example.test", tls_standard_compatible=False,
                        ) as client:  # fmt: skip
                            await client.send(b"hello")
                            return await client.receive()

                assert await connect(good, clients) == b"echo:hello"
                for leaf, issuer in ((None, None), (foreign, strangers), (revoked, clients)):
                    with pytest.raises(
                        (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)
                    ):
                        await connect(leaf, issuer)
                assert first == [b"hello"]
                # nginx logs each refused client at crit ("SSL_shutdown() failed"): clients
                # refused while a change applies must not roll it back.
                stack.driver.settings = attrs.evolve(stack.driver.settings, error_log_window=1.0)
                changed = attrs.evolve(state, streams=(attrs.evolve(stream, timeout=60),))
                bundle = stack.renderer.render(changed, extra_files=self._files)
                refused = 0

                async def refuse_clients() -> None:
                    nonlocal refused
                    while True:
                        with contextlib.suppress(Exception):
                            await connect(None, None)
                        refused += 1

                async with anyio.create_task_group() as tg:
                    tg.start_soon(refuse_clients)
                    report = await stack.driver.apply(stack.update(changed), bundle)
                    tg.cancel_scope.cancel()
                assert report.outcome == "applied", report.message
                assert refused > 0
                errors = (stack.root / "logs" / "error.log").read_text()
                assert "[crit]" in errors  # what the apply had to tell from its own failures

    @pytest.mark.parametrize(
        ("server_name", "answered"),
        [("api.internal", True), ("other.internal", False)],
        ids=["its-name", "another-name"],
    )
    async def test_nginx_speaks_tls_to_the_servers(
        self, stack: NginxStack, tmp_path: Path, server_name: str, answered: bool
    ) -> None:
        """A stream before a TLS upstream: the client speaks plain TCP to nginx, nginx
        speaks TLS to the server, sends the name as SNI and checks the server's chain up
        to the upstream's CA and the name; a server with another name is not trusted."""
        from anyio.streams.tls import TLSListener

        from nxmesh.testing.pki import Pki
        from nxmesh.tls import serving_context

        pki = Pki()
        leaf = pki.leaf("api.internal")
        (tmp_path / "chain.pem").write_text(pki.chain(leaf))
        (tmp_path / "key.pem").write_text(leaf.key_pem)
        context = serving_context(tmp_path / "chain.pem", tmp_path / "key.pem")
        names: list[str | None] = []
        context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,unused-ignore]
        heard: list[bytes] = []

        async def serve(stream: anyio.abc.ByteStream) -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                async with stream:
                    chunk = await stream.receive()
                    heard.append(chunk)
                    await stream.send(b"tls:" + chunk)

        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as tcp:
            backend = tcp.extra(anyio.abc.SocketAttribute.local_port)
            listener = TLSListener(tcp, context, standard_compatible=False)
            tls = UpstreamTLS(server_name=server_name, ca=pki.root.pem)
            port = free_port()
            state = DesiredState(
                upstreams=(_upstream("api", f"127.0.0.1:{backend}", tls=tls),),
                streams=(Stream(name="api", port=port, address="127.0.0.1", upstream="api"),),
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, serve)
                await _apply(stack, state)
                if answered:
                    assert await _exchange(port, b"ping") == b"tls:ping"
                else:
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await _exchange(port, b"ping")
                tg.cancel_scope.cancel()
        assert names
        assert set(names) == {server_name}
        assert heard == ([b"ping"] if answered else [])


def test_acme_certificates_of_streams_are_answered_by_the_sites_serving_their_names() -> None:
    """HTTP-01 for a certificate only streams use: the site serving its domain gets the
    challenge location (another site does not), and a domain no site serves is warned
    of, naming DNS-01."""
    from nxmesh.certs.plugin import acme_problems

    ref = CertificateRef("mqtt", ("mqtt.example.test", "broker.example.test"), source="acme")
    stream = Stream(name="mqtts", port=8883, upstream="db", tls=StreamTLS(certificate="mqtt"))
    web = Site(
        name="web",
        server_names=("MQTT.example.test",),
        listeners=(Listener(port=8080),),
        locations=(Location(path="/", upstream="db"),),
    )
    other = attrs.evolve(web, name="other", server_names=("other.example.test",))
    state = _state(stream, sites=(web, other), certificates=(ref,))
    files = NginxRenderer().render(state).files
    assert b"/.well-known/acme-challenge/" in files["conf.d/site-web.conf"]
    assert b"/.well-known/acme-challenge/" not in files["conf.d/site-other.conf"]
    [warning] = acme_problems(state)
    assert (warning.path, warning.severity) == ("streams[0].tls.certificate", "warning")
    assert "no site serves broker.example.test over plain HTTP:" in warning.message
    assert "dns-01" in warning.message
    uploaded = attrs.evolve(state, certificates=(attrs.evolve(ref, source="upload"),))
    assert acme_problems(uploaded) == []
    # The challenge path is the agent's on that site: a location of its own there would
    # be a duplicate nginx refuses (and would stop getting its own requests).
    own = Location(path="/.well-known/acme-challenge/", upstream="db")
    taken = _state(
        stream, sites=(attrs.evolve(web, locations=(*web.locations, own)),), certificates=(ref,)
    )
    reason = _problems(taken)["sites[0].locations[1].path"]
    assert "certificate 'mqtt', which a stream ends TLS" in reason
    # HTTP-01 comes over plain HTTP: a TLS-only site without a redirect cannot answer.
    tls_only = attrs.evolve(
        web,
        listeners=(Listener(port=8443, tls=True),),
        tls=TLSConfig(certificate="web", redirect_http=False),
        server_names=("broker.example.test", "mqtt.example.test"),
    )
    web_cert = CertificateRef("web", ("broker.example.test", "mqtt.example.test"))
    state = _state(stream, sites=(tls_only,), certificates=(ref, web_cert))
    assert b"acme-challenge" not in NginxRenderer().render(state).files["conf.d/site-web.conf"]
    messages = [p.message for p in acme_problems(state)]
    assert any("mqtt.example.test, broker.example.test over" in m for m in messages), messages


# ---------------------------------------------------------------------------------------
# Routing TLS by name without ending it (`Stream.sni_routes`)
# ---------------------------------------------------------------------------------------


def _routed(*routes: SniRoute, upstream: str = "db", **fields: Any) -> Stream:
    return Stream(name="tls-in", port=15443, upstream=upstream, sni_routes=routes, **fields)


def _client_hello(name: str | None) -> bytes:
    """The first flight of a real TLS client asking for `name` (None: no SNI)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


class TestSniRoutesModel:
    @pytest.mark.parametrize(
        ("fields", "path", "says"),
        [
            ({"protocol": "udp"}, "sni_routes", "TCP streams"),
            ({"tls": StreamTLS(certificate="c")}, "sni_routes", "drop one"),
        ],
    )
    def test_routes_are_for_tls_nginx_passes_through(
        self, fields: dict[str, Any], path: str, says: str
    ) -> None:
        route = SniRoute(server_names=("a.test",), upstream="db")
        _refused(
            Stream,
            {"name": "s", "port": 1, "upstream": "db", "sni_routes": (route,), **fields},
            path,
            says,
        )

    @pytest.mark.parametrize(
        ("fields", "path", "says"),
        [
            ({"server_names": ()}, "server_names", "needs at least one server name"),
            ({"server_names": ("a b",)}, "server_names[0]", "a name like mail.example.com"),
            ({"server_names": ("*.com",)}, "server_names[0]", "subdomain of a real domain"),
            ({"server_names": ("10.0.0.1",)}, "server_names[0]", "SNI carries DNS names only"),
            ({"server_names": ("a.test", "a.test")}, "server_names[1]", "repeats server_names[0]"),
            ({"server_names": ("A.test",)}, "server_names[0]", "a name like mail.example.com"),
            ({"upstream": "A"}, "upstream", "lowercase name"),
        ],
    )
    def test_bad_route_fields_are_refused_by_name(
        self, fields: dict[str, Any], path: str, says: str
    ) -> None:
        _refused(SniRoute, {"server_names": ("a.test",), "upstream": "db", **fields}, path, says)

    def test_a_name_in_two_routes_is_refused_where_it_repeats(self) -> None:
        first = SniRoute(server_names=("a.test", "*.b.test"), upstream="db")
        again = SniRoute(server_names=("c.test", "*.b.test"), upstream="db")
        with pytest.raises(Invalid) as caught:
            _routed(first, again)
        assert list(caught.value.problems) == [
            ("sni_routes[1].server_names[1]", "repeats sni_routes[0].server_names[1] ('*.b.test')")
        ]

    def test_routes_are_left_out_of_the_canonical_form_while_unset(self) -> None:
        """`sni_routes` is an `ADDED_FIELD`: streams without routes keep their digests,
        and a stream with them reads back as written, from YAML's nested form too."""
        plain = Stream(name="pg", port=15432, upstream="db")
        assert "sni_routes" not in unstructure(plain)
        routed = _routed(SniRoute(server_names=("a.test",), upstream="db"))
        assert unstructure(routed)["sni_routes"] == [{"server_names": ["a.test"], "upstream": "db"}]
        assert structure(unstructure(routed), Stream) == routed
        assert routed.upstreams == ("db",)

    def test_the_routes_upstreams_are_checked(self) -> None:
        """An unknown upstream (with a did-you-mean), one balanced by ip_hash, and a TLS
        upstream on a route or as the stream's own (the client's TLS passes through)."""
        upstreams = (
            _upstream(),
            _upstream("mail", "127.0.0.1:993"),
            _upstream("hashed", lb_method="ip_hash"),
            _upstream("wrapped", tls=UpstreamTLS(server_name="mail.internal")),
        )
        stream = _routed(
            SniRoute(server_names=("a.test",), upstream="mial"),
            SniRoute(server_names=("b.test",), upstream="hashed"),
            SniRoute(server_names=("c.test",), upstream="wrapped"),
            SniRoute(server_names=("d.test",), upstream="mail"),
            upstream="wrapped",
        )
        problems = _problems(_state(stream, upstreams=upstreams))
        assert problems.keys() == {
            "streams[0].upstream",
            "streams[0].sni_routes[0].upstream",
            "streams[0].sni_routes[1].upstream",
            "streams[0].sni_routes[2].upstream",
        }
        assert (
            "unknown upstream 'mial' (did you mean 'mail'?)"
            in problems["streams[0].sni_routes[0].upstream"]
        )
        assert "ip_hash" in problems["streams[0].sni_routes[1].upstream"]
        for path in ("streams[0].upstream", "streams[0].sni_routes[2].upstream"):
            assert "passes its clients' TLS through as it is" in problems[path]
        fine = attrs.evolve(stream, upstream="db", sni_routes=stream.sni_routes[3:])
        assert _problems(_state(fine, upstreams=upstreams)) == {}


class TestSniRoutesRender:
    def test_the_map_reads_the_handshake_and_the_server_passes_tls_through(self) -> None:
        """One map per routed stream (named by its position), exact and wildcard names,
        map keywords escaped, the stream's upstream as the default; every upstream the
        routes name is written once."""
        upstreams = (_upstream(), _upstream("mail", "127.0.0.1:993"), _upstream("git"))
        routed = _routed(
            SniRoute(server_names=("imap.test", "*.mail.test", "default"), upstream="mail"),
            SniRoute(server_names=("include",), upstream="git"),
        )
        plain = Stream(name="pg", port=15432, upstream="db")
        streams = NginxRenderer().render(_state(plain, routed, upstreams=upstreams))
        text = streams.files[STREAMS_FILE].decode()
        assert [line for line in text.splitlines() if line.startswith("upstream ")] == [
            "upstream db {",
            "upstream git {",
            "upstream mail {",
        ]
        assert (
            "map $ssl_preread_server_name $nxmesh_sni_1 {\n"
            "    hostnames;\n"
            "    imap.test mail;\n"
            "    *.mail.test mail;\n"
            "    \\default mail;\n"
            "    \\include git;\n"
            "    default db;\n"
            "}\n"
        ) in text
        server = text.split("routed by SNI).\n")[1].split("server {")[1]
        assert "    ssl_preread on;\n    proxy_pass $nxmesh_sni_1;\n" in server
        assert "ssl_preread" not in text.split("# Stream pg")[1].split("# Stream tls-in")[0]

    def test_a_long_name_sets_the_map_bucket_size_before_any_map(self) -> None:
        """nginx fixes the map bucket size at the first map of the block (the connection
        limit's comes first): the size a long route name needs is set above it."""
        long_name = "a" * 60 + ".example.com"
        routed = _routed(
            SniRoute(server_names=(long_name,), upstream="db"), max_connections_per_client=5
        )
        text = NginxRenderer().render(_state(routed)).files[STREAMS_FILE].decode()
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        first_map = next(i for i, line in enumerate(lines) if line.startswith("map "))
        assert "map_hash_bucket_size 128;" in lines[:first_map]  # 72 characters
        short = NginxRenderer().render(
            _state(_routed(SniRoute(server_names=("a.test",), upstream="db")))
        )
        assert b"map_hash_bucket_size" not in short.files[STREAMS_FILE]

    def test_an_unknown_route_upstream_is_a_render_error(self) -> None:
        stream = _routed(SniRoute(server_names=("a.test",), upstream="gone"))
        with pytest.raises(RenderError, match="names upstream 'gone'"):
            NginxRenderer().render(_state(stream))


class TestSniRoutesNginx:
    pytestmark = nginx_tests

    async def test_each_name_reaches_its_routes_servers_with_tls_untouched(
        self, stack: NginxStack
    ) -> None:
        """Real TLS client hellos through real nginx: exact and wildcard names (one level
        and more, in any case) reach their route's server, names a map would take as
        keywords too, and a name too long for nginx's default map buckets; another name,
        no name, and a client not speaking TLS reach the stream's upstream. Each server
        gets the hello byte for byte: nginx ended no TLS."""
        long_name = "git." + "b" * 50 + ".example.com"
        heard: dict[str, list[bytes]] = {"mail": [], "git": [], "other": []}
        async with contextlib.AsyncExitStack() as servers:
            ports = {
                name: await servers.enter_async_context(_tcp_server(first))
                for name, first in heard.items()
            }
            port = free_port()
            state = DesiredState(
                upstreams=tuple(
                    _upstream(name, f"127.0.0.1:{backend}") for name, backend in ports.items()
                ),
                streams=(
                    Stream(
                        name="tls-in",
                        port=port,
                        address="127.0.0.1",
                        upstream="other",
                        sni_routes=(
                            SniRoute(
                                server_names=("imap.test", "*.mail.test", "default"),
                                upstream="mail",
                            ),
                            SniRoute(
                                server_names=("git.test", "include", long_name), upstream="git"
                            ),
                        ),
                    ),
                ),
            )
            await _apply(stack, state)
            expected = {
                "imap.test": "mail",
                "IMAP.Test": "mail",
                "eu.mail.test": "mail",
                "a.eu.mail.test": "mail",
                "default": "mail",
                "git.test": "git",
                "include": "git",
                long_name: "git",
                "mail.test": "other",  # the wildcard covers subdomains only
                "elsewhere.test": "other",
                None: "other",
            }
            for name, server in expected.items():
                hello = _client_hello(name)
                assert name is None or name.encode() in hello  # sent as written
                answer = await _exchange(port, hello)
                assert answer == b"echo:" + hello, name
                assert heard[server][-1] == hello, name
            assert await _exchange(port, b"not tls at all") == b"echo:not tls at all"
            assert heard["other"][-1] == b"not tls at all"
            assert [len(heard[s]) for s in ("mail", "git", "other")] == [5, 3, 4]
