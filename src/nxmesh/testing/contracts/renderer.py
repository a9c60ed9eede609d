"""Behaviour every renderer provides."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from nxmesh.core.bundle import Bundle, bundle_digest
from nxmesh.core.errors import NxMeshError
from nxmesh.core.interfaces import Renderer
from nxmesh.testing.factories import make_state


class RendererContract:
    """Provide ``renderer``: an instance ready to render.

    The `nginx -t` test uses the ``nginx_binary`` fixture of the ``nxmesh`` pytest plugin
    (a failure in CI when nginx is missing, a skip elsewhere).
    """

    @pytest.fixture
    def renderer(self) -> Renderer:
        raise NotImplementedError("subclasses provide renderer")

    def test_renders_a_bundle_with_nginx_conf(self, renderer: Renderer) -> None:
        """A state renders to a bundle holding nginx.conf, digest matching its files."""
        bundle = renderer.render(make_state(3))
        assert isinstance(bundle, Bundle)
        assert "nginx.conf" in bundle.files
        assert bundle.digest == bundle_digest(bundle.files)

    def test_nginx_accepts_the_rendering(self, renderer: Renderer, nginx_binary: str) -> None:
        """Real ``nginx -t`` accepts the bundle of a valid state."""
        from nxmesh.nginx_check import check_bundle

        result = check_bundle(
            renderer.render(make_state(3)), binary=nginx_binary, placeholder_certificates=True
        )
        assert result.ok, result.message

    def test_every_site_and_upstream_is_rendered(self, renderer: Renderer) -> None:
        """Each site's server names and each upstream server's address reach the bundle
        (a renderer that drops part of the state fails here, not in production)."""
        state = make_state(3)
        text = b"\n".join(renderer.render(state).files.values()).decode()
        for site in state.sites:
            for server_name in site.server_names:
                assert server_name in text, f"site {site.name}: {server_name} not rendered"
        for upstream in state.upstreams:
            for server in upstream.servers:
                assert server.address in text, f"upstream {upstream.name} not rendered"

    def test_streams_are_rendered_or_refused(self, renderer: Renderer) -> None:
        """A state's TCP/UDP streams reach the bundle (the port and the upstream's servers
        in a file other than the plain state's), or the render is refused naming the
        stream: never dropped, which would apply "successfully" and open no port."""
        from nxmesh.core.model import Stream

        plain = make_state(1)
        stream = Stream(name="contract-stream", port=47999, upstream=plain.upstreams[0].name)
        state = attrs.evolve(plain, streams=(stream,))
        refused: str | None = None
        try:
            bundle = renderer.render(state)
        except NxMeshError as exc:
            refused = str(exc)
        if refused is not None:
            assert "contract-stream" in refused, f"refused without naming the stream: {refused}"
            return
        before = renderer.render(plain).files
        added = b"\n".join(
            data for path, data in bundle.files.items() if before.get(path) != data
        ).decode()
        assert "47999" in added, "the stream's port is not rendered"
        for server in plain.upstreams[0].servers:
            assert server.address in added, "the stream's upstream is not rendered with it"

    def test_tls_streams_use_their_certificate_or_are_refused(
        self, renderer: Renderer, tmp_path: Path
    ) -> None:
        """A TCP stream ending TLS (`Stream.tls`) is a ``server`` listening with ``ssl``
        on its port, with its certificate and key, and requiring client certificates of
        its `client_ca` (``ssl_verify_client on``), or the render is refused naming the
        stream: a renderer that ignored `tls` would serve the port in clear, one that
        ignored `client_ca` would let every client in. Read as nginx reads it (comments
        are not directives)."""
        import crossplane

        from nxmesh.core.model import CertificateRef, Stream, StreamTLS
        from nxmesh.nginx_check import write_bundle
        from nxmesh.testing.pki import Pki

        plain = make_state(1)
        stream = Stream(
            name="contract-tls",
            port=47998,
            upstream=plain.upstreams[0].name,
            tls=StreamTLS(certificate="contract-cert", client_ca=Pki().root.pem),
        )
        state = attrs.evolve(
            plain,
            streams=(stream,),
            certificates=(CertificateRef("contract-cert", ("contract.example.test",)),),
        )
        files = {"certs/contract-cert.crt": b"certificate", "certs/contract-cert.key": b"key"}
        refused: str | None = None
        try:
            bundle = renderer.render(state, extra_files=files)
        except NxMeshError as exc:
            refused = str(exc)
        if refused is not None:
            assert "contract-tls" in refused, f"refused without naming the stream: {refused}"
            return
        write_bundle(bundle, tmp_path)
        servers: list[dict[str, list[list[str]]]] = []
        for rel, data in bundle.files.items():
            if not rel.endswith(".conf") or b"47998" not in data:
                continue
            parsed = crossplane.parse(
                str(tmp_path / rel), single=True, check_ctx=False, check_args=False,
                comments=False,
            )  # fmt: skip
            stack = [c["parsed"] for c in parsed["config"]]
            while stack:
                block = stack.pop()
                for d in block:
                    if d["directive"] == "server" and "block" in d:
                        found: dict[str, list[list[str]]] = {}
                        for inner in d["block"]:
                            found.setdefault(inner["directive"], []).append(inner["args"])
                        servers.append(found)
                    if "block" in d:
                        stack.append(d["block"])
        tls = [
            server
            for server in servers
            if any(
                any("47998" in arg for arg in args) and "ssl" in args
                for args in server.get("listen", [])
            )
        ]
        assert tls, "no server listens with ssl on the stream's port"
        assert [["certs/contract-cert.crt"]] in [s.get("ssl_certificate") for s in tls], tls
        assert [["certs/contract-cert.key"]] in [s.get("ssl_certificate_key") for s in tls], tls
        checked = [s for s in tls if s.get("ssl_verify_client") == [["on"]]]
        assert checked, "the stream does not require client certificates (client_ca)"
        assert all(s.get("ssl_client_certificate") for s in checked), checked

    def test_identical_input_gives_identical_bytes(self, renderer: Renderer) -> None:
        """Rendering the same state twice yields byte-identical bundles."""
        state = make_state(5)
        assert renderer.render(state).files == renderer.render(state).files

    def test_different_input_gives_a_different_digest(self, renderer: Renderer) -> None:
        """A changed state changes the digest."""
        assert renderer.render(make_state(2)).digest != renderer.render(make_state(3)).digest

    def test_extra_files_are_carried_verbatim(self, renderer: Renderer) -> None:
        """A certificate passed as an extra file lands in the bundle byte for byte, and
        the digest covers it."""
        pem = b"-----BEGIN CERTIFICATE-----\ncontract\n-----END CERTIFICATE-----\n"
        plain = renderer.render(make_state(1))
        bundle = renderer.render(make_state(1), extra_files={"certs/contract.crt": pem})
        assert bundle.files["certs/contract.crt"] == pem
        assert bundle.digest != plain.digest

    @pytest.mark.parametrize("path", ["../escape.crt", "/etc/escape.crt", "certs/../../x.crt"])
    def test_extra_file_outside_the_bundle_is_refused(self, renderer: Renderer, path: str) -> None:
        """An extra file whose path leaves the bundle is an error naming it, never a
        file written elsewhere by the agent."""
        with pytest.raises(NxMeshError, match=r"escape|x\.crt"):
            renderer.render(make_state(1), extra_files={path: b"x"})

    def test_duplicate_site_names_are_an_error(self, renderer: Renderer) -> None:
        """Two sites of one name would overwrite each other's file: an error naming it."""
        state = make_state(2)
        twin = attrs.evolve(state.sites[1], name=state.sites[0].name)
        doubled = attrs.evolve(state, sites=(state.sites[0], twin))
        with pytest.raises(NxMeshError, match=state.sites[0].name):
            renderer.render(doubled)
