"""Agent apply latency vs the raw baseline, measured side by side in one run.

What is timed, for 10 and 1,000 sites (every site's answer changes each round):

``agent``      receive → new generation serving: `Applier.apply` is called with a
               `PendingApply` (digest check, render, stage + syncfs, ``nginx -t``, atomic
               flip, HUP, confirm through the status server) while an independent poller
               fetches a site until it answers the new body. The clock stops at that
               answer.
``agent_total`` the same apply until its report returns: adds the post-reload error
               log watch window (``error_log_window``), which runs while the new
               generation already serves.
Before timing, the agent side applies ``keep_releases + 2`` versions so old releases
are being pruned as in a long-running agent.

``raw``        the baseline an operator's script does: overwrite the files of a live
               tree in place, ``nginx -t``, ``kill -HUP``, poll the same site until it
               answers. Same bundle bytes, its own nginx on its own ports.

Rounds alternate agent / raw so drift of the machine hits both alike. Each figure is
reported as median, min and max; the headline is the ratio of medians and the goal
``agent <= 1.15 x raw + 20 ms`` from the issue.

Usage::

    .venv/bin/python bench/apply_bench.py                 # full run → bench/results/apply.json
    .venv/bin/python bench/apply_bench.py --quick --out /tmp/apply.json
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pluggy

if __package__ in (None, ""):  # run as a file: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, stats_ms, utc_now, write_json
from nxmesh.agent.applier import Applier
from nxmesh.agent.harness import NginxStack, multi_site_state
from nxmesh.agent.http import http_get
from nxmesh.agent.process import read_pid_file
from nxmesh.core.bundle import Bundle
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.nginx_check import find_nginx, prepare_prefix
from nxmesh.plugins.render_nginx import NginxRenderer
from nxmesh.testing.nginx import free_port

RESULTS = Path(__file__).parent / "results" / "apply.json"
POLL_INTERVAL = 0.002
GOAL_RATIO, GOAL_SLACK = 1.15, 0.020


async def wait_for_body(port: int, body: str, *, limit: float = 60.0) -> float:
    """Poll 127.0.0.1:`port` until it answers `body`; return the monotonic time it did."""
    with anyio.fail_after(limit):
        while True:
            try:
                response = await http_get("127.0.0.1", port, "/", host_header="localhost")
                if response.text.strip() == body:
                    return time.monotonic()
            except OSError:
                pass
            await anyio.sleep(POLL_INTERVAL)


class RawNginx:
    """The baseline: one nginx, its tree overwritten in place, nginx -t, HUP, poll."""

    def __init__(self, binary: str, root: Path, web_port: int, status_port: int) -> None:
        self.binary = binary
        self.root = root
        self.web_port = web_port
        self.renderer = NginxRenderer(
            settings=NginxStack(root, binary, status_port=status_port).render_settings
        )

    def write(self, bundle: Bundle) -> None:
        for rel, data in bundle.files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.root}/", "-c", str(self.root / "nginx.conf"), *extra]

    async def start(self, bundle: Bundle) -> None:
        prepare_prefix(self.root)
        self.write(bundle)
        await anyio.run_process(self.command())

    async def apply(self, bundle: Bundle) -> None:
        self.write(bundle)
        await anyio.run_process(self.command("-t", "-q"))
        pid = await read_pid_file(self.root / "logs" / "nginx.pid")
        assert pid is not None, "baseline nginx is not running"
        os.kill(pid, signal.SIGHUP)

    async def stop(self) -> None:
        pid = await read_pid_file(self.root / "logs" / "nginx.pid")
        if pid is not None:
            os.kill(pid, signal.SIGTERM)


summary = stats_ms


async def bench_sites(
    pm: pluggy.PluginManager, binary: str, sites: int, rounds: int, workdir: Path
) -> dict[str, Any]:
    """Alternate `rounds` agent applies and raw applies of `sites` sites."""
    agent_root, raw_root = workdir / f"agent-{sites}", workdir / f"raw-{sites}"
    raw = RawNginx(binary, raw_root, free_port(), free_port())
    async with NginxStack(agent_root, binary) as stack:
        applier = Applier(pm, stack.driver, stack.renderer, events=stack.events)
        # Warm both: first start, page cache, and on the agent side enough applies for
        # release pruning to be in its steady state.
        for w in range(stack.driver_settings.keep_releases + 2):
            warm = await applier.apply(stack.update(stack.state(f"warm{w}", sites=sites)))
            assert warm.outcome == "applied", warm.message
        await raw.start(raw.renderer.render(multi_site_state(raw.web_port, "warm", sites=sites)))
        await wait_for_body(raw.web_port, "warm")
        agent_serving: list[float] = []
        agent_total: list[float] = []
        raw_serving: list[float] = []
        stages: dict[str, list[float]] = {}
        try:
            for i in range(rounds):
                body = f"round-{i}"
                update = stack.update(stack.state(body, sites=sites))
                serving, total, report = await _timed_apply(
                    functools.partial(applier.apply, update), stack.web_port, body
                )
                assert report.outcome == "applied", report.message
                agent_serving.append(serving)
                agent_total.append(total)
                for stage, seconds in report.durations.items():
                    stages.setdefault(stage, []).append(seconds)
                # The raw side renders outside the clock: it gets the files for free.
                bundle = raw.renderer.render(multi_site_state(raw.web_port, body, sites=sites))
                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(raw.apply, bundle)
                    done = await wait_for_body(raw.web_port, body)
                raw_serving.append(done - started)
        finally:
            await raw.stop()
    agent_median = statistics.median(agent_serving)
    raw_median = statistics.median(raw_serving)
    return {
        "sites": sites,
        "rounds": rounds,
        "agent": summary(agent_serving),
        "agent_total": summary(agent_total),
        "raw": summary(raw_serving),
        "ratio": round(agent_median / raw_median, 3),
        "overhead_ms": round((agent_median - raw_median) * 1000, 2),
        "goal": f"agent <= {GOAL_RATIO} x raw + {GOAL_SLACK * 1000:.0f} ms",
        "goal_met": agent_median <= GOAL_RATIO * raw_median + GOAL_SLACK,
        "agent_stage_medians_ms": {
            stage: round(statistics.median(values) * 1000, 2) for stage, values in stages.items()
        },
    }


async def _timed_apply(
    apply: Callable[[], Awaitable[Any]], port: int, body: str
) -> tuple[float, float, Any]:
    """(seconds until `body` is served, seconds until the apply returned, its report)."""
    result: dict[str, Any] = {}
    started = time.monotonic()

    async def run() -> None:
        result["report"] = await apply()
        result["done"] = time.monotonic()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        serving = await wait_for_body(port, body)
    return serving - started, result["done"] - started, result["report"]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    binary = find_nginx(args.nginx)
    pm = get_plugin_manager(autoload=False, environ={})
    results: dict[str, Any] = {
        "benchmark": "agent apply latency vs raw write + nginx -t + HUP + poll",
        "quick": args.quick,
        "machine": {**machine_info(binary), "backend": args.backend},
        "started_at": utc_now(),
        "runs": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="nxmesh-apply-bench-"))
    try:
        for sites in args.sites:
            rounds = args.rounds or (3 if args.quick else (21 if sites <= 100 else 9))
            run = await bench_sites(pm, binary, sites, rounds, workdir)
            results["runs"].append(run)
            print(
                f"{sites:>5} sites: agent {run['agent']['median_ms']:.1f} ms "
                f"(min {run['agent']['min_ms']:.1f}, max {run['agent']['max_ms']:.1f}), "
                f"raw {run['raw']['median_ms']:.1f} ms "
                f"(min {run['raw']['min_ms']:.1f}, max {run['raw']['max_ms']:.1f}), "
                f"ratio {run['ratio']:.2f}, overhead {run['overhead_ms']:+.1f} ms, "
                f"with watch window {run['agent_total']['median_ms']:.1f} ms, "
                f"goal {'met' if run['goal_met'] else 'MISSED'}",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds, small bundles")
    parser.add_argument("--sites", type=lambda v: [int(x) for x in v.split(",")], default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--nginx", default="nginx")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.sites is None:
        args.sites = [10, 50] if args.quick else [10, 1000]
    if args.out is None:
        args.out = RESULTS if not args.quick else Path(tempfile.gettempdir()) / "apply-quick.json"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = anyio.run(main_async, args, backend=args.backend)
    write_json(args.out, results)
    print(f"results written to {args.out}")
    return results


if __name__ == "__main__":
    main()
