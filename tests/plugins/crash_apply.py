"""Run one apply in its own process, for the crash tests (``kill -9`` at a checkpoint).

Usage: ``python crash_apply.py ROOT NGINX WEB_PORT STATUS_PORT BODY BACKEND [BLOCKED_PORT]``.
The stack attaches to the nginx already running from ROOT (pid file), applies a state
answering BODY, and prints the outcome. With ``NXMESH_TEST_PAUSE_AT`` set, the driver
stops at that stage and waits to be killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import attrs

from nxmesh.agent.harness import NginxStack
from nxmesh.core.model import Listener, Site


async def main(argv: list[str]) -> None:
    root, binary, web, status, body, _backend, *blocked = argv
    stack = NginxStack(
        root=Path(root),
        nginx_binary=binary,
        web_port=int(web),
        status_port=int(status),
        supervise=False,
    )
    state = stack.state(body)
    if blocked:
        clash = Site(
            name="clash",
            server_names=("clash.test",),
            listeners=(Listener(port=int(blocked[0]), address="127.0.0.1"),),
            locations=state.sites[0].locations,
        )
        state = attrs.evolve(state, sites=(*state.sites, clash))
    report = await stack.driver.apply(stack.update(state), stack.render(state))
    print(report.outcome, report.message, flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:], backend=sys.argv[6])
