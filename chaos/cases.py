"""The chaos cases: each breaks one real thing on loopback and checks what must hold.

Every case returns a `CaseResult` made of explicit `Check`s (what must hold, whether it
did, the evidence); the case passes when every check passed, nothing raised, and it
finished within its time bound. Every wait is bounded. Every case restores what it
touched (processes killed, PostgreSQL started again, sockets closed) in ``finally``.

Cases and what "nothing lost" means for each:

``wrk_applies``        wrk during 30 applies. ``Connection: close``: 0 failed requests;
                       keep-alive: no more read errors per reload than nginx's own graceful
                       reload (the raw HUP baseline) costs; the control run *restarts*
                       nginx instead and must show errors (else the harness is blind).
``master_kill``        ``kill -9`` the master while a rollout is half done (half the
                       agents frozen with SIGSTOP); after a restart the rollout completes
                       on every agent, the version is still there, no agent re-enrolled.
``agent_kill_stages``  ``kill -9`` the agent at each apply stage (the driver's
                       ``NXMESH_TEST_PAUSE_AT`` checkpoints): the live tree is one whole
                       release (the old one before the swap), nginx serves the old or the
                       new body, and the restarted agent recovers (no journal, staging or
                       temp link left) and converges on the version the master resends.
``nginx_kill``         ``kill -9`` nginx (master and workers): the watchdog restarts it
                       and it serves the same configuration again.
``postgres_restart``   stop PostgreSQL under a master: ``/readyz`` says not ready, writes
                       are refused (not acknowledged and dropped), agents keep serving;
                       after a restart the master is ready again, every acknowledged
                       version is still there and a new one converges.
``burst``              100 versions in 10 s: every one stored, the agents end on the newest,
                       with far fewer reloads than versions (coalescing).
``clock_skew``         an agent whose clock is 10 minutes off: registration refused with an
                       error naming the clock skew (agent log and master log), the agent
                       keeps serving its cache, and once the clock is right it converges
                       on what was stored meanwhile (a skewed enrollment does not use up its
                       bootstrap token).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import psutil
from bench.common import e2e_harness, fleet, harness_failure

from nxmesh.core.model import Listener, Site
from nxmesh.core.serialization import unstructure
from nxmesh.plugins.nginx_driver import DriverSettings

T = TypeVar("T")

CHAOS_DIR = Path(__file__).resolve().parent
SKEWED_AGENT = CHAOS_DIR / "skewed_agent.py"


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass
class Check:
    """One pass/fail criterion and its evidence."""

    what: str
    ok: bool
    detail: str = ""


@dataclass
class CaseResult:
    name: str
    title: str
    bound_s: float
    quick: bool = False
    started_at: str = ""
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def check(self, what: str, ok: object, detail: object = "") -> bool:
        """Record a criterion; `ok` is judged by truthiness (a found value counts)."""
        self.checks.append(Check(what, bool(ok), str(detail)))
        return bool(ok)

    @property
    def within_bound(self) -> bool:
        return self.seconds <= self.bound_s

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and bool(self.checks)
            and all(c.ok for c in self.checks)
            and self.within_bound
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "within_bound": self.within_bound}


@dataclass
class Context:
    """What every case gets: mode, binaries, a scratch directory, fleet sharing."""

    quick: bool
    nginx: str
    workdir: Path
    wrk: str | None = None
    postgres: str = "private"
    """``private``: a throwaway cluster (initdb) on its own port; ``shared``: the system
    cluster on 127.0.0.1:5432, stopped and started with pg_ctlcluster."""
    shared_fleet: Any = None
    """Quick mode: one fleet (master + 2 agents) reused by the cases that need one."""


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def wait_until(probe: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T | None:
    """Poll `probe` until it returns something truthy (returned) or `timeout` passes
    (None). Connection errors count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except (httpx.HTTPError, OSError, harness_failure()):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def _online(master: Any, agent_id: str) -> bool:
    return any(a["id"] == agent_id and a["status"] == "online" for a in master.agents())


