"""Agent reliability under load, and what an idle agent costs.

**Traffic during applies** — `wrk` hammers the live nginx while 30 applies run:

``agent/close``     agent applies, ``Connection: close``: the goal is **0 errors**;
``agent/keepalive`` agent applies, keep-alive connections;
``raw/keepalive``   the baseline in the same run: overwrite files + ``nginx -t`` +
                    ``kill -HUP``, keep-alive. The agent's read errors should not exceed
                    these (a graceful reload closes idle keep-alive connections either way);
``restart/close``   the control: *restart* nginx instead of reloading it, ``Connection:
                    close``. It must show errors, proving the harness can see loss.

**Idle agent** — a real ``nxmesh-agent --state FILE`` process serving one site is left
alone; its PSS (proportional set size: shared libraries counted by share) and CPU time
are sampled over the window, once with every installed plugin loaded and once with the
master-side plugins disabled (``disable_plugins``), as on an agent-only host. The goal is
at most 40 MB PSS.

Usage::

    .venv/bin/python bench/agent_reliability.py            # → bench/results/agent_reliability.json
    .venv/bin/python bench/agent_reliability.py --quick --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

if __package__ in (None, ""):  # run as a file: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    bare_python_pss,
    machine_info,
    parse_wrk,
    stats,
    under_wrk,
    utc_now,
    write_json,
)
from nxmesh.agent.applier import Applier
from nxmesh.agent.harness import NginxStack, multi_site_state
from nxmesh.agent.http import http_get
from nxmesh.agent.process import read_pid_file
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.serialization import unstructure
from nxmesh.nginx_check import find_nginx, prepare_prefix
from nxmesh.testing.nginx import free_port

RESULTS = Path(__file__).parent / "results" / "idle.json"
PSS_GOAL_MB = 40.0
__all__ = ["idle", "main", "parse_wrk", "traffic", "under_wrk"]


async def traffic(binary: str, wrk: str, applies: int, workdir: Path) -> dict[str, Any]:
    pm = get_plugin_manager(autoload=False, environ={})
    results: dict[str, Any] = {"applies": applies}
    async with NginxStack(workdir / "agent", binary) as stack:
        applier = Applier(pm, stack.driver, stack.renderer, events=stack.events)
        warm = await applier.apply(stack.update(stack.state("warm", sites=10)))
        assert warm.outcome == "applied", warm.message

        async def agent_applies() -> None:
            for i in range(applies):
                report = await applier.apply(stack.update(stack.state(f"a{i}", sites=10)))
                assert report.outcome == "applied", report.message

        results["agent/close"] = await under_wrk(wrk, stack.web_port, False, agent_applies)
        results["agent/keepalive"] = await under_wrk(wrk, stack.web_port, True, agent_applies)

        async def restarts() -> None:
            for _ in range(max(3, applies // 10)):
                pid = await stack.mode.nginx_pid()
                assert pid is not None
                await stack.mode.signal_nginx("quit")
                while await stack.mode.nginx_pid() is not None:  # noqa: ASYNC110 - a process
                    await anyio.sleep(0.01)
                await stack.mode.start_nginx()
                await anyio.sleep(0.1)

        results["restart/close"] = await under_wrk(wrk, stack.web_port, False, restarts)

    raw_root = workdir / "raw"
    prepare_prefix(raw_root)
    port = free_port()
    renderer = NginxStack(raw_root, binary, status_port=free_port()).renderer
    command = [binary, "-p", f"{raw_root}/", "-c", str(raw_root / "nginx.conf")]

    def write(body: str) -> None:
        for rel, data in renderer.render(multi_site_state(port, body, sites=10)).files.items():
            (raw_root / rel).parent.mkdir(parents=True, exist_ok=True)
            (raw_root / rel).write_bytes(data)

    write("warm")
    await anyio.run_process(command)

    async def raw_applies() -> None:
        for i in range(applies):
            write(f"r{i}")
            await anyio.run_process([*command, "-t", "-q"])
            pid = await read_pid_file(raw_root / "logs" / "nginx.pid")
            assert pid is not None
            os.kill(pid, signal.SIGHUP)
            while True:  # the same "new config serves" wait as the agent's
                try:
                    response = await http_get("127.0.0.1", port, "/", host_header="localhost")
                    if response.text.strip() == f"r{i}":
                        break
                except OSError:
                    pass
                await anyio.sleep(0.005)

    try:
        results["raw/keepalive"] = await under_wrk(wrk, port, True, raw_applies)
    finally:
        pid = await read_pid_file(raw_root / "logs" / "nginx.pid")
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    reloads = {"agent/keepalive": applies, "raw/keepalive": applies}
    # wrk holds 16 keep-alive connections; a graceful reload closes the idle ones, so each
    # reload costs up to 16 read errors whoever sends the HUP.
    results["keepalive_read_errors_per_reload"] = {
        name: round(results[name]["read"] / count, 2) for name, count in reloads.items()
    }
    results["goals"] = {
        "zero_errors_with_connection_close": results["agent/close"]["errors"] == 0,
        "keepalive_read_errors_at_most_raw": (
            results["agent/keepalive"]["read"] <= results["raw/keepalive"]["read"]
        ),
        "control_detects_loss": results["restart/close"]["errors"] > 0,
    }
    return results


MASTER_SIDE_PLUGINS = (
    "master",
    "storage_sqlite",
    "storage_postgres",
    "auth_password",
    "auth_oauth2",
)
"""Plugins an agent-only host does not need; disabling them is one setting."""


def idle(
    binary: str, seconds: float, workdir: Path, *, disable: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Start a masterless agent, wait until it serves, sample PSS and CPU for `seconds`.

    `disable`: plugins blocked through ``NXMESH_DISABLE_PLUGINS`` (never imported).
    """
    workdir = workdir / f"idle-{len(disable)}"
    workdir.mkdir()
    state_file = workdir / "idle.json"
    web, status = free_port(), free_port()
    state_file.write_text(json.dumps(unstructure(multi_site_state(web, "idle"))))
    env = {
        **os.environ,
        "NXMESH_STATE_DIR": str(workdir / "idle-state"),
        "NXMESH_AGENT__CONF_DIR": str(workdir / "idle-nginx"),
        "NXMESH_AGENT__NGINX_BINARY": binary,
        "NXMESH_AGENT__DEPLOYMENT_MODE": "standalone",
        "NXMESH_AGENT__METRICS_PORT": "0",
        "NXMESH_PLUGINS__NGINX_DRIVER__STATUS_PORT": str(status),
        "NXMESH_LOG_LEVEL": "warning",
        "NXMESH_DISABLE_PLUGINS": ",".join(disable),
    }
    # The daemon entry point deployments run (`nxmesh-agent`, see nxmesh.agent_daemon).
    code = "from nxmesh.agent_daemon import main; main()"
    agent = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
        [sys.executable, "-c", code, "--state", str(state_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if anyio.run(_body, web) == "idle":
                    break
            except OSError:
                pass
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not start serving")
            time.sleep(0.05)
        time.sleep(min(2.0, seconds))  # let start-up work (first health checks) settle
        proc = psutil.Process(agent.pid)
        cpu_before = proc.cpu_times()
        started = time.monotonic()
        pss: list[float] = []
        while time.monotonic() - started < seconds:
            pss.append(proc.memory_full_info().pss / 2**20)
            time.sleep(min(1.0, seconds / 10))
        cpu_after = proc.cpu_times()
        wall = time.monotonic() - started
        cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        rss = proc.memory_info().rss / 2**20
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    return {
        "disabled_plugins": list(disable),
        "seconds": round(wall, 1),
        "pss_mb": {k: round(v, 2) for k, v in stats(pss).items()},
        "pss_mb_max": round(max(pss), 2),
        "pss_mb_last": round(pss[-1], 2),
        "rss_mb": round(rss, 2),
        "cpu_seconds": round(cpu, 3),
        "cpu_percent": round(100 * cpu / wall, 3),
        "goal": f"PSS <= {PSS_GOAL_MB:.0f} MB",
        "goal_met": max(pss) <= PSS_GOAL_MB,
    }


async def _body(port: int) -> str:
    return (await http_get("127.0.0.1", port, "/", host_header="localhost")).text.strip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few applies, short idle window")
    parser.add_argument("--applies", type=int, default=None)
    parser.add_argument("--idle-seconds", type=float, default=None)
    parser.add_argument("--nginx", default="nginx")
    parser.add_argument("--wrk", default="wrk")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-traffic", action="store_true", help="only the idle agent")
    parser.add_argument("--skip-idle", action="store_true", help="only the wrk scenarios")
    args = parser.parse_args(argv)
    applies = args.applies or (3 if args.quick else 30)
    seconds = args.idle_seconds or (2.0 if args.quick else 60.0)
    out = args.out or (RESULTS if not args.quick else Path(tempfile.gettempdir()) / "rel.json")
    binary = find_nginx(args.nginx)
    wrk = shutil.which(args.wrk) or args.wrk
    workdir = Path(tempfile.mkdtemp(prefix="nxmesh-reliability-"))
    try:
        results: dict[str, Any] = {
            "benchmark": "wrk during applies; idle agent PSS and CPU",
            "quick": args.quick,
            "started_at": utc_now(),
            "machine": machine_info(binary),
        }
        if not args.skip_traffic:
            results["traffic"] = anyio.run(traffic, binary, wrk, applies, workdir)
        if not args.skip_idle:
            results["idle"] = idle(binary, seconds, workdir)
            results["idle_agent_only"] = idle(binary, seconds, workdir, disable=MASTER_SIDE_PLUGINS)
            # The baseline: what any Python process costs before it does anything.
            results["idle_baseline_python"] = bare_python_pss(min(seconds, 2.0))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(out, results)
    if "traffic" in results:
        for name in ("agent/close", "agent/keepalive", "raw/keepalive", "restart/close"):
            counts = results["traffic"][name]
            print(f"{name:16} {counts['requests']:>8} requests, {counts['errors']} errors "
                  f"{counts}")  # fmt: skip
        print("goals:", results["traffic"]["goals"])
    if "idle" in results:
        print("idle, every plugin:", results["idle"])
        print("idle, master-side plugins disabled:", results["idle_agent_only"])
        print("bare Python interpreter:", results["idle_baseline_python"])
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
