"""What an agent connected to its master over gRPC holds in memory: guard the cheap wins.

Its idle PSS (bench/results/convergence.json, "agent connected to its master") is mostly
the code of the modules it imported. ``tests/bench/test_agent_footprint.py`` covers the
masterless agent; this one runs a real master, a real agent and its nginx.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from nxmesh.testing.footprint import agent_with_module_dump, held_modules

from .conftest import Agent, make_fleet, site_state

pytestmark = [pytest.mark.nginx]

# What an agent that reached its master over gRPC does without: the WebSocket fallback
# (tried only when gRPC cannot connect), the state-file loader (PyYAML; masterless
# agents only), the master's storage and API, rich (the daemon keeps structlog from
# loading it: `nxmesh.agent_daemon`), protobuf's descriptors, cryptography's PEM module.
NOT_IN_A_GRPC_AGENT = (
    "wsproto",
    "h11",
    "nxmesh.websocket.handshake",
    "nxmesh.websocket.asyncio_channel",
    "yaml",
    "nxmesh.core.loader",
    "nxmesh.agent.masterless",
    "sqlalchemy",
    "litestar",
    "hypercorn",
    "acme",
    "nxmesh.cli.client_cmds",
    "rich",
    "pygments",
    "difflib",  # did-you-mean hints and drift diffs only
    "nxmesh.config.diff",
    # protobuf's descriptors: the agent's gRPC calls encode and parse `Frame` by hand.
    "nxmesh_transport_grpc._generated.agent_pb2",
    "nxmesh_transport_grpc.server",
    "google.protobuf.descriptor_pool",
    # PEM handling for every key type and SSH keys: the pinned master key is Ed25519.
    "cryptography.hazmat.primitives.serialization",
)


def test_a_grpc_connected_agent_imports_neither_the_fallback_nor_the_state_loader_nor_rich(
    tmp_path: Path, e2e_nginx: str
) -> None:
    with contextlib.contextmanager(make_fleet)(tmp_path, e2e_nginx, "grpc", agents=0) as fleet:
        # The one agent runs under the dump wrapper, enrolled like `Agent.start` does it.
        agent = Agent(tmp_path / "agent", "agent", "127.0.0.2", fleet.master, "grpc", e2e_nginx)
        fleet.agents.append(agent)
        token = agent.root / "bootstrap-token"
        token.write_text(fleet.master.token(node=agent.name) + "\n")
        token.chmod(0o600)
        out = tmp_path / "agent.modules"
        agent.process.args = agent_with_module_dump(
            ["--config", str(agent.config), "--bootstrap-token-file", str(token)], out
        )
        agent.process.start()
        version = fleet.master.put_state(site_state(fleet.web_port, "footprint"), "footprint")
        fleet.master.wait_converged(version["number"], agents=1, logs=fleet.logs)
        fleet.wait_bodies("footprint")
        modules = held_modules(out, alive=agent.process.alive)
    assert {"nxmesh.agent.app", "nxmesh_transport_grpc.transport", "jinja2"} <= modules
    regrown = [m for m in NOT_IN_A_GRPC_AGENT if m in modules]
    assert regrown == []