def _log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def agent_metric(agent: Any, name: str, **labels: str) -> float:
    """One sample of the agent's Prometheus endpoint (0 when absent)."""
    text = httpx.get(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == key:
            return float(value)
    return 0.0


def restart_agent(
    agent: Any, *, env: dict[str, str] | None = None, args: list[str] | None = None
) -> None:
    """``kill -9`` the agent (its nginx keeps running) and start it again, with extra
    environment / another command line for this start only."""
    agent.kill()
    base = dict(agent.process.env)
    try:
        agent.process.env = {**base, **(env or {})}
        if args is None:
            agent.start()
        else:
            agent.process.args = args
            agent.process.start()
    finally:
        agent.process.env = base


def release_state(conf_dir: Path) -> dict[str, Any]:
    """The live release under `conf_dir`: its name, whether its files hash to the digest
    it is named after (whole), and any in-flight leftovers (journal, staging, temp link)."""
    from nxmesh.agent.fsutil import read_tree
    from nxmesh.core.bundle import bundle_digest
    from nxmesh.plugins.nginx_driver import ReleaseStore

    store = ReleaseStore(conf_dir)
    name = store.current_name()
    whole = False
    if name is not None:
        try:
            whole = bundle_digest(read_tree(conf_dir / "current")) == store.digest_of(name)
        except OSError:
            whole = False
    leftovers = [
        str(p.relative_to(conf_dir))
        for p in [
            *([conf_dir / "apply.journal"] if (conf_dir / "apply.journal").exists() else []),
            *(conf_dir / "releases").glob(".staging-*"),
            *conf_dir.glob(".current.tmp-*"),
        ]
    ]
    return {"current": name, "whole": whole, "leftovers": leftovers}


def fleet_healthy(the_fleet: Any) -> bool:
    master = the_fleet.master
    if not master.process.alive() or not all(a.process.alive() for a in the_fleet.agents):
        return False
    try:
        online = [a for a in master.agents() if a["status"] == "online"]
    except (httpx.HTTPError, OSError, harness_failure()):
        return False
    return len(online) == len(the_fleet.agents)


@contextlib.contextmanager
def fleet_for(ctx: Context, name: str, agents: int, **kwargs: Any) -> Iterator[Any]:
    """The quick run's shared fleet when it fits and is healthy, else a fresh one."""
    shared = ctx.shared_fleet
    fits = shared is not None and not kwargs and len(shared.agents) == agents
    if fits and fleet_healthy(shared):
        yield shared
        return
    with fleet(
        ctx.workdir / f"{name}-{time.monotonic_ns()}", ctx.nginx, agents=agents, **kwargs
    ) as fresh:
        yield fresh


def _put(the_fleet: Any, body: str) -> int:
    h = e2e_harness()
    number: int = the_fleet.master.put_state(h.site_state(the_fleet.web_port, body), body)["number"]
    return number


def _converged(master: Any, number: int, agents: int) -> dict[str, Any] | None:
    view: dict[str, Any] = master.rollout(number)
    ok = view["converged"] and len(view["agents"]) == agents
    return view if ok else None


def _serves_and_converged(the_fleet: Any, agent: Any, body: str, number: int) -> bool:
    return agent.body(the_fleet.web_port) == body and bool(
        _converged(the_fleet.master, number, len(the_fleet.agents))
    )


def _restarted(the_fleet: Any, agent: Any, old_pid: int, body: str) -> bool:
    return agent.nginx_pid() not in (None, old_pid) and agent.body(the_fleet.web_port) == body


def ensure_serving(the_fleet: Any) -> str:
    """The body every agent serves; a fresh fleet first gets a version (bounded wait)."""
    bodies = set(_bodies(the_fleet).values())
    if len(bodies) == 1 and None not in bodies:
        return str(bodies.pop())
    body = f"baseline-{time.monotonic_ns()}"
    number = _put(the_fleet, body)
    wait_until(
        functools.partial(_converged, the_fleet.master, number, len(the_fleet.agents)), 30, 0.1
    )
    wait_until(lambda: all(a.body(the_fleet.web_port) == body for a in the_fleet.agents), 30)
    return body


def _bodies(the_fleet: Any) -> dict[str, str | None]:
    return {a.name: a.body(the_fleet.web_port) for a in the_fleet.agents}


# ---------------------------------------------------------------------------------------
# wrk during applies
# ---------------------------------------------------------------------------------------


def wrk_applies(ctx: Context) -> CaseResult:
    """wrk during 30 applies (keep-alive and Connection: close) + the restart control."""
    import anyio
    from bench.agent_reliability import traffic

    applies = 3 if ctx.quick else 30
    result = CaseResult(
        "wrk_applies",
        f"wrk during {applies} applies; restart control",
        bound_s=120 if ctx.quick else 600,
    )
    if ctx.wrk is None:
        result.error = "wrk not found (apt-get install wrk)"
        return result
    workdir = Path(tempfile.mkdtemp(prefix="wrk-", dir=ctx.workdir))
    data = anyio.run(traffic, ctx.nginx, ctx.wrk, applies, workdir)
    result.details = data
    # Three reloads (the quick mode, inside the test suite) are too few to compare read
    # errors with nginx's own reloads: there the comparison is reported, not judged.
    judge_wrk(result, data, judge_keepalive=not ctx.quick)
    return result


def judge_wrk(result: CaseResult, data: dict[str, Any], *, judge_keepalive: bool = True) -> None:
    """The pass/fail logic of `wrk_applies` (separate so tests can feed it numbers)."""
    close = data["agent/close"]
    result.check(
        "Connection: close during agent applies: 0 failed requests",
        close["errors"] == 0 and close["requests"] > 0,
        f"{close['errors']} errors in {close['requests']} requests",
    )
    applies = max(1, int(data["applies"]))
    agent_ka = data["agent/keepalive"]["read"] / applies
    raw_ka = data["raw/keepalive"]["read"] / applies
    # A graceful reload closes idle keep-alive connections whoever sends the HUP; the
    # agent must not lose more than nginx's own reload does (+25 %, +2 for noise).
    keepalive = f"agent {agent_ka:.1f}/reload, raw nginx -s reload {raw_ka:.1f}/reload"
    if judge_keepalive:
        result.check(
            "keep-alive: read errors per reload at most the raw HUP baseline's",
            agent_ka <= raw_ka * 1.25 + 2,
            keepalive,
        )
    else:
        result.details["keepalive_reported_not_judged"] = keepalive
    control = data["restart/close"]
    result.check(
        "control: restarting nginx instead of reloading loses requests (the harness sees loss)",
        control["errors"] > 0,
        f"{control['errors']} errors in {control['requests']} requests",
    )


# ---------------------------------------------------------------------------------------
# kill -9 the master mid-rollout
# ---------------------------------------------------------------------------------------


def master_kill(ctx: Context) -> CaseResult:
    agents = 2 if ctx.quick else 4
    result = CaseResult(
        "master_kill",
        f"kill -9 the master mid-rollout ({agents} agents)",
        bound_s=90 if ctx.quick else 180,
    )
    with fleet_for(ctx, "master-kill", agents) as f:
        m = f.master
        ids_before = sorted(a["id"] for a in m.agents())
        frozen = f.agents[agents // 2 :]
        body = f"mid-rollout-{time.monotonic_ns()}"
        try:
            for agent in frozen:  # these cannot take the push: the rollout stays half done
                os.kill(agent.process.proc.pid, signal.SIGSTOP)
            number = _put(f, body)
            live = f.agents[: agents // 2]
            done = wait_until(lambda: all(a.body(f.web_port) == body for a in live), 30)
            bodies = _bodies(f)
            result.check(
                "mid-rollout when killed: the running agents serve the new version, "
                "the frozen ones not yet",
                done and all(bodies[a.name] != body for a in frozen),
                bodies,
            )
            m.kill9()
            result.details["killed_at_version"] = number
        finally:
            for agent in frozen:
                with contextlib.suppress(ProcessLookupError, AttributeError):
                    os.kill(agent.process.proc.pid, signal.SIGCONT)
        restarted = time.monotonic()
        m.start()
        view = wait_until(lambda: _converged(m, number, agents), 60, 0.2)
        result.details["converged_after_restart_s"] = round(time.monotonic() - restarted, 2)
        result.check(
            "after the restart the rollout completes on every agent (master's view)",
            view is not None,
            f"{result.details['converged_after_restart_s']} s after the restart",
        )
        served = wait_until(lambda: all(a.body(f.web_port) == body for a in f.agents), 30)
        result.check("every nginx serves the new version", served, _bodies(f))
        versions = m.api("GET", "/workspaces/default/versions", params={"limit": 1000})
        result.check(
            "the version is still stored",
            any(v["number"] == number for v in versions),
            f"version {number}",
        )
        back = wait_until(lambda: all(_online(m, a.agent_id) for a in f.agents), 30)
        ids_after = sorted(a["id"] for a in m.agents())
        result.check(
            "every agent is back online under its own id (none re-enrolled)",
            back and ids_after == ids_before,
            f"{len(ids_after)} agents",
        )
    return result


# ---------------------------------------------------------------------------------------
# kill -9 the agent at each apply stage
# ---------------------------------------------------------------------------------------


def agent_kill_stages(ctx: Context) -> CaseResult:
    from nxmesh.plugins.nginx_driver import ENV_PAUSE_AT, ENV_PAUSE_FILE, STAGES

    stages = ["swapped"] if ctx.quick else list(STAGES)
    where = "one apply stage" if ctx.quick else "each apply stage"
    result = CaseResult(
        "agent_kill_stages", f"kill -9 the agent at {where}", bound_s=90 if ctx.quick else 600
    )
    h = e2e_harness()
    with fleet_for(ctx, "agent-kill", 2) as f:
        m, agent = f.master, f.agents[0]
        others = f.agents[1:]
        per_stage: dict[str, Any] = {}
        for stage in stages:
            old = ensure_serving(f)
            before = release_state(agent.conf_dir)
            marker = agent.root / f"paused-{stage}-{time.monotonic_ns()}"
            restart_agent(agent, env={ENV_PAUSE_AT: stage, ENV_PAUSE_FILE: str(marker)})
            wait_until(lambda: _online(m, agent.agent_id), 30)
            blocker: socket.socket | None = None
            body = f"{stage}-{time.monotonic_ns()}"
            if stage == "rolled-back":
                # A version nginx -t accepts but this agent's nginx cannot load (its port
                # is taken on the agent's address): the reload fails, the driver flips
                # back, and pauses after the flip.
                blocker = socket.socket()
                blocker.bind((agent.address, 0))
                blocker.listen()
                state = h.site_state(f.web_port, body)
                clash = Site(
                    name="clash",
                    server_names=("clash.test",),
                    listeners=(Listener(port=blocker.getsockname()[1]),),
                    locations=state.sites[0].locations,
                )
                state = attrs.evolve(state, sites=(*state.sites, clash))
                number = m.put_state(state, body)["number"]
            else:
                number = _put(f, body)
            try:
                paused = wait_until(marker.exists, 30, 0.02)
                agent.kill()
                after_kill = release_state(agent.conf_dir)
                served = agent.body(f.web_port)
                row: dict[str, Any] = {
                    "paused": bool(paused),
                    "after_kill": after_kill,
                    "served_after_kill": served,
                }
                expect_old = stage in ("staged", "tested", "swap-prepared", "rolled-back")
                ok_tree = after_kill["whole"] and (
                    after_kill["current"] == before["current"] if expect_old else True
                )
                ok_body = served == old if stage == "rolled-back" else served in (old, body)
                result.check(
                    f"{stage}: paused there, then the live tree is one whole release"
                    + (" (the old one)" if expect_old else ""),
                    paused and ok_tree,
                    after_kill,
                )
                result.check(
                    f"{stage}: nginx serves the old or the new body, nothing else",
                    ok_body,
                    f"{served!r} (old {old!r}, new {body!r})",
                )
                agent.start()  # no pause: recover, boot from the cache, reconnect
                if stage == "rolled-back":
                    online = wait_until(lambda: _online(m, agent.agent_id), 30)
                    time.sleep(2.0)  # a resent refused version would be retried by now
                    final = agent.body(f.web_port)
                    mine = [
                        a for a in m.rollout(number)["agents"] if a["agent_id"] == agent.agent_id
                    ]
                    reason = mine[0]["reason"] if mine else None
                    row["reason_after_restart"] = reason
                    result.check(
                        f"{stage}: after restart the old body still serves and the "
                        "master does not count the refused version as current",
                        online and final == old and reason != "current",
                        f"{final!r}, master says {reason!r}",
                    )
                    if blocker is not None:
                        blocker.close()
                    blocker = None
                    good = _put(f, f"{stage}-good-{time.monotonic_ns()}")  # next "old"
                    wait_until(functools.partial(_converged, m, good, len(f.agents)), 45, 0.2)
                else:
                    done = wait_until(
                        functools.partial(_serves_and_converged, f, agent, body, number), 45, 0.2
                    )
                    result.check(
                        f"{stage}: the restarted agent recovers and converges on "
                        "the version the master resends",
                        done,
                        agent.body(f.web_port),
                    )
                clean = wait_until(
                    lambda: (
                        not release_state(agent.conf_dir)["leftovers"]
                        and release_state(agent.conf_dir)["whole"]
                    ),
                    30,
                )
                end = release_state(agent.conf_dir)
                result.check(
                    f"{stage}: no journal, staging tree or temp link left; tree whole", clean, end
                )
                row["end"] = end
                per_stage[stage] = row
            finally:
                if blocker is not None:
                    blocker.close()
                if not agent.process.alive():
                    agent.start()
        # Leave the fleet converged for whoever comes next.
        wait_until(lambda: all(_online(m, a.agent_id) for a in [agent, *others]), 30)
        result.details["stages"] = per_stage
    return result


# ---------------------------------------------------------------------------------------
# kill nginx
# ---------------------------------------------------------------------------------------


def nginx_kill(ctx: Context) -> CaseResult:
    kills = 1 if ctx.quick else 3
    result = CaseResult(
        "nginx_kill",
        f"kill -9 nginx {kills}x: the watchdog restarts it",
        bound_s=60 if ctx.quick else 180,
    )
    with fleet_for(ctx, "nginx-kill", 2) as f:
        agent = f.agents[0]
        body = ensure_serving(f)
        downtimes = []
        for i in range(kills):
            pid = agent.nginx_pid()
            if not result.check(f"kill {i + 1}: nginx runs before the kill", pid, pid):
                break
            victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            for proc in victims:  # master and workers: nothing left holding the port
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            killed = time.monotonic()
            psutil.wait_procs(victims, timeout=5)
            back = wait_until(functools.partial(_restarted, f, agent, pid, body), 30, 0.05)
            downtimes.append(round(time.monotonic() - killed, 2))
            result.check(
                f"kill {i + 1}: nginx restarted by the agent, serving the same body",
                back,
                f"after {downtimes[-1]} s (new pid {agent.nginx_pid()})",
            )
        log = _log(agent.process.log)
        result.check(
            "the agent recorded nginx.died and nginx.restarted events",
            "nginx.died" in log and "nginx.restarted" in log,
        )
        result.check("the agent process itself kept running", agent.process.alive())
        result.details["downtime_s"] = downtimes
    return result


# ---------------------------------------------------------------------------------------
# PostgreSQL stopped and restarted under a master
# ---------------------------------------------------------------------------------------


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb as the postgres user) on its own port."""

    def __init__(self, root: Path) -> None:
        from nxmesh.testing.nginx import free_port

        self.root = root
        self.port = free_port()
        self.bin = _pg_bin()
        self.data = root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return _run([*prefix, *args])

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "postgres.log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
        )

    def running(self) -> bool:
        return (
            _run(
                ["pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q"], check=False
            ).returncode
            == 0
        )

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            if self.running():
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class SharedPostgres:
    """The system cluster on 127.0.0.1:5432 (``pg_ctlcluster``), a fresh database in it."""

    def __init__(self) -> None:
        import secrets

        self.version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
        self.database = f"nxmesh_chaos_{secrets.token_hex(6)}"
        self.url = f"postgresql://postgres@127.0.0.1:5432/{self.database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=5
        ) as conn:
            conn.execute(sql.encode())

    def create(self) -> None:
        self._admin(f'CREATE DATABASE "{self.database}"')

    def start(self) -> None:
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, "main", "start"])

    def stop(self) -> None:
        _run(
            [
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                self.version,
                "main",
                "stop",
                "-m",
                "fast",
            ]
        )

    def running(self) -> bool:
        return (
            _run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False).returncode == 0
        )

    def destroy(self) -> None:
        if not self.running():
            self.start()
        wait_until(self.running, 30)
        with contextlib.suppress(Exception):
            self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def _run(command: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one of PostgreSQL's fixed admin commands (bounded, output captured)."""
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)  # noqa: S603


def _pg_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not versions:
        raise FileNotFoundError("PostgreSQL server binaries not found under /usr/lib/postgresql")
    return versions[-1]


def _readyz(master: Any) -> int | None:
    try:
        return httpx.get(f"{master.url}/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def postgres_restart(ctx: Context) -> CaseResult:
    agents = 1 if ctx.quick else 2
    result = CaseResult(
        "postgres_restart",
        f"stop and restart PostgreSQL ({ctx.postgres} cluster) under a master",
        bound_s=120 if ctx.quick else 240,
    )
    pg: PrivatePostgres | SharedPostgres
    if ctx.postgres == "shared":
        pg = SharedPostgres()
    else:
        # Outside the (0700) scratch directory: the postgres user must reach it.
        pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="nxmesh-chaos-pg-")))
    h = e2e_harness()
    try:
        pg.create()
        with fleet_for(ctx, "postgres", agents, storage_url=pg.url, event_bus_url=pg.url) as f:
            m = f.master
            acknowledged = [_put(f, "pg-before")]
            wait_until(lambda: _converged(m, acknowledged[-1], agents), 30)
            stopped = time.monotonic()
            pg.stop()
            not_ready = wait_until(lambda: _readyz(m) == 503, 30)
            result.details["not_ready_after_s"] = round(time.monotonic() - stopped, 2)
            result.check(
                "the master reports not ready (/readyz 503) while PostgreSQL is down",
                not_ready,
                f"{result.details['not_ready_after_s']} s after the stop",
            )
            # A write while the database is down: refused with an error, or — if the API
            # acknowledged it — it must survive (checked below).
            try:
                response = httpx.put(
                    f"{m.url}/api/v1/workspaces/default/state",
                    json=unstructure(h.site_state(f.web_port, "pg-during")),
                    params={"message": "pg-during"},
                    headers={"Authorization": f"Bearer {m._token}"},
                    timeout=30,
                )
                during: int | str = response.status_code
                if response.status_code < 300:
                    acknowledged.append(response.json()["version"]["number"])
            except httpx.HTTPError as exc:
                during = f"no answer ({type(exc).__name__})"
            result.details["write_while_down"] = during
            result.check(
                "a write while PostgreSQL is down is refused (not acknowledged and lost)",
                not isinstance(during, int) or during >= 500 or len(acknowledged) == 2,
                during,
            )
            serving = all(a.body(f.web_port) == "pg-before" for a in f.agents)
            result.check("agents keep serving while PostgreSQL is down", serving, _bodies(f))
            result.check("the master process keeps running", m.process.alive())
            pg.start()
            restarted = time.monotonic()
            ready = wait_until(lambda: _readyz(m) == 200, 60)
            result.details["ready_after_restart_s"] = round(time.monotonic() - restarted, 2)
            result.check(
                "after PostgreSQL is back the master is ready again",
                ready,
                f"{result.details['ready_after_restart_s']} s after the start",
            )
            number = wait_until(lambda: _put(f, "pg-after"), 30, 1.0)
            acknowledged.append(number or -1)
            view = number and wait_until(lambda: _converged(m, number, agents), 45, 0.2)
            result.check(
                "a version stored after the restart converges on every agent",
                view,
                f"version {number}",
            )
            stored = {
                v["number"]
                for v in m.api("GET", "/workspaces/default/versions", params={"limit": 1000})
            }
            result.check(
                "every acknowledged version is still stored",
                set(acknowledged) <= stored,
                f"{acknowledged} in {sorted(stored)}",
            )
    finally:
        if not pg.running():
            with contextlib.suppress(subprocess.CalledProcessError):
                pg.start()
        result.check("PostgreSQL is running again at the end", wait_until(pg.running, 30))
        pg.destroy()
    return result


