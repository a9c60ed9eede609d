"""Benchmark: config fan-out from one master to many agents over real gRPC on loopback.

    .venv/bin/python bench/fanout_bench.py                  # 1,000 and 5,000 agents
    .venv/bin/python bench/fanout_bench.py --quick          # 50 agents, one round
    .venv/bin/python bench/fanout_bench.py --agents 1000 --rounds 5 --repeat 3

Two implementations run in the same invocation, each in *fresh processes*:

``nxmesh``  the real master: `MasterSessionHub` on `GrpcTransport` (grpclib), enrollment
            and keys in SQLite (on /dev/shm when available), signed envelopes. Each push
            is `hub.push(version)`; an agent's ack is its ``received`` `ConfigStatus`.
            The version travels zlib-compressed, as a master sends it to its agents
            (compressed once per version; ``frame_bytes`` is the size on the wire).
``plain``   diagnostic: ``nxmesh`` with compression off (``compress_versions = false``),
            frames of the version's full size like raw's: what the protocol costs alone.
``raw``     plain grpclib with the same service and TLS and no NxMesh logic: a handler
            per stream that sends a pre-built frame of the version's (uncompressed) size
            and reads one reply.
            grpclib's default `Configuration` and h2 settings, the same server TLS
            context, and asyncio's TLS read buffer capped like the NxMesh master's
            (`limit_tls_read_buffer`, a plain setting). NxMesh's own per-connection trims
            (`_trim_connection`, the copy-free send) are NxMesh code, not given to raw.
``ws``      the session hub as ``nxmesh``, on the WebSocket transport's own server
            (`WebSocketTransport.serve`, ``wss://``, the agents' fallback) instead of
            gRPC; compared with the same raw grpclib baseline (``--kinds nxmesh,ws,raw``).
``wsapi``   the session hub where ``nxmesh master`` serves agent WebSockets: mounted on
            its API listener (hypercorn + ASGI: `serve_api`, `AgentWebSocketMount`,
            `AgentPlane`, `AsgiChannel`), ``wss://`` with the same certificate; the same
            simulated agents as ``ws``. gRPC is the master's primary agent transport.

Per run, one process is the master, a *separate* process simulates all the agents (one
gRPC connection each). Simulated NxMesh agents register with pre-provisioned keys
(announcing that they read compressed bodies, as agents do), verify every frame's HMAC
(which hashes the whole body), inflate a compressed body and answer with a signed status;
they do not decode or apply the desired state (that is the agent's work, not the
master's). Raw agents just answer.

The versions are fleet-like states (`fleet_state`: per site its own names, upstream
addresses, ports and locations, seeded), so they compress about as much as a real
configuration's canonical JSON (~10x), not as much as copies of one site would.

For 2 KB and 64 KB versions it reports the time until all agents acked (median over
``--rounds`` pushes), the median and p99 per-agent ack latency, and master memory per
agent: RSS and PSS (psutil) after all agents connected minus before, and after the pushes.
Ratios nxmesh/raw are computed per agent count and size. JSON goes to
``bench/results/fanout.json``. Goals (issue 5): at 5,000 agents, all acked within 1.3x of
raw grpclib; at most 60 KB master memory per agent.

Both processes share this machine's cores with each other; on a 2-core box the agent
simulator competes with the master, so absolute times are pessimistic for both kinds.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "fanout.json"
SIZES = {"2KB": 2 * 1024, "64KB": 64 * 1024}
GOAL_RATIO = 1.3
GOAL_KB_PER_AGENT = 60.0
GOAL_AGENTS = 5000
_WEBSOCKET_KINDS = ("ws", "wsapi")


# ---------------------------------------------------------------------------------------
# Shared helpers (run in every process)
# ---------------------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _memory() -> dict[str, float]:
    import psutil

    gc.collect()
    info = psutil.Process().memory_full_info()
    return {"rss": float(info.rss), "pss": float(getattr(info, "pss", info.rss))}


_WORDS = (
    *("shop", "api", "auth", "billing", "search", "media", "static", "cdn", "admin", "blog"),
    *("docs", "status", "mail", "chat", "pay", "orders", "users", "cart", "report"),
    *("metrics", "edge", "gateway", "images", "video", "assets"),
)
_DOMAINS = ("example.com", "example.net", "corp.example.org", "shop.example.io")


def fleet_state(sites: int, seed: int) -> Any:
    """A desired state like a fleet's: every site its own names, upstream servers (private
    addresses, ports, weights) and extra locations, drawn from `seed`. Identical copies
    of one site would compress far better than real configurations do."""
    import random

    from nxmesh.core.model import DesiredState, Location, Site, Upstream, UpstreamServer

    rng = random.Random(seed)  # noqa: S311 - test data, reproducible by seed
    upstreams, site_list = [], []
    for _ in range(sites):
        name = f"{rng.choice(_WORDS)}-{rng.getrandbits(24):06x}"
        servers = tuple(
            UpstreamServer(
                address=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                f":{rng.choice((80, 3000, 8000, 8080, 9000))}",
                weight=rng.randint(1, 5),
            )
            for _ in range(rng.randint(2, 4))
        )
        upstreams.append(Upstream(name=name, servers=servers))
        locations = [Location(path="/", upstream=name)]
        locations += [
            Location(
                path=f"/{rng.choice(_WORDS)}/v{rng.randint(1, 3)}/",
                upstream=name,
                proxy_read_timeout=rng.choice((30, 60, 120)),
            )
            for _ in range(rng.randint(0, 2))
        ]
        hosts = tuple(
            f"{rng.choice(_WORDS)}{rng.randint(1, 99)}.{rng.choice(_DOMAINS)}"
            for _ in range(rng.randint(1, 3))
        )
        site_list.append(Site(name=name, server_names=hosts, locations=tuple(locations)))
    return DesiredState(upstreams=tuple(upstreams), sites=tuple(site_list))


def _versions(rounds: int) -> list[tuple[str, Any]]:
    """Versions whose ConfigUpdate body is about each target size, numbered upwards."""
    import attrs

    from nxmesh.core.protocol import ConfigUpdate, encode_body
    from nxmesh.core.serialization import state_digest
    from nxmesh.testing.factories import make_version

    def body_size(sites: int) -> int:
        version = make_version(1, state=fleet_state(sites, seed=0))
        return len(encode_body(ConfigUpdate.of(version)).data)

    out: list[tuple[str, Any]] = []
    number = 0
    for label, target in SIZES.items():
        sites = 1
        while body_size(sites) < target:
            sites += 1
        for _ in range(rounds):
            number += 1
            state = fleet_state(sites, seed=number)
            version = attrs.evolve(make_version(number, state=state), digest=state_digest(state))
            out.append((label, version))
    return out


def _frame_size(version: Any, *, compressed: bool = False) -> int:
    """Bytes of the frame carrying `version`: plain (the version's size), or as a master
    sends it compressed."""
    from nxmesh.core.envelope import seal
    from nxmesh.core.protocol import ConfigUpdate, compress_body, encode_body

    body = encode_body(ConfigUpdate.of(version))
    if compressed:
        body = compress_body(body)
    return len(seal(body, agent_id="a" * 32, key_id="k" * 20, key=b"k" * 32, seq=1, ts_ms=1))


def _tls_files(paths: dict[str, str]) -> Any:
    from nxmesh.tls import TLSFiles

    return TLSFiles(**{k: Path(v) for k, v in paths.items()})  # type: ignore[arg-type]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# ---------------------------------------------------------------------------------------
# Master processes
# ---------------------------------------------------------------------------------------


def _pin(cpu: int) -> None:
    """Master on one CPU, the agent simulator on another: less scheduler noise for both."""
    count = os.cpu_count() or 1
    if count >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu % count})


def master_main(kind: str, conn: Connection, opts: dict[str, Any]) -> None:
    global _GC_CLOCKS
    _raise_fd_limit()
    _pin(0)
    _GC_CLOCKS = opts.pop("gc_clocks")
    _time_gc(_GC_CLOCKS[0])
    import anyio

    from nxmesh.core.settings import MasterSettings
    from nxmesh.master.server import tune_gc

    # The collector as `nxmesh master` sets it, for every kind: raw grpclib too (a plain
    # setting; with Python's default its master ran 0.5 s full collections at 5,000).
    tune_gc(MasterSettings().gc_threshold)

    runners = {
        "nxmesh": _nxmesh_master,
        "plain": _plain_master,
        "ws": _ws_master,
        "wsapi": _ws_api_master,
        "raw": _raw_master,
        "transport": _transport_master,
    }
    anyio.run(runners[kind], conn, opts, backend="asyncio")


async def _ws_master(conn: Connection, opts: dict[str, Any]) -> None:
    """The session hub on the WebSocket transport's own server (not the API-mounted one)."""
    await _nxmesh_master(conn, opts, websocket=True)


async def _ws_api_master(conn: Connection, opts: dict[str, Any]) -> None:
    """The session hub where ``nxmesh master`` serves agent WebSockets: mounted on its API
    listener (hypercorn, `serve_api`, `AgentWebSocketMount` → `AgentPlane`)."""
    await _nxmesh_master(conn, opts, websocket=True, api=True)


def _agent_mount(hub: Any) -> Any:
    """The master's ASGI routing for agent WebSockets in front of an app that only does
    lifespan (the API itself is not under test)."""
    from types import SimpleNamespace

    from nxmesh.master.agent_plane import AGENT_PLANE, AgentPlane, AgentWebSocketMount

    async def lifespan_only(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            raise RuntimeError(f"unexpected {scope['type']} request")
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    plane = AgentPlane(hub=hub, orchestrator=None, websocket=hub.handler("websocket"))  # type: ignore[arg-type]
    services = SimpleNamespace(stash={AGENT_PLANE: plane})
    return AgentWebSocketMount(lifespan_only, services, path="/agent")  # type: ignore[arg-type]


async def _plain_master(conn: Connection, opts: dict[str, Any]) -> None:
    """Diagnostic kind: the session hub on gRPC with versions sent uncompressed."""
    await _nxmesh_master(conn, opts, compress=False)


async def _nxmesh_master(
    conn: Connection,
    opts: dict[str, Any],
    *,
    websocket: bool = False,
    api: bool = False,
    compress: bool = True,
) -> None:
    import anyio
    import structlog

    from nxmesh.core.model import Agent
    from nxmesh.core.protocol import ConfigStatus
    from nxmesh.crypto.secrets import MasterKeyring, generate_key
    from nxmesh.enrollment import Enrollment
    from nxmesh.plugins.storage_sqlite import SqliteStorage
    from nxmesh.session_hub import MasterSessionHub
    from nxmesh.tls import server_ssl_context
    from nxmesh_transport_grpc import GrpcSettings, GrpcTransport

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    agents: int = opts["agents"]
    workdir = Path(opts["workdir"])
    storage = SqliteStorage(
        f"sqlite:///{workdir / 'master.db'}", keyring=MasterKeyring(generate_key())
    )
    await storage.open()
    enrollment = Enrollment(storage)
    creds = []
    for i in range(agents):
        agent = Agent(id=f"agent{i:05d}", name=f"sim{i}")
        await storage.upsert_agent(agent)
        key = await enrollment.new_key(agent.id)
        creds.append([agent.id, key.key_id, base64.b64encode(key.secret).decode()])
    (workdir / "creds.json").write_text(json.dumps(creds))

    acked: dict[str, float] = {}

    async def on_message(agent_id: str, message: Any) -> None:
        if isinstance(message, ConfigStatus):
            acked[agent_id] = time.perf_counter()

    hub = MasterSessionHub(
        enrollment, heartbeat_interval=3600.0, on_message=on_message, compress=compress
    )
    ctx = None
    if opts["tls"]:
        tls = _tls_files(opts["tls"])
        ctx = server_ssl_context(tls)
    serve: Any
    if api:
        from nxmesh.core.settings import MasterSettings
        from nxmesh.master.server import serve_api

        scheme, path = ("wss" if ctx else "ws"), "/agent"
        files = (tls.cert, tls.key) if ctx else None
        serve = partial(
            serve_api,
            _agent_mount(hub),
            tls=files,
            tls_read_buffer=MasterSettings().tls_read_buffer_bytes,  # as `nxmesh master`
            graceful_timeout=1.0,
        )
    elif websocket:
        from nxmesh.plugins.transport_websocket import WebSocketTransport

        scheme, path = ("wss" if ctx else "ws"), "/agent"
        transport = WebSocketTransport(f"{scheme}://127.0.0.1:0{path}", ssl_context=ctx)
        serve = partial(transport.serve, hub)
    else:
        scheme, path = ("grpcs" if ctx else "grpc"), ""
        transport = GrpcTransport(
            f"{scheme}://127.0.0.1:0", ssl_context=ctx, settings=GrpcSettings(tls=bool(ctx))
        )
        serve = partial(transport.serve, hub)
    kind = "wsapi" if api else "ws" if websocket else "nxmesh" if compress else "plain"
    versions = _versions(opts["rounds"])
    async with anyio.create_task_group() as tg:
        address = await tg.start(serve)
        before = _memory()
        conn.send({"address": f"{scheme}://{address}{path}"})
        started = time.perf_counter()
        await hub.wait_connected(agents)
        connected = time.perf_counter() - started
        after_connect = _memory()
        simulator = await _simulator(conn)
        pushes = []
        profiler = _profiler(opts)
        for label, version in versions:
            acked.clear()
            gc0 = _gc_collections()
            cpu0, t0 = _cpu(simulator), time.perf_counter()
            targets = hub.push(version)
            await hub.wait_for_status(version.number, targets)
            total, cpu = time.perf_counter() - t0, _spent(cpu0, simulator)
            latencies = [acked[a] - t0 for a in targets]
            size = _frame_size(version, compressed=compress)
            pushes.append(_push_result(label, size, total, cpu, latencies))
            pushes[-1]["version_bytes"] = _frame_size(version)
            pushes[-1]["gc_collections"] = _gc_collections(gc0)
            await anyio.sleep(0.2)
        _dump_profile(profiler, opts, kind)
        after_push = _memory()
        conn.send(
            _run_result(
                kind,
                agents,
                connected,
                before,
                after_connect,
                after_push,
                pushes,
                hub.counters.as_dict(),
            )
        )
        # Sessions first, as a master's agent plane does on shutdown: cancelled under a
        # server still running, hypercorn logs a traceback per open WebSocket.
        for agent_id in hub.connected:
            hub.disconnect(agent_id)
        await anyio.sleep(1.0)  # their tasks end and close their connections
        tg.cancel_scope.cancel()
    await storage.aclose()


async def _raw_master(conn: Connection, opts: dict[str, Any]) -> None:
    import asyncio

    import anyio
    from grpclib.server import Server

    from nxmesh.tls import limit_tls_read_buffer, server_ssl_context
    from nxmesh_transport_grpc import GrpcSettings
    from nxmesh_transport_grpc._generated.agent_grpc import AgentServiceBase
    from nxmesh_transport_grpc._generated.agent_pb2 import Frame

    agents: int = opts["agents"]
    versions = _versions(opts["rounds"])

    class Round:
        def __init__(self, size: int) -> None:
            self.frame = Frame(data=os.urandom(size))
            self.go = asyncio.Event()
            self.done = asyncio.Event()
            self.acked: list[float] = []
            self.t0 = 0.0

    rounds = [Round(_frame_size(v)) for _, v in versions]
    all_connected = asyncio.Event()
    connected = 0

    class Service(AgentServiceBase):
        async def Stream(self, stream: Any) -> None:
            nonlocal connected
            if await stream.recv_message() is None:
                return
            connected += 1
            if connected == agents:
                all_connected.set()
            for r in rounds:
                await r.go.wait()
                await stream.send_message(r.frame)
                if await stream.recv_message() is None:
                    return
                r.acked.append(time.perf_counter())
                if len(r.acked) == agents:
                    r.done.set()
            await asyncio.Event().wait()  # keep the stream open like a session

        async def ReportHealth(self, stream: Any) -> None:
            raise NotImplementedError

        async def ReportMetrics(self, stream: Any) -> None:
            raise NotImplementedError

    ctx = None
    if opts["tls"]:
        ctx = server_ssl_context(_tls_files(opts["tls"]))
        ctx.set_alpn_protocols(["h2"])
        # The same asyncio TLS buffer the NxMesh master uses: a fair baseline.
        limit_tls_read_buffer(GrpcSettings().tls_read_buffer_bytes)
    server = Server([Service()])
    await server.start("127.0.0.1", 0, ssl=ctx, backlog=1024)
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    scheme = "grpcs" if ctx else "grpc"
    before = _memory()
    conn.send({"address": f"{scheme}://127.0.0.1:{port}"})
    started = time.perf_counter()
    await all_connected.wait()
    connected_s = time.perf_counter() - started
    after_connect = _memory()
    simulator = await _simulator(conn)
    pushes = []
    profiler = _profiler(opts)
    for (label, _), r in zip(versions, rounds, strict=True):
        gc0 = _gc_collections()
        cpu0, r.t0 = _cpu(simulator), time.perf_counter()
        r.go.set()
        await r.done.wait()
        total, cpu = time.perf_counter() - r.t0, _spent(cpu0, simulator)
        latencies = [t - r.t0 for t in r.acked]
        pushes.append(_push_result(label, len(r.frame.data), total, cpu, latencies))
        pushes[-1]["gc_collections"] = _gc_collections(gc0)
        await anyio.sleep(0.2)
    _dump_profile(profiler, opts, "raw")
    after_push = _memory()
    conn.send(
        _run_result("raw", agents, connected_s, before, after_connect, after_push, pushes, {})
    )
    server.close()
    with anyio.move_on_after(5):
        await server.wait_closed()


async def _simulator(conn: Connection) -> Any:
    """The agent simulator process, once all its agents registered and it froze its heap.

    The parent sends its pid only then: the simulator's collection before the freeze walks
    every agent's objects (~0.6 s at 5,000), and the first push must not run beside it.
    """
    import anyio
    import psutil

    message = await anyio.to_thread.run_sync(conn.recv)
    return psutil.Process(message["simulator_pid"])


# Seconds each process spent in the cyclic garbage collector, in shared memory so the
# master reads the simulator's: a full collection walks every session's objects (the
# simulator's walks all 5,000 agents', which no real agent process does) and explains
# most of the spread between pushes of the same version.
_GC_CLOCKS: tuple[Any, Any] | None = None  # (master's, simulator's): the master reads both


def _time_gc(clock: Any) -> None:
    """Add this process's time in the garbage collector to `clock` (an `mp.Value`)."""
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            clock.value += time.perf_counter() - started

    gc.callbacks.append(callback)


def _cpu(simulator: Any) -> tuple[float, ...]:
    """CPU seconds so far of the master (this process) and of the agent simulator (which
    of the two was busy bounds the time until all acked), then both GC clocks."""
    times = simulator.cpu_times()
    assert _GC_CLOCKS is not None
    master, agents = _GC_CLOCKS
    return time.process_time(), times.user + times.system, master.value, agents.value


def _spent(since: tuple[float, ...], simulator: Any) -> tuple[float, ...]:
    return tuple(now - then for now, then in zip(_cpu(simulator), since, strict=True))


def _gc_collections(since: list[int] | None = None) -> list[int]:
    counts = [s["collections"] for s in gc.get_stats()]
    return counts if since is None else [a - b for a, b in zip(counts, since, strict=True)]


def _profiler(opts: dict[str, Any]) -> Any:
    if not opts.get("profile"):
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _dump_profile(profiler: Any, opts: dict[str, Any], kind: str, side: str = "master") -> None:
    if profiler is not None:
        profiler.disable()
        path = Path(opts["profile"]) / f"{side}-{kind}-{opts['agents']}.prof"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(path)


async def _transport_master(conn: Connection, opts: dict[str, Any]) -> None:
    """Diagnostic kind: the raw workload on NxMesh's GrpcTransport (anyio channels, no
    protocol): how much of nxmesh/raw is the transport layer rather than the protocol."""
    import anyio

    from nxmesh.tls import server_ssl_context
    from nxmesh_transport_grpc import GrpcSettings, GrpcTransport

    agents: int = opts["agents"]
    versions = _versions(opts["rounds"])
    frames = [os.urandom(_frame_size(v)) for _, v in versions]
    go = [anyio.Event() for _ in frames]
    done = [anyio.Event() for _ in frames]
    acked: list[list[float]] = [[] for _ in frames]
    all_connected = anyio.Event()
    connected = 0

    async def handler(channel: Any, peer: str) -> None:
        nonlocal connected
        await channel.receive()
        connected += 1
        if connected == agents:
            all_connected.set()
        for i, frame in enumerate(frames):
            await go[i].wait()
            await channel.send(frame)
            await channel.receive()
            acked[i].append(time.perf_counter())
            if len(acked[i]) == agents:
                done[i].set()
        await anyio.sleep_forever()

    ctx = None
    if opts["tls"]:
        ctx = server_ssl_context(_tls_files(opts["tls"]))
    scheme = "grpcs" if ctx else "grpc"
    transport = GrpcTransport(
        f"{scheme}://127.0.0.1:0", ssl_context=ctx, settings=GrpcSettings(tls=bool(ctx))
    )
    async with anyio.create_task_group() as tg:
        address = await tg.start(transport.serve, handler)
        before = _memory()
        conn.send({"address": f"{scheme}://{address}"})
        started = time.perf_counter()
        await all_connected.wait()
        connected_s = time.perf_counter() - started
        after_connect = _memory()
        simulator = await _simulator(conn)
        pushes = []
        profiler = _profiler(opts)
        for i, (label, _) in enumerate(versions):
            gc0 = _gc_collections()
            cpu0, t0 = _cpu(simulator), time.perf_counter()
            go[i].set()
            await done[i].wait()
            total, cpu = time.perf_counter() - t0, _spent(cpu0, simulator)
            pushes.append(
                _push_result(label, len(frames[i]), total, cpu, [t - t0 for t in acked[i]])
            )
            pushes[-1]["gc_collections"] = _gc_collections(gc0)
            await anyio.sleep(0.2)
        _dump_profile(profiler, opts, "transport")
        after_push = _memory()
        conn.send(
            _run_result(
                "transport", agents, connected_s, before, after_connect, after_push, pushes, {}
            )
        )
        tg.cancel_scope.cancel()


def _push_result(
    label: str,
    frame_bytes: int,
    total: float,
    cpu: tuple[float, ...],
    latencies: list[float],
) -> dict[str, Any]:
    return {
        "size": label,
        "frame_bytes": frame_bytes,  # on the wire
        "version_bytes": frame_bytes,  # uncompressed (set apart by compressing kinds)
        "all_acked_s": total,
        "master_cpu_s": cpu[0],
        "agents_cpu_s": cpu[1],
        "master_gc_s": cpu[2],
        "agents_gc_s": cpu[3],
        "p50_s": statistics.median(latencies),
        "p99_s": _percentile(latencies, 0.99),
    }


def _size_medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians over the pushes of one size (`_push_result` each)."""
    return {
        "frame_bytes": rounds[0]["frame_bytes"],
        "version_bytes": rounds[0]["version_bytes"],
        **{
            f"{key}_median_s": statistics.median(r[f"{key}_s"] for r in rounds)
            for key in (
                "all_acked",
                "master_cpu",
                "agents_cpu",
                "master_gc",
                "agents_gc",
                "p50",
                "p99",
            )
        },
        "rounds": rounds,
    }


def _run_result(
    kind: str,
    agents: int,
    connect_s: float,
    before: dict[str, float],
    after_connect: dict[str, float],
    after_push: dict[str, float],
    pushes: list[dict[str, Any]],
    counters: dict[str, int],
) -> dict[str, Any]:
    def per_agent(after: dict[str, float], key: str) -> float:
        return (after[key] - before[key]) / agents / 1024

    sizes = {label: _size_medians([p for p in pushes if p["size"] == label]) for label in SIZES}
    return {
        "kind": kind,
        "agents": agents,
        "connect_all_s": connect_s,
        "memory": {
            "rss_kb_per_agent_connected": per_agent(after_connect, "rss"),
            "pss_kb_per_agent_connected": per_agent(after_connect, "pss"),
            "rss_kb_per_agent_after_push": per_agent(after_push, "rss"),
            "pss_kb_per_agent_after_push": per_agent(after_push, "pss"),
            "rss_before_mb": before["rss"] / 2**20,
            "pss_before_mb": before["pss"] / 2**20,
            "pss_connected_mb": after_connect["pss"] / 2**20,
            "pss_after_push_mb": after_push["pss"] / 2**20,
        },
        "sizes": sizes,
        "counters": counters,
    }


# ---------------------------------------------------------------------------------------
# The agent simulator process
# ---------------------------------------------------------------------------------------


def agents_main(kind: str, conn: Connection, opts: dict[str, Any]) -> None:
    _raise_fd_limit()
    _pin(1)
    _time_gc(opts.pop("gc_clock"))
    import anyio

    anyio.run(_agents, kind, conn, opts, backend="asyncio")


# The body's keys are sorted: the digest follows the short metadata fields (author,
# created_at), the version number and workspace close the document.
_DIGEST = re.compile(rb'"digest":"([A-Za-z0-9:._-]+)"')
_VERSION = re.compile(rb'"version":(\d+),"workspace":"[^"]*"\}$')


async def _agents(kind: str, conn: Connection, opts: dict[str, Any]) -> None:
    import anyio

    from nxmesh.tls import client_ssl_context

    address: str = opts["address"]
    websocket = kind in _WEBSOCKET_KINDS
    alpn: list[str] = [] if websocket else ["h2"]
    ctx = client_ssl_context(opts["ca"], alpn=alpn) if opts["ca"] else None
    count: int = opts["agents"]
    ready = anyio.Event()
    registered = 0
    gate = anyio.Semaphore(opts.get("connect_concurrency", 200))

    def one_ready() -> None:
        nonlocal registered
        registered += 1
        if registered == count:
            ready.set()

    async with anyio.create_task_group() as tg:
        if kind in ("nxmesh", "plain", *_WEBSOCKET_KINDS):
            creds = json.loads((Path(opts["workdir"]) / "creds.json").read_text())
            for agent_id, key_id, key in creds:
                tg.start_soon(
                    _nxmesh_agent,
                    address,
                    ctx,
                    agent_id,
                    key_id,
                    base64.b64decode(key),
                    gate,
                    one_ready,
                    websocket,
                )
        else:
            for _ in range(count):
                tg.start_soon(_raw_agent, address, ctx, gate, one_ready)
        await ready.wait()
        # One heap holds every simulated agent; real agents each have their own, a few MB
        # that their collector walks in microseconds. Frozen, the connected agents stay
        # out of this heap's collections (same for every kind): otherwise a full
        # collection walks all of them, and the push it lands in takes ~0.7 s longer.
        gc.collect()
        gc.freeze()
        conn.send({"registered": registered})
        profiler = _profiler(opts)  # the pushes, and the idle time around them
        # The parent says stop. Abandoned on cancel: if a simulated agent fails, the task
        # group's cancellation must end this process (the parent then fails the run).
        await anyio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
        _dump_profile(profiler, opts, kind, "agents")
        tg.cancel_scope.cancel()


async def _nxmesh_agent(
    url: str,
    ctx: Any,
    agent_id: str,
    key_id: str,
    key: bytes,
    gate: Any,
    ready: Any,
    websocket: bool = False,
) -> None:
    from nxmesh.core.envelope import (
        MacKey,
        MessageType,
        ReplayGuard,
        SequenceSource,
        seal,
        unseal,
    )
    from nxmesh.core.protocol import (
        COMPRESSION_CAPABILITY,
        Register,
        body_bytes,
        encode_body,
        encode_received,
    )
    from nxmesh_transport_grpc import GrpcSettings, GrpcTransport

    seq = SequenceSource()
    guard = ReplayGuard()
    mac = MacKey(key)  # as `SessionCrypto` signs and verifies with the session key

    def frame(body: Any) -> bytes:
        return seal(
            body,
            agent_id=agent_id,
            key_id=key_id,
            key=mac,
            seq=seq.next(),
            ts_ms=int(time.time() * 1000),
        )

    transport: Any
    if websocket:
        from nxmesh.plugins.transport_websocket import WebSocketTransport

        transport = WebSocketTransport(ssl_context=ctx)
    else:
        transport = GrpcTransport(ssl_context=ctx, settings=GrpcSettings(tls=ctx is not None))
    async with gate:
        cm = transport.connect(url)
        channel = await cm.__aenter__()
    try:
        await channel.send(
            frame(encode_body(Register(agent_id=agent_id, capabilities=(COMPRESSION_CAPABILITY,))))
        )
        env = unseal(await channel.receive())
        env.verify(mac)
        guard.check(env)
        ready()
        while True:
            env = unseal(await channel.receive())
            env.verify(mac)  # HMAC over header + sha256(body): the whole body is hashed
            guard.check(env)
            if env.type is MessageType.CONFIG_UPDATE:
                body = body_bytes(env)  # inflated when the master compressed it
                digest = _DIGEST.search(body, 0, 1024)
                version = _VERSION.search(body, len(body) - 200)
                assert digest is not None
                assert version is not None
                # What `AgentLink` sends: the `received` ConfigStatus, validated and
                # encoded by `encode_received` (byte-equal to encoding the message).
                ack = encode_received(int(version.group(1)), digest.group(1).decode())
                await channel.send(frame(ack))
    finally:
        await cm.__aexit__(None, None, None)


async def _raw_agent(url: str, ctx: Any, gate: Any, ready: Any) -> None:
    from urllib.parse import urlsplit

    from grpclib.client import Channel

    from nxmesh_transport_grpc._generated.agent_grpc import AgentServiceStub
    from nxmesh_transport_grpc._generated.agent_pb2 import Frame

    parts = urlsplit(url)
    reply = Frame(data=os.urandom(160))  # about the size of a signed ConfigStatus frame
    async with gate:
        channel = Channel(parts.hostname, parts.port, ssl=ctx)
        await channel.__connect__()
    try:
        stub = AgentServiceStub(channel)
        async with stub.Stream.open() as stream:
            await stream.send_message(Frame(data=b"hello"))
            ready()
            while await stream.recv_message() is not None:
                await stream.send_message(reply)
    finally:
        channel.close()


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


def run_one(
    kind: str, agents: int, rounds: int, tls: dict[str, str] | None, profile: Path | None = None
) -> dict[str, Any]:
    """One fresh master process and one fresh agent-simulator process."""
    ctx = mp.get_context("spawn")
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108 - a RAM disk
    workdir = Path(tempfile.mkdtemp(prefix="nxmesh-fanout-", dir=base))
    procs: list[Any] = []
    load_before = os.getloadavg()
    try:
        master_end, master_child = ctx.Pipe()
        gc_clocks = (ctx.Value("d", 0.0, lock=False), ctx.Value("d", 0.0, lock=False))
        opts = {
            "gc_clocks": gc_clocks,
            "agents": agents,
            "rounds": rounds,
            "tls": tls,
            "workdir": str(workdir),
            "profile": str(profile) if profile else None,
        }
        master = ctx.Process(target=master_main, args=(kind, master_child, opts), daemon=True)
        master.start()
        procs.append(master)
        address = _recv(master_end, master, 600)["address"]
        agents_end, agents_child = ctx.Pipe()
        sim_opts = {
            "gc_clock": gc_clocks[1],
            "agents": agents,
            "address": address,
            "workdir": str(workdir),
            "ca": tls["ca_cert"] if tls else None,
            "profile": str(profile) if profile else None,
        }
        sim = ctx.Process(target=agents_main, args=(kind, agents_child, sim_opts), daemon=True)
        sim.start()
        procs.append(sim)
        _recv(agents_end, sim, 900)  # every agent registered, the simulator's heap frozen
        master_end.send({"simulator_pid": sim.pid})
        result: dict[str, Any] = _recv(master_end, master, 1800, also=sim)
        result["load_average_before"] = load_before
        result["load_average_after"] = os.getloadavg()
        agents_end.send("stop")
        for proc in (sim, master):
            proc.join(30)
        if master.exitcode != 0:  # it failed after reporting: its figures are suspect
            raise RuntimeError(f"the {kind} master exited with code {master.exitcode}")
        return result
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        shutil.rmtree(workdir, ignore_errors=True)


def _recv(end: Connection, proc: Any, timeout: float, also: Any = None) -> Any:
    """The next message from `proc`; fails when it (or `also`, the other side) died."""
    deadline = time.monotonic() + timeout
    while not end.poll(1.0):
        for p in (proc, also):
            if p is not None and not p.is_alive():
                raise RuntimeError(f"benchmark process exited with code {p.exitcode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("benchmark process did not answer in time")
    return end.recv()


def _pool(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from several of the same kind: rounds pooled, memory and connect medians."""
    if len(parts) == 1:
        return parts[0]
    run = dict(parts[0])
    run["repeats"] = len(parts)
    run["connect_all_s"] = statistics.median(p["connect_all_s"] for p in parts)
    run["memory"] = {
        key: statistics.median(p["memory"][key] for p in parts) for key in parts[0]["memory"]
    }
    run["load_average_before"] = [p["load_average_before"] for p in parts]
    run["load_average_after"] = [p["load_average_after"] for p in parts]
    run["sizes"] = {
        label: _size_medians([r for p in parts for r in p["sizes"][label]["rounds"]])
        for label in SIZES
    }
    return run


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["kind"], r["agents"]): r for r in runs}
    summary = _summarize_kind(by, "nxmesh")
    for other in ("ws", "wsapi", "plain"):
        if any(kind == other for kind, _ in by):
            part = _summarize_kind(by, other)
            summary[f"ratios_{other}_over_raw"] = part["ratios_nxmesh_over_raw"]
            summary[f"goals_{other}"] = part["goals"]
    return summary


