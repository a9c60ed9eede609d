"""ACME end to end through a live master and a live agent, against a real Pebble.

``nxmesh master`` runs with ``[plugins.certs]`` pointed at Pebble (HTTP-01); one
``nxmesh agent`` supervises a real nginx whose plain-HTTP listener is the port Pebble's
validation authority connects to (every name resolves to 127.0.0.1 through
pebble-challtestsrv). A state with a ``tls: acme`` site goes in through the API; the
master's renewal scheduler orders the certificate, rolls the HTTP-01 token out to the
agent, Pebble validates through nginx, the issued chain is rolled out, and a client that
trusts only Pebble's root fetches the site over HTTPS.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from nxmesh.core.model import DesiredState, Listener, Location, Return, Site, TLSConfig
from nxmesh.testing.nginx import free_port
from nxmesh.testing.pebble import PebbleServer, run_pebble
from nxmesh.testing.services import require_binary

from .conftest import WORKSPACE, Agent, Fleet, Master, _toml, wait_for

pytestmark = [pytest.mark.nginx, pytest.mark.pebble]

NAME = "shop.example.test"
BODY = "shop over tls"


def append_table(config: Path, name: str, table: dict[str, Any]) -> None:
    """Add one ``[name]`` table at the end of a harness-written TOML file."""
    lines = [f"{k} = {_toml(v)}" for k, v in table.items()]
    with config.open("a") as f:
        f.write(f"\n[{name}]\n" + "\n".join(lines) + "\n")


@pytest.fixture
def pebble_server(tmp_path: Path) -> Iterator[PebbleServer]:
    pebble_binary = require_binary("pebble")
    challtestsrv_binary = require_binary("pebble-challtestsrv")
    with run_pebble(
        tmp_path / "pebble", pebble_binary=pebble_binary, challtestsrv_binary=challtestsrv_binary
    ) as server:
        yield server


@pytest.fixture
def fleet(tmp_path: Path, e2e_nginx: str, pebble_server: PebbleServer) -> Iterator[Fleet]:
    """A master with ACME against Pebble and one enrolled agent over gRPC."""
    master = Master(tmp_path / "fleet")
    append_table(
        master.root / "master.toml",
        "plugins.certs",
        {
            "acme_directory": pebble_server.directory_url,
            "ca_bundle": pebble_server.ca_bundle,
            "agree_tos": True,
            "contact_email": "admin@example.test",
            "challenge": "http-01",
            "poll_interval": 0.2,
            "order_timeout": 30.0,
            "network_timeout": 10.0,
            # No short check_interval: the stored version wakes the scheduler.
            # A failed order (agent still applying) is retried after 1 s.
            "retry_initial": 1.0,
            "retry_max": 2.0,
        },
    )
    fleet = Fleet(master, [])
    # nginx's workers (nobody, when the tests run as root) read the HTTP-01 token files
    # from the agent's conf dir: it must be traversable like /etc/nginx, which pytest's
    # 0700 tmp dirs are not.
    agent_root = Path(tempfile.mkdtemp(prefix="nxmesh-e2e-acme-"))
    agent_root.chmod(0o755)
    try:
        master.start()
        agent = Agent(agent_root, "agent-0", "127.0.0.2", master, "grpc", e2e_nginx)
        fleet.agents.append(agent)
        agent.start(master.token(node=agent.name))
        wait_for(
            "the agent to enroll",
            lambda: [a for a in master.agents() if a["status"] == "online"],
            timeout=30,
            logs=fleet.logs,
        )
        yield fleet
    finally:
        fleet.close()
        shutil.rmtree(agent_root, ignore_errors=True)


def acme_state(http_port: int, tls_port: int) -> DesiredState:
    # Pebble's VA connects to 127.0.0.1 (challtestsrv resolves every name there), so
    # both listeners name that address instead of the agent's own 127.0.0.2.
    return DesiredState(
        workspace=WORKSPACE,
        sites=(
            Site(
                name="shop",
                server_names=(NAME,),
                listeners=(
                    Listener(port=http_port, address="127.0.0.1"),
                    Listener(port=tls_port, address="127.0.0.1", tls=True),
                ),
                tls=TLSConfig(acme=True),
                locations=(Location(path="/", return_=Return(code=200, body=BODY)),),
            ),
        ),
    )


def https_get(port: int, root_pem: str) -> tuple[x509.Certificate, str]:
    """GET / over TLS, verifying the chain against `root_pem` and the host name."""
    context = ssl.create_default_context(cadata=root_pem)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return x509.load_der_x509_certificate(der), data.decode(errors="replace")


def test_http01_issue_and_serve_through_master_and_agent(
    fleet: Fleet, pebble_server: PebbleServer
) -> None:
    """`tls: acme` via the API → HTTP-01 through the agent's nginx → HTTPS with Pebble's chain."""
    m = fleet.master
    tls_port = free_port()
    root_pem = pebble_server.root_pem()
    logs = (*fleet.logs, pebble_server.log_file)

    started = time.monotonic()
    version = m.put_state(acme_state(pebble_server.http_port, tls_port), "acme site")
    m.wait_converged(version["number"], agents=1, logs=logs)

    def served() -> tuple[x509.Certificate, str] | None:
        try:
            return https_get(tls_port, root_pem)
        except ssl.SSLCertVerificationError:
            return None  # still the placeholder certificate

    cert, response = wait_for("the agent to serve the Pebble-issued certificate", served,
                              timeout=30, interval=0.2, logs=logs)  # fmt: skip
    elapsed = time.monotonic() - started
    print(f"issued and served {elapsed:.1f} s after the state was stored")

    assert response.startswith("HTTP/1.1 200"), response
    assert response.endswith(BODY), response
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert NAME in san.get_values_for_type(x509.DNSName)
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert "Pebble" in str(issuer), issuer
    assert pebble_server.cert_status(cert.serial_number)["Status"] == "Valid"
    # What the agent serves is the ACME certificate the master stored.
    stored = m.api("GET", f"/workspaces/{WORKSPACE}/certificates/shop")
    assert stored["source"] == "acme", stored
    assert stored["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert stored["domains"] == [NAME]
    assert stored["chain_length"] >= 2, stored  # leaf + Pebble's intermediate
