"""API throughput with 1k agents registered, and fleet convergence after ``nxmesh apply``.

    .venv/bin/python bench/api_bench.py                    # 1,000 + 100 agents
    .venv/bin/python bench/api_bench.py --quick --out /tmp/api.json

Part 1 — **requests/s** (median/min/max over ``--repeats``):

``nxmesh``    a real ``nxmesh master`` subprocess (temp state dir, SQLite; the end-to-end
              harness of ``tests/e2e``) with ``--agents`` agents registered *and
              connected*: simulated agents in a separate process enroll through the real
              path — one single-use bootstrap token each (``POST .../bootstrap-tokens``),
              then the WebSocket transport (``ws://…/agent``) with `AgentLink` — and stay
              connected, acking every push with ``applied``.
              Reads: ``GET /healthz``, ``GET /api/v1/agents`` (a page of 100, the
              default) and ``?limit=1000`` (all of them),
              ``GET /api/v1/workspaces/default/versions`` (authenticated) with ``wrk``
              (falls back to httpx when wrk is missing). Writes: ``PUT
              /api/v1/workspaces/default/state`` with a different body each request (each
              stores a signed version and pushes it to every connected agent), with
              ``--connections`` concurrent httpx connections.
``baseline``  the same server (`nxmesh.master.server.serve_api`: hypercorn) serving a bare
              Litestar app with one trivial route (``GET``/``PUT /ping``), same clients.

Part 2 — **convergence**: a fresh master, 1 real ``nxmesh agent`` with its own nginx
(gRPC) and ``--converge-agents`` simulated agents (WebSocket, separate process). One
round: ``nxmesh apply -f state.json`` (the CLI, logged in with ``nxmesh login``) of a new
site body; the clock stops when the version's rollout (``GET .../versions/N/rollout``,
polled every 20 ms) says all agents run it. The apply's own duration is reported too.
Baseline: the same rounds with the real agent alone, on the same master, before the
simulated agents connect.

JSON to ``bench/results/api.json``; no timing is asserted anywhere (see
``tests/bench/test_api_bench_quick.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS_DIR,
    e2e_harness,
    machine_info,
    ratio,
    stats,
    stats_ms,
    utc_now,
    write_json,
)

DEFAULT_OUTPUT = RESULTS_DIR / "api.json"
READS = {
    "healthz": "/healthz",
    "agents": "/api/v1/agents",  # the first page: 100 agents (the default limit)
    "agents_1000": "/api/v1/agents?limit=1000",  # every agent in one page (the maximum)
    "versions": "/api/v1/workspaces/default/versions",
}
HERE = ["-m", "bench.api_bench"]
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Child processes: the baseline server and the agent simulator
# ---------------------------------------------------------------------------------------


def serve_baseline(port: int) -> None:
    """A bare Litestar app with one trivial route on NxMesh's own hypercorn setup."""
    import anyio
    from litestar import Litestar, Request, get, put

    from nxmesh.master.server import serve_api

    @get("/ping", sync_to_thread=False)
    def ping() -> dict[str, bool]:
        return {"ok": True}

    @put("/ping")
    async def ping_put(request: Request[Any, Any, Any]) -> dict[str, int]:
        body = await request.json()
        return {"size": len(body)}

    app = Litestar([ping, ping_put], openapi_config=None)
    anyio.run(lambda: serve_api(app, port=port), backend="asyncio")


async def _simulate(url: str, tokens: list[str], ready: Path) -> None:
    """One `AgentLink` per token over WebSocket; every update is acked ``applied``."""
    import anyio
    import structlog

    from nxmesh.agent_link import AgentLink, Endpoint, MemoryCredentialStore
    from nxmesh.core.protocol import ConfigStatus
    from nxmesh.plugins.transport_websocket import WebSocketTransport

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    async def consume(link: AgentLink) -> None:
        while True:
            update = await link.updates.receive()
            link.set_running(update.version, update.digest)
            link.send_status(
                ConfigStatus(version=update.version, digest=update.digest, phase="applied")
            )

    async with anyio.create_task_group() as tg:
        links = []
        for i, token in enumerate(tokens):
            link = AgentLink(
                [Endpoint(WebSocketTransport(), url)], MemoryCredentialStore(),
                bootstrap_token=token, name=f"sim-{i:05d}", labels={"sim": "yes"},
                agent_version="bench",
            )  # fmt: skip
            links.append(link)
            tg.start_soon(link.run_forever)
            tg.start_soon(consume, link)
            if i % 25 == 24:
                await anyio.sleep(0.05)  # a gentler enrollment storm
        for link in links:
            await link.wait_registered()
        await anyio.Path(ready).write_text(str(len(links)))
        await anyio.sleep_forever()


