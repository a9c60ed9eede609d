"""Fleet convergence: one change reaching 10 real nginx, NxMesh vs an Ansible playbook.

``nxmesh``   a real ``nxmesh master`` (SQLite) and 10 real ``nxmesh-agent`` processes
             enrolled over gRPC, each supervising its own nginx on its own loopback
             address (``127.0.0.2`` … ``127.0.0.11``) — the end-to-end harness of
             ``tests/e2e``. Agents run with the driver's shipped defaults. One round: the
             new state is stored through the API (``PUT /workspaces/default/state``);
             the clock stops when every nginx answers the new body.
``ansible``  the baseline: ``bench/ansible/playbook.yml`` on 10 nginx instances of its
             own (same addresses, another port), ``ansible_connection=local``: the
             ``template`` module renders nginx.conf and validates it with ``nginx -t``,
             a handler reloads nginx. One round: ``ansible-playbook`` is started with
             the new body; the clock stops when every nginx answers it (the playbook's
             own exit time is reported too).

Both sides are polled by the same poller (every instance at once, every 5 ms), rounds
alternate so machine drift hits both, and a warm-up round of each is not counted. The
headline is the speed-up ansible/nxmesh (medians); the goal from the issue is at least 20x.

Also recorded: the master's PSS with no agent and with the fleet connected, and each
connected agent's PSS at rest.

Usage::

    .venv/bin/python bench/convergence_bench.py            # → bench/results/convergence.json
    .venv/bin/python bench/convergence_bench.py --quick --out /tmp/convergence.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

if __package__ in (None, ""):  # run as a file: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    REPO_ROOT,
    e2e_harness,
    fleet,
    machine_info,
    pss_mb,
    stats,
    utc_now,
    wait_serving,
    write_json,
)
from nxmesh.nginx_check import find_nginx
from nxmesh.testing.nginx import free_port

RESULTS = REPO_ROOT / "bench" / "results" / "convergence.json"
ANSIBLE_DIR = REPO_ROOT / "bench" / "ansible"
GOAL_SPEEDUP = 20.0
ROUND_LIMIT = 120.0


def ansible_playbook() -> str | None:
    """The ansible-playbook of this venv (``pip install -e .[bench]``), else on PATH."""
    local = Path(sys.executable).parent / "ansible-playbook"
    return str(local) if local.exists() else shutil.which("ansible-playbook")


class AnsibleFleet:
    """`instances` nginx managed by the playbook, under `base` on `port`."""

    def __init__(self, binary: str, nginx: str, base: Path, instances: int, port: int) -> None:
        self.binary = binary
        self.nginx = nginx
        self.base = base
        self.port = port
        self.hosts = [f"nginx-{i + 1:02d}" for i in range(instances)]
        self.addresses = [f"127.0.0.{i + 2}" for i in range(instances)]
        for host in self.hosts:  # provisioning, once: the prefix directories
            for sub in ("conf", "logs", "tmp"):
                (base / host / sub).mkdir(parents=True, exist_ok=True)
        home = base / ".ansible-home"
        self.env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
            "ANSIBLE_NOCOLOR": "1",
        }

    def command(self, body: str) -> list[str]:
        return [
            self.binary,
            "-i", str(ANSIBLE_DIR / "inventory.ini"),
            "--limit", ",".join(self.hosts),
            "-e", f"base_dir={self.base}",
            "-e", f"web_port={self.port}",
            "-e", f"body={body}",
            "-e", f"nginx_binary={self.nginx}",
            str(ANSIBLE_DIR / "playbook.yml"),
        ]  # fmt: skip

    async def round(self, body: str) -> dict[str, Any]:
        """Run the playbook for `body`; time until every nginx serves it, and its exit."""
        started = time.monotonic()
        async with await anyio.open_process(
            self.command(body), env=self.env, stderr=subprocess.STDOUT
        ) as proc:
            result: dict[str, Any] = {}

            async def playbook() -> None:
                output = b""
                assert proc.stdout is not None
                async for chunk in proc.stdout:
                    output += chunk
                result["rc"] = await proc.wait()
                result["exit_s"] = time.monotonic() - started
                result["output"] = output.decode(errors="replace")[-4000:]

            async with anyio.create_task_group() as tg:
                tg.start_soon(playbook)
                done = await wait_serving(
                    [(a, self.port) for a in self.addresses], body, limit=ROUND_LIMIT
                )
        if result["rc"] != 0:
            raise RuntimeError(f"ansible-playbook failed ({result['rc']}):\n{result['output']}")
        return {"serving_s": max(done.values()) - started, "exit_s": result["exit_s"],
                "first_s": min(done.values()) - started}  # fmt: skip

    def stop(self) -> None:
        for host in self.hosts:
            pid_file = self.base / host / "logs" / "nginx.pid"
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue


async def nxmesh_round(the_fleet: Any, body: str) -> dict[str, Any]:
    """Store the state through the API; time until every agent's nginx serves it."""
    h = e2e_harness()
    master = the_fleet.master
    state = h.site_state(the_fleet.web_port, body)
    targets = [(a.address, the_fleet.web_port) for a in the_fleet.agents]
    result: dict[str, Any] = {}
    started = time.monotonic()

    async def put() -> None:
        result["version"] = await anyio.to_thread.run_sync(master.put_state, state, body)
        result["api_s"] = time.monotonic() - started

    async with anyio.create_task_group() as tg:
        tg.start_soon(put)
        done = await wait_serving(targets, body, limit=ROUND_LIMIT)
    return {
        "serving_s": max(done.values()) - started,
        "first_s": min(done.values()) - started,
        "api_s": result["api_s"],
        "version": result["version"]["number"],
    }