def _summarize_kind(by: dict[tuple[str, int], dict[str, Any]], which: str) -> dict[str, Any]:
    """Ratios `which`/raw per agent count and size, and the goals at `GOAL_AGENTS`."""
    ratios: dict[str, Any] = {}
    for (kind, agents), run in by.items():
        raw = by.get(("raw", agents))
        if kind != which or raw is None:
            continue
        ratios[str(agents)] = {
            label: {
                "all_acked": run["sizes"][label]["all_acked_median_s"]
                / raw["sizes"][label]["all_acked_median_s"],
                "p99": run["sizes"][label]["p99_median_s"] / raw["sizes"][label]["p99_median_s"],
                "master_cpu": run["sizes"][label]["master_cpu_median_s"]
                / raw["sizes"][label]["master_cpu_median_s"],
                # psutil counts the other process's CPU in clock ticks (10 ms): a quick
                # run's pushes may read 0.
                "agents_cpu": run["sizes"][label]["agents_cpu_median_s"]
                / raw["sizes"][label]["agents_cpu_median_s"]
                if raw["sizes"][label]["agents_cpu_median_s"] > 0
                else None,
            }
            for label in SIZES
        }
        ratios[str(agents)]["memory_connected_pss"] = run["memory"][
            "pss_kb_per_agent_connected"
        ] / max(raw["memory"]["pss_kb_per_agent_connected"], 1e-9)
    goal_run = by.get((which, GOAL_AGENTS))
    goals: dict[str, Any] = {}
    if goal_run is not None and str(GOAL_AGENTS) in ratios:
        worst = max(ratios[str(GOAL_AGENTS)][label]["all_acked"] for label in SIZES)
        goals["ratio_5000_all_acked_worst"] = worst
        goals["ratio_goal_met"] = worst <= GOAL_RATIO
    if goal_run is not None:
        kb = max(
            goal_run["memory"]["pss_kb_per_agent_connected"],
            goal_run["memory"]["rss_kb_per_agent_connected"],
        )
        goals["kb_per_agent_5000"] = kb
        goals["memory_goal_met"] = kb <= GOAL_KB_PER_AGENT
    return {"ratios_nxmesh_over_raw": ratios, "goals": goals}


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def print_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print(
        f"{'kind':7} {'agents':>6} {'size':>5} {'all acked':>10} {'p50':>8} {'p99':>8} "
        f"{'master CPU':>10} {'agents CPU':>10} {'GC m/a':>11} {'KB/agent (PSS)':>15}"
    )
    for run in runs:
        for label in SIZES:
            s = run["sizes"][label]
            print(
                f"{run['kind']:7} {run['agents']:>6} {label:>5} {s['all_acked_median_s']:>9.3f}s "
                f"{s['p50_median_s']:>7.3f}s {s['p99_median_s']:>7.3f}s "
                f"{s['master_cpu_median_s']:>9.3f}s {s['agents_cpu_median_s']:>9.3f}s "
                f"{s['master_gc_median_s']:>5.2f}/{s['agents_gc_median_s']:<4.2f}s "
                f"{run['memory']['pss_kb_per_agent_connected']:>15.1f}"
            )
    for kind in ("nxmesh", "plain", "ws", "wsapi"):
        for agents, ratio in summary.get(f"ratios_{kind}_over_raw", {}).items():
            shown = ", ".join(
                f"{label} {ratio[label]['all_acked']:.2f}x (CPU: master "
                f"{ratio[label]['master_cpu']:.2f}x, agents {_times(ratio[label]['agents_cpu'])})"
                for label in SIZES
            )
            print(
                f"{kind}/raw at {agents} agents: all acked {shown}; "
                f"memory {ratio['memory_connected_pss']:.2f}x"
            )
    if summary["goals"]:
        print("goals:", json.dumps(summary["goals"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--agents", default="1000,5000", help="comma-separated agent counts (default: 1000,5000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="pushes per size and run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate nxmesh and raw runs this many times (fresh processes "
        "each) and pool their rounds: drift in machine load hits both kinds",
    )
    parser.add_argument(
        "--kinds",
        default="nxmesh,raw",
        help="nxmesh, raw, ws (the master on the WebSocket transport's server), wsapi "
        "(WebSocket on the master's API listener, hypercorn), and the "
        "diagnostics 'plain' (nxmesh with versions sent uncompressed) and 'transport' "
        "(raw workload on NxMesh's GrpcTransport, no protocol)",
    )
    parser.add_argument("--plaintext", action="store_true", help="no TLS (default: TLS)")
    parser.add_argument("--quick", action="store_true", help="50 agents, one round")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write cProfile stats of each master's pushes (and of the agent simulator "
        "from its last connection on) into this directory",
    )
    args = parser.parse_args(argv)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    counts = [50] if args.quick else [int(n) for n in args.agents.split(",")]
    rounds = 1 if args.quick else args.rounds
    kinds = args.kinds.split(",")

    from nxmesh.tls import ensure_tls_material

    tls_dir = Path(tempfile.mkdtemp(prefix="nxmesh-fanout-tls-"))
    try:
        tls = None
        if not args.plaintext:
            files = ensure_tls_material(tls_dir)
            tls = {"ca_cert": str(files.ca_cert), "cert": str(files.cert), "key": str(files.key)}
        runs: list[dict[str, Any]] = []
        for agents in counts:
            pooled: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
            for attempt in range(1 if args.quick else args.repeat):
                for kind in kinds:
                    print(
                        f"running {kind} with {agents} agents ({attempt + 1})...",
                        file=sys.stderr,
                        flush=True,
                    )
                    pooled[kind].append(run_one(kind, agents, rounds, tls, args.profile))
            runs.extend(_pool(parts) for parts in pooled.values())
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)
    summary = summarize(runs)
    report = {
        "benchmark": "fanout",
        "started_at": started_at,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": load_at_start,
        },
        "config": {
            "tls": not args.plaintext,
            "rounds": rounds,
            "sizes": SIZES,
            "quick": args.quick,
        },
        "runs": runs,
        **summary,
        "goals_target": {"ratio_at_5000": GOAL_RATIO, "kb_per_agent": GOAL_KB_PER_AGENT},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(runs, summary)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