def simulate(url: str, token_file: Path, ready: Path) -> None:
    import anyio

    tokens = json.loads(token_file.read_text())
    anyio.run(_simulate, url, tokens, ready, backend="asyncio")


def _child(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, *HERE, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------
# Load generators
# ---------------------------------------------------------------------------------------

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")


def wrk_rps(url: str, *, seconds: float, connections: int, token: str | None) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    command = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", url]
    if token:
        command[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)  # noqa: S603
    found = _RPS.search(out.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    return {"rps": float(found.group(1)) if found else 0.0,
            "errors": int(non2xx.group(1)) if non2xx else 0}  # fmt: skip


async def httpx_rps(
    method: str, url: str, *, seconds: float, connections: int, token: str | None,
    body: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """`connections` workers sending back to back for `seconds`; 2xx per second.
    For PUT, each request's body differs (`body(i)`)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    done = errors = 0
    counter = 0
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=60) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done, errors, counter
            while time.perf_counter() < deadline:
                counter += 1
                kwargs = {"json": body(counter)} if body else {}
                response = await client.request(method, url, **kwargs)
                if response.is_success:
                    done += 1
                else:
                    errors += 1
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {"rps": done / elapsed, "errors": errors, "error_statuses": statuses}


def measure(
    method: str, url: str, *, args: argparse.Namespace, token: str | None = None,
    body: Any = None,
) -> dict[str, Any]:  # fmt: skip
    samples, errors, statuses = [], 0, {}
    use_wrk = method == "GET" and shutil.which("wrk") is not None
    for _ in range(args.repeats):
        if use_wrk:
            one = wrk_rps(url, seconds=args.duration, connections=args.connections, token=token)
        else:
            one = asyncio.run(httpx_rps(method, url, seconds=args.duration, body=body,
                                        connections=args.connections, token=token))  # fmt: skip
        samples.append(round(one["rps"], 1))
        errors += one["errors"]
        for code, n in one.get("error_statuses", {}).items():
            statuses[str(code)] = statuses.get(str(code), 0) + n
    return {**stats(samples), "samples": samples, "errors": errors, "error_statuses": statuses,
            "client": "wrk" if use_wrk else "httpx"}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Part 1: requests/s
# ---------------------------------------------------------------------------------------


def _state_body(i: int) -> dict[str, Any]:
    from nxmesh.core.serialization import unstructure

    h = e2e_harness()
    return unstructure(h.site_state(18080, f"bench-{os.getpid()}-{i}-{time.time_ns()}"))  # type: ignore[no-any-return]


def _tokens(master: Any, count: int) -> list[str]:
    import httpx

    async def create() -> list[str]:
        auth = {"Authorization": f"Bearer {master._login()}"}
        url = f"{master.url}/api/v1/workspaces/default/bootstrap-tokens"
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(headers=auth, timeout=60) as client:

            async def one(i: int) -> str:
                async with sem:
                    r = await client.post(url, json={"labels": {"sim": "yes"}, "ttl": 3600})
                    r.raise_for_status()
                    return str(r.json()["token"])

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    return asyncio.run(create())


def _online(master: Any) -> int:
    """Agents online, over every page of ``GET /agents``."""
    import httpx

    auth = {"Authorization": f"Bearer {master._login()}"}
    url: str | None = "/api/v1/agents?limit=1000"
    online = 0
    with httpx.Client(base_url=master.url, headers=auth, timeout=60) as client:
        while url is not None:
            response = client.get(url)
            response.raise_for_status()
            online += sum(a["status"] == "online" for a in response.json())
            url = response.links.get("next", {}).get("url")
    return online


def start_simulator(
    master: Any, count: int, work: Path, *, timeout: float
) -> subprocess.Popen[bytes]:
    """Enroll `count` simulated agents over WebSocket; return once all are online."""
    token_file, ready = work / f"tokens-{count}.json", work / f"ready-{count}"
    started = time.perf_counter()
    token_file.write_text(json.dumps(_tokens(master, count)))
    url = master.url.replace("http://", "ws://") + "/agent"
    proc = _child(["--simulate", url, str(token_file), str(ready)], work / f"sim-{count}.log")
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            log = (work / f"sim-{count}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"simulated agents did not all register:\n{log}")
        time.sleep(0.2)
    print(f"  {count} simulated agents enrolled in {time.perf_counter() - started:.1f} s",
          flush=True)  # fmt: skip
    return proc


def part_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from nxmesh.testing.nginx import free_port

    h = e2e_harness()
    out: dict[str, Any] = {"agents": args.agents, "connections": args.connections,
                           "duration_s": args.duration, "repeats": args.repeats}  # fmt: skip
    # Baseline: bare Litestar on the same hypercorn setup.
    port = free_port()
    server = _child(["--serve-baseline", str(port)], work / "baseline.log")
    try:
        import httpx

        h.wait_for("the baseline server", lambda: httpx.get(
            f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200, timeout=30)  # fmt: skip
        base = f"http://127.0.0.1:{port}/ping"
        out["baseline"] = {
            "get": measure("GET", base, args=args),
            "put": measure("PUT", base, args=args, body=_state_body),
        }
    finally:
        _stop(server)
    print("  baseline measured", flush=True)

    master = h.Master(work / "master-api")
    sim = None
    try:
        master.start()
        started = time.perf_counter()
        sim = start_simulator(master, args.agents, work, timeout=args.enroll_timeout)
        out["enroll_seconds"] = round(time.perf_counter() - started, 2)
        out["agents_online"] = _online(master)
        nx: dict[str, Any] = {}
        for name, path in READS.items():
            token = None if name == "healthz" else master._login()
            nx[name] = measure("GET", master.url + path, args=args, token=token)
            print(f"  GET {path}: {nx[name]['median']:.0f} req/s", flush=True)
        nx["put_state"] = measure(
            "PUT", master.url + "/api/v1/workspaces/default/state", args=args,
            token=master._login(), body=_state_body,
        )  # fmt: skip
        print(f"  PUT state: {nx['put_state']['median']:.1f} req/s", flush=True)
        out["nxmesh"] = nx
    finally:
        if sim is not None:
            _stop(sim)
        master.kill9()
    out["ratios"] = {
        **{name: ratio(out["nxmesh"][name]["median"], out["baseline"]["get"]["median"])
           for name in READS},
        "put_state": ratio(out["nxmesh"]["put_state"]["median"],
                           out["baseline"]["put"]["median"]),
    }  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------
# Part 2: convergence after `nxmesh apply`
# ---------------------------------------------------------------------------------------


def _cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> str:
    h = e2e_harness()
    out = subprocess.run(  # noqa: S603 - our own CLI
        [*h.NXMESH, *args], input=stdin, capture_output=True, text=True, env=env, check=False,
        timeout=120,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"nxmesh {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out.stdout


def _round(
    master: Any, env: dict[str, str], work: Path, body: str, agents: int
) -> dict[str, float]:
    from nxmesh.core.serialization import unstructure

    h = e2e_harness()
    state_file = work / "state.json"
    state_file.write_text(json.dumps(unstructure(h.site_state(18081, body))))
    t0 = time.perf_counter()
    printed = _cli(["apply", "-f", str(state_file), "-m", body, "--json"], env)
    applied = time.perf_counter() - t0
    number = int(json.loads(printed)["version"]["number"])
    while True:
        view = master.rollout(number)
        if view["converged"] and len(view["agents"]) == agents:
            break
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"version {number} did not converge on {agents} agents")
        time.sleep(0.02)
    return {"apply": applied, "converged": time.perf_counter() - t0}


def _rounds(master: Any, env: dict[str, str], work: Path, label: str, agents: int,
            rounds: int) -> dict[str, Any]:  # fmt: skip
    _round(master, env, work, f"{label}-warmup", agents)
    samples = [_round(master, env, work, f"{label}-{i}", agents) for i in range(rounds)]
    result = {
        "agents": agents,
        "converged": stats_ms([s["converged"] for s in samples]),
        "apply": stats_ms([s["apply"] for s in samples]),
    }
    converged, applied = result["converged"]["median_ms"], result["apply"]["median_ms"]
    print(f"  {label}: {agents} agents converged in {converged:.0f} ms (apply {applied:.0f} ms)",
          flush=True)  # fmt: skip
    return result


def part_convergence(args: argparse.Namespace, work: Path, nginx: str) -> dict[str, Any]:
    h = e2e_harness()
    root = work / "fleet"
    master = h.Master(root)
    agent = None
    sim = None
    try:
        master.start()
        agent = h.Agent(root / "agent-0", "agent-0", "127.0.0.2", master, "grpc", nginx)
        agent.start(master.token(node="agent-0"))
        h.wait_for("the real agent to enroll", lambda: any(
            a["status"] == "online" for a in master.agents()), timeout=60,
            logs=(master.process.log, agent.process.log))  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("NXMESH_")}
        env["NXMESH_TEST_CONFIG_HOME"] = str(work / "cli-home")
        password = (master.state_dir / "initial-admin-password").read_text().strip()
        _cli(["login", "--url", master.url, "--username", "admin", "--password-stdin"], env,
             stdin=password + "\n")  # fmt: skip
        base = _rounds(master, env, work, "one real agent", 1, args.rounds)
        sim = start_simulator(master, args.converge_agents, work, timeout=args.enroll_timeout)
        total = args.converge_agents + 1
        fleet = _rounds(master, env, work, f"1 real + {args.converge_agents} simulated", total,
                        args.rounds)  # fmt: skip
    finally:
        if sim is not None:
            _stop(sim)
        if agent is not None:
            agent.kill()
        master.kill9()
        if agent is not None:
            agent.stop_nginx()
    return {
        "baseline": base,
        "fleet": fleet,
        "ratio": ratio(fleet["converged"]["median_ms"], base["converged"]["median_ms"]),
    }


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    t = results["throughput"]
    print(f"\nAPI requests/s, {t['agents']} agents connected, {t['connections']} connections "
          f"(median [min-max] of {t['repeats']})")  # fmt: skip
    print(f"{'request':<34}{'nxmesh':>22}{'baseline':>12}{'ratio':>8}")
    rows = [(f"GET {p}", t["nxmesh"][n], t["baseline"]["get"], t["ratios"][n])
            for n, p in READS.items()]  # fmt: skip
    rows.append(("PUT .../state (new version)", t["nxmesh"]["put_state"], t["baseline"]["put"],
                 t["ratios"]["put_state"]))  # fmt: skip
    for label, nx, base, r in rows:
        cell = f"{nx['median']:.0f} [{nx['min']:.0f}-{nx['max']:.0f}]"
        print(f"{label[:34]:<34}{cell:>22}{base['median']:>12.0f}{(r or 0):>8.3f}")
    c = results.get("convergence")
    if c:
        print("\nConvergence after `nxmesh apply` (median ms)")
        for key in ("baseline", "fleet"):
            row = c[key]
            print(f"  {row['agents']:>4} agents: converged {row['converged']['median_ms']:>8.0f}"
                  f"   apply {row['apply']['median_ms']:>6.0f}")  # fmt: skip
        print(f"  ratio fleet/baseline: {c['ratio']:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--agents", type=int, default=None, help="agents for part 1 (1000)")
    parser.add_argument("--converge-agents", type=int, default=None,
                        help="simulated agents for part 2 (100)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=None, help="seconds per sample")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--enroll-timeout", type=float, default=600.0)
    parser.add_argument("--skip-convergence", action="store_true")
    parser.add_argument("--nginx", default="nginx")
    parser.add_argument("--out", "--output", dest="out", type=Path, default=None)
    parser.add_argument("--serve-baseline", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--simulate", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    q = args.quick
    args.agents = args.agents or (10 if q else 1000)
    args.converge_agents = args.converge_agents or (5 if q else 100)
    args.duration = args.duration or (1.0 if q else 5.0)
    args.repeats = args.repeats or (1 if q else 3)
    args.rounds = args.rounds or (2 if q else 5)
    if q:
        args.connections = min(args.connections, 4)
    args.out = args.out or DEFAULT_OUTPUT
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline)
        return {}
    if args.simulate is not None:
        url, tokens, ready = args.simulate
        simulate(url, Path(tokens), Path(ready))
        return {}
    nginx = shutil.which(args.nginx) or args.nginx
    work = Path(tempfile.mkdtemp(prefix="nxmesh-api-bench-"))
    results: dict[str, Any] = {
        "benchmark": "api",
        "quick": args.quick,
        "measured_at": utc_now(),
        "machine": machine_info(nginx),
        "registration": "enrollment: one bootstrap token per simulated agent, WebSocket",
    }
    try:
        print("part 1: API requests/s", flush=True)
        results["throughput"] = part_throughput(args, work)
        if not args.skip_convergence:
            print("part 2: convergence after nxmesh apply", flush=True)
            results["convergence"] = part_convergence(args, work, nginx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, results)
    print_table(results)
    print(f"\nresults: {args.out}")
    return results


if __name__ == "__main__":
    main()