def _pss(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return round(pss_mb(pid), 2)
    except OSError:
        return None


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    nginx = find_nginx(args.nginx)
    binary = ansible_playbook()
    report: dict[str, Any] = {
        "benchmark": "fleet convergence after one change: nxmesh vs an Ansible playbook",
        "quick": args.quick,
        "started_at": utc_now(),
        "machine": machine_info(nginx),
        "instances": args.instances,
        "rounds": args.rounds,
        "transport": args.transport,
    }
    ansible = None
    if binary is not None:
        version = await anyio.run_process([binary, "--version"], check=False)
        report["ansible"] = version.stdout.decode().splitlines()[0].strip()
        ansible = AnsibleFleet(binary, nginx, workdir / "ansible", args.instances, free_port())
    else:
        report["ansible"] = None
        print("note: ansible-playbook not found (pip install -e '.[bench]'); no baseline",
              file=sys.stderr)  # fmt: skip
    nxmesh_rounds: list[dict[str, Any]] = []
    ansible_rounds: list[dict[str, Any]] = []

    def idle_master(master: Any) -> None:
        time.sleep(1.0)  # start-up work done
        report["master_pss_mb_no_agents"] = _pss(master.process.proc.pid)

    try:
        with fleet(workdir / "fleet", nginx, agents=args.instances, transport=args.transport,
                   before_agents=idle_master) as the_fleet:  # fmt: skip
            master_pid = the_fleet.master.process.proc.pid
            # Warm-up: the first version on every agent (cold caches), first playbook run
            # (starts the baseline's nginx).
            await nxmesh_round(the_fleet, "warm")
            if ansible is not None:
                await ansible.round("warm")
            for i in range(args.rounds):
                body = f"round-{i}"
                nxmesh_rounds.append(await nxmesh_round(the_fleet, body))
                if ansible is not None:
                    ansible_rounds.append(await ansible.round(body))
                print(f"round {i}: nxmesh {nxmesh_rounds[-1]['serving_s']:.3f} s"
                      + (f", ansible {ansible_rounds[-1]['serving_s']:.3f} s"
                         if ansible_rounds else ""), flush=True)  # fmt: skip
            last = nxmesh_rounds[-1]["version"] if nxmesh_rounds else None
            if last is not None:
                view = the_fleet.master.wait_converged(last, agents=args.instances, timeout=60)
                report["master_view_converged"] = bool(view["converged"])
            await anyio.sleep(1.0)  # let the last apply's watch window end
            report["master_pss_mb_with_agents"] = _pss(master_pid)
            report["agent_pss_mb"] = [
                _pss(a.process.proc.pid if a.process.proc else None) for a in the_fleet.agents
            ]
    finally:
        if ansible is not None:
            ansible.stop()
    report["nxmesh"] = {
        "serving_s": stats([r["serving_s"] for r in nxmesh_rounds]) if nxmesh_rounds else None,
        "rounds": nxmesh_rounds,
    }
    report["baseline_ansible"] = {
        "serving_s": stats([r["serving_s"] for r in ansible_rounds]) if ansible_rounds else None,
        "exit_s": stats([r["exit_s"] for r in ansible_rounds]) if ansible_rounds else None,
        "rounds": ansible_rounds,
    }
    speedup = None
    if nxmesh_rounds and ansible_rounds:
        speedup = statistics.median(r["serving_s"] for r in ansible_rounds) / statistics.median(
            r["serving_s"] for r in nxmesh_rounds
        )
    report["speedup_ansible_over_nxmesh"] = speedup
    report["goal"] = {
        "text": f"nxmesh >= {GOAL_SPEEDUP:.0f}x faster than the Ansible playbook "
        f"on {args.instances} instances",
        # The goal is about ten instances; fewer (--quick) measure the harness only.
        "met": None if speedup is None or args.instances != 10 else speedup >= GOAL_SPEEDUP,
    }
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 instances, 1 round")
    parser.add_argument("--instances", type=int, default=None, help="default 10 (quick: 2)")
    parser.add_argument("--rounds", type=int, default=None, help="default 7 (quick: 1)")
    parser.add_argument("--transport", choices=("grpc", "websocket"), default="grpc")
    parser.add_argument("--nginx", default="nginx")
    parser.add_argument("--out", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.instances = args.instances or (2 if args.quick else 10)
    if not 1 <= args.instances <= 10:
        parser.error("--instances must be 1..10 (the inventory has ten hosts)")
    args.rounds = args.rounds or (1 if args.quick else 7)
    if args.out is None:
        args.out = RESULTS if not args.quick else Path(tempfile.gettempdir()) / "conv.json"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="nxmesh-convergence-"))
    try:
        report = anyio.run(run, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.out, report)
    n, a = report["nxmesh"]["serving_s"], report["baseline_ansible"]["serving_s"]
    if n:
        print(f"nxmesh:  {n['median']:.3f} s (min {n['min']:.3f}, max {n['max']:.3f})")
    if a:
        print(f"ansible: {a['median']:.3f} s (min {a['min']:.3f}, max {a['max']:.3f})")
    if report["speedup_ansible_over_nxmesh"] is not None:
        verdict = "met" if report["goal"]["met"] else "NOT met"
        print(f"speed-up {report['speedup_ansible_over_nxmesh']:.1f}x — goal {verdict}")
    print(f"results written to {args.out}")
    return report


if __name__ == "__main__":
    main()