# ---------------------------------------------------------------------------------------
# A burst of versions
# ---------------------------------------------------------------------------------------


def burst(ctx: Context) -> CaseResult:
    versions, seconds = (20, 2.0) if ctx.quick else (100, 10.0)
    result = CaseResult(
        "burst",
        f"{versions} versions in {seconds:.0f} s (coalescing)",
        bound_s=90 if ctx.quick else 180,
    )
    with fleet_for(ctx, "burst", 2) as f:
        m = f.master
        reloads_before = [
            agent_metric(a, "nxmesh_agent_reloads_total", result="ok") for a in f.agents
        ]
        numbers: list[int] = []
        started = time.monotonic()
        stamp = time.monotonic_ns()
        for i in range(versions):
            numbers.append(_put(f, f"burst-{stamp}-{i}"))
            pause = started + (i + 1) * seconds / versions - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        took = time.monotonic() - started
        result.details["burst_s"] = round(took, 2)
        # The quick mode runs inside the test suite on machines of any speed: there, a
        # burst that could not be sent in time is reported, not judged (coalescing can
        # only be judged on a real burst); the full run judges both.
        judge_timing = not ctx.quick or took <= seconds * 1.5
        result.check(
            f"{versions} versions stored (distinct numbers)",
            len(set(numbers)) == versions,
            f"versions {numbers[0]}..{numbers[-1]}",
        )
        if judge_timing:
            result.check(
                f"{versions} versions stored in about {seconds:.0f} s",
                took <= seconds * 1.5,
                f"{took:.1f} s",
            )
        newest = f"burst-{stamp}-{versions - 1}"
        served = wait_until(lambda: all(a.body(f.web_port) == newest for a in f.agents), 30)
        result.check("every agent ends on the newest version", served, _bodies(f))
        view = wait_until(lambda: _converged(m, numbers[-1], len(f.agents)), 30)
        result.check("the master sees the newest version converged", view)
        stored = {
            v["number"]
            for v in m.api("GET", "/workspaces/default/versions", params={"limit": 1000})
        }
        result.check(
            "every version of the burst is kept",
            set(numbers) <= stored,
            f"{len(set(numbers) & stored)}/{versions}",
        )
        time.sleep(1.0)
        reloads = [
            agent_metric(a, "nxmesh_agent_reloads_total", result="ok") - before
            for a, before in zip(f.agents, reloads_before, strict=True)
        ]
        result.details["reloads_per_agent"] = reloads
        if judge_timing:
            # Coalescing allows one reload per `min_reload_interval` of the burst, and the
            # last one after it: 5 for a 2 s quick burst, 7 for one a slow machine
            # stretched to 2.9 s (a fixed 5 failed it); the full run keeps 25 of 100.
            interval = DriverSettings().min_reload_interval
            limit = math.ceil(took / interval) + 1
            if not ctx.quick:
                limit = min(limit, versions // 4)
            result.check(
                f"far fewer reloads than versions (<= {limit} of {versions} on each agent, "
                f"one per {interval} s of the {took:.1f} s burst)",
                all(0 < r <= limit for r in reloads),
                reloads,
            )
    return result


# ---------------------------------------------------------------------------------------
# An agent whose clock is 10 minutes off
# ---------------------------------------------------------------------------------------

_SKEW_MESSAGE = re.compile(r"(\d+) s (ahead of|behind) this clock")


def _skewed_args(agent: Any, *extra: str) -> list[str]:
    return [sys.executable, str(SKEWED_AGENT), "--config", str(agent.config), "agent", *extra]


def clock_skew(ctx: Context) -> CaseResult:
    offsets = [600.0] if ctx.quick else [600.0, -600.0]
    result = CaseResult(
        "clock_skew", "an agent whose clock is 10 min off", bound_s=90 if ctx.quick else 240
    )
    with fleet_for(ctx, "clock-skew", 2) as f:
        m, agent = f.master, f.agents[0]
        for offset in offsets:
            label = f"{'+' if offset > 0 else '-'}{abs(offset) / 60:.0f} min"
            old = ensure_serving(f)
            log_mark = len(_log(agent.process.log))
            master_mark = len(_log(m.process.log))
            restart_agent(agent, env={"CHAOS_CLOCK_OFFSET": str(offset)}, args=_skewed_args(agent))

            def refused(mark: int = log_mark) -> str | None:
                text = _log(agent.process.log)[mark:]
                found = _SKEW_MESSAGE.search(text)
                return found.group(0) if found and "synchronise the clocks" in text else None

            message = wait_until(refused, 30)
            result.check(
                f"{label}: the agent logs a clear clock-skew error",
                message,
                message or _log(agent.process.log)[log_mark:][-600:],
            )
            seconds = int(_SKEW_MESSAGE.search(message).group(1)) if message else 0  # type: ignore[union-attr]
            result.check(
                f"{label}: the error names the offset (about {abs(offset):.0f} s)",
                abs(seconds - abs(offset)) <= 30,
                f"{seconds} s",
            )
            master_log = _log(m.process.log)[master_mark:]
            result.check(
                f"{label}: the master logged the refusal with code clock_skew",
                "registration rejected" in master_log and "clock_skew" in master_log,
            )
            result.check(
                f"{label}: the master does not count the agent online",
                not _online(m, agent.agent_id),
            )
            body = f"skew-{time.monotonic_ns()}"
            number = _put(f, body)  # stored while the agent cannot connect
            time.sleep(1.0)
            result.check(
                f"{label}: the agent keeps serving its cache meanwhile",
                agent.body(f.web_port) == old and agent.process.alive(),
                agent.body(f.web_port),
            )
            restart_agent(agent)  # the clock is right again
            done = wait_until(
                functools.partial(_serves_and_converged, f, agent, body, number), 45, 0.2
            )
            result.check(
                f"{label}: with the clock fixed, the agent converges on what was "
                "stored meanwhile (nothing lost)",
                done,
                agent.body(f.web_port),
            )
        if not ctx.quick:
            _skewed_enrollment(ctx, f, result)
    return result


def _skewed_enrollment(ctx: Context, f: Any, result: CaseResult) -> None:
    """A new agent enrolling with a skewed clock: refused; its token still works after."""
    h = e2e_harness()
    m = f.master
    index = len(f.agents)
    newcomer = h.Agent(
        f.master.root / f"agent-{index}",
        f"agent-{index}",
        f"127.0.0.{index + 2}",
        m,
        "grpc",
        ctx.nginx,
    )
    f.agents.append(newcomer)
    token = m.token(node=newcomer.name)
    token_file = newcomer.root / "bootstrap-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    newcomer.process.env = {**newcomer.process.env, "CHAOS_CLOCK_OFFSET": "600"}
    newcomer.process.args = _skewed_args(newcomer, "--bootstrap-token-file", str(token_file))
    newcomer.process.start()
    message = wait_until(lambda: _SKEW_MESSAGE.search(_log(newcomer.process.log)), 30)
    result.check(
        "enrollment +10 min: refused with a clock-skew error",
        message,
        message.group(0) if message else _log(newcomer.process.log)[-600:],
    )
    result.check("enrollment +10 min: the agent did not enroll", not newcomer.credentials.exists())
    newcomer.kill()
    newcomer.process.env = {
        k: v for k, v in newcomer.process.env.items() if k != "CHAOS_CLOCK_OFFSET"
    }
    newcomer.start(token)
    online = wait_until(lambda: newcomer.credentials.exists() and _online(m, newcomer.agent_id), 30)
    result.check(
        "enrollment: with the clock fixed the same bootstrap token still enrolls "
        "(a skewed attempt does not use it up)",
        online,
    )


CASES: dict[str, Callable[[Context], CaseResult]] = {
    "wrk_applies": wrk_applies,
    "master_kill": master_kill,
    "agent_kill_stages": agent_kill_stages,
    "nginx_kill": nginx_kill,
    "burst": burst,
    "clock_skew": clock_skew,
    "postgres_restart": postgres_restart,
}
"""In the order they run."""


def as_json(result: CaseResult) -> str:
    return json.dumps(result.as_dict(), indent=2, default=str) + "\n"
