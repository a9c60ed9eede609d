"""A master, two agents and two real nginx, over gRPC and over WebSocket.

One fleet per transport (class scope) runs the scenarios in order: roll out, a version
nginx refuses, rollback, an agent restart, the master killed mid-rollout, island mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Agent, Fleet, make_fleet, site_state, wait_for

pytestmark = [pytest.mark.nginx]


@pytest.fixture(scope="class", params=["grpc", "websocket"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, e2e_nginx: str
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    yield from make_fleet(root, e2e_nginx, request.param)


class TestRollout:
    def test_apply_reaches_both_agents_and_their_nginx(self, fleet: Fleet) -> None:
        """A state stored through the API is applied by both agents; both nginx serve it."""
        m = fleet.master
        version = m.put_state(site_state(fleet.web_port, "hello v1"), "first")
        view = m.wait_converged(version["number"], agents=2, logs=fleet.logs)
        assert {a["status"]["phase"] for a in view["agents"]} <= {"applied", "noop"}
        assert all(a["running_version"] == version["number"] for a in view["agents"])
        fleet.wait_bodies("hello v1")
        transport = fleet.agents[0].transport
        assert m.metric("nxmesh_master_connected_agents", transport=transport) == 2
        assert m.metric("nxmesh_master_pushes_total", outcome="applied") >= 2
        assert m.metric("nxmesh_master_convergence_seconds_count") >= 1

    def test_bad_config_fails_with_nginx_message(self, fleet: Fleet) -> None:
        """A version nginx -t refuses: failed with nginx's own words, old content served."""
        m = fleet.master
        version = m.put_state(site_state(fleet.web_port, "broken", broken=True), "broken")

        def failed() -> list[dict[str, object]] | None:
            agents = m.rollout(version["number"])["agents"]
            done = [a for a in agents if a["reason"] == "failed"]
            return agents if len(done) == 2 else None

        agents = wait_for("both agents to report the failure", failed, logs=fleet.logs)
        for agent in agents:
            status = agent["status"]
            assert isinstance(status, dict)
            assert "host not found" in str(status["message"]), status
        fleet.wait_bodies("hello v1")

    def test_rollback_restores_the_previous_content(self, fleet: Fleet) -> None:
        """Rolling back to the last good version converges again on both agents."""
        m = fleet.master
        good = next(
            v for v in m.api("GET", "/workspaces/default/versions") if v["message"] == "first"
        )
        version = m.rollback(good["number"])
        m.wait_converged(version["number"], agents=2, logs=fleet.logs)
        fleet.wait_bodies("hello v1")

    def test_restarted_agent_resumes_without_token_and_without_push(self, fleet: Fleet) -> None:
        """An agent restarted on the current digest reconnects with its stored credentials
        and is not sent the version again."""
        m = fleet.master
        agent = fleet.agents[0]
        agent_id = agent.agent_id
        sent_before = m.metric("nxmesh_master_pushes_total", outcome="sent")
        agent.stop()
        agent.start()  # no token: the credentials stored at enrollment

        def back_online() -> bool:
            return any(a["id"] == agent_id and a["status"] == "online" for a in m.agents())

        wait_for("the agent to reconnect", back_online, logs=fleet.logs)
        assert len(m.agents()) == 2  # the same agent, not a new one
        agent_body = wait_for("nginx back", lambda: agent.body(fleet.web_port), logs=fleet.logs)
        assert agent_body == "hello v1"
        assert m.metric("nxmesh_master_pushes_total", outcome="sent") == sent_before

    def test_master_killed_mid_rollout_then_restarted(self, fleet: Fleet) -> None:
        """kill -9 the master right after storing a version; once it is back, every agent
        reconnects and the rollout completes."""
        m = fleet.master
        version = m.put_state(site_state(fleet.web_port, "hello v2"), "during a crash")
        m.kill9()
        m.start()
        view = m.wait_converged(version["number"], agents=2, timeout=45, logs=fleet.logs)
        assert all(a["on_version"] for a in view["agents"])
        fleet.wait_bodies("hello v2")

    def test_agent_without_master_serves_its_cache(self, fleet: Fleet) -> None:
        """Master down and nginx stopped: a restarted agent boots nginx from its cache."""
        m = fleet.master
        agent = fleet.agents[1]
        m.stop()
        agent.stop()  # stops its nginx too
        assert agent.nginx_pid() is None
        agent.start()
        body = wait_for("island boot", lambda: agent.body(fleet.web_port), logs=fleet.logs)
        assert body == "hello v2"

        def reported_unreachable() -> bool:
            # Polled, not read once: the cache boot and the link's first attempt run side
            # by side, so the line can land just after nginx serves.
            log = Path(agent.process.log).read_text()
            return "master.unreachable" in log or "cannot reach the master" in log

        wait_for("the master reported unreachable", reported_unreachable, logs=fleet.logs)
        m.start()  # leave the fleet whole for whatever runs next

    def test_an_agent_refused_before_it_served_anything_stops_saying_why(
        self, fleet: Fleet
    ) -> None:
        """A bootstrap token the master does not know: the agent has no configuration to
        serve and never will with that token, so it exits 77 (the systemd unit does not
        restart on it) with the master's reason and what to do, instead of idling."""
        m = fleet.master
        stranger = Agent(
            m.root.parent / "stranger", "stranger", "127.0.0.9", m,
            fleet.agents[0].transport, fleet.agents[0].nginx_binary,
        )  # fmt: skip
        stranger.start("nxb_unknown.0123456789abcdef0123456789abcdef")
        proc = stranger.process.proc
        assert proc is not None
        try:
            code = proc.wait(timeout=30)
        finally:
            stranger.stop()
        log = Path(stranger.process.log).read_text()
        assert code == 77, log
        assert "the master refused this agent" in log
        assert "nxmesh token create" in log
        assert "stranger" not in {a["name"] for a in m.agents()}
