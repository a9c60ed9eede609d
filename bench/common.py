"""What the benchmarks and the chaos suite share.

* runners: `parse_suite_args`, the ``--quick`` / ``--only`` / ``--out-dir`` options of
  ``python -m bench.run`` and ``python -m chaos.run``;
* statistics: `stats` (median, min, max over repeats) and `stats_ms`, `ratio`;
* reports: `machine_info` (recorded with every result: the figures only mean something
  for the machine that produced them), `utc_now`, `write_json`;
* load: `parse_wrk` and `under_wrk` (wrk against a live nginx while something runs);
* processes: `pss_mb`, `bare_python_pss`;
* fleets: `e2e_harness` loads the end-to-end harness of ``tests/e2e/conftest.py`` (a real
  ``nxmesh master`` and real ``nxmesh-agent`` processes, each agent with its own nginx)
  so benchmarks and chaos cases drive exactly what the end-to-end tests drive;
  `fleet` starts a master and enrolled agents with it; `shipped_agent_defaults` undoes
  the harness's test-speed driver knobs;
  `wait_serving` polls many nginx at once until each answers a body.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import psutil

from nxmesh.agent.http import http_get

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "bare_python_pss",
    "e2e_harness",
    "fleet",
    "harness_failure",
    "machine_info",
    "parse_suite_args",
    "parse_wrk",
    "pss_mb",
    "ratio",
    "shipped_agent_defaults",
    "stats",
    "stats_ms",
    "under_wrk",
    "utc_now",
    "wait_serving",
    "write_json",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


# ---------------------------------------------------------------------------------------
# Suite runners
# ---------------------------------------------------------------------------------------


def parse_suite_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    known: Sequence[str],
    *,
    noun: str,
    results_dir: Path,
    quick_prefix: str,
    quick_help: str,
    out_dir_help: str | None = None,
) -> argparse.Namespace:
    """Add ``--quick``, ``--only`` and ``--out-dir`` to `parser` (which holds the runner's
    own options) and parse `argv`.

    ``args.names`` is the ``--only`` subset of `known` in the order given (all of them by
    default); an unknown name is a usage error naming the `noun`. ``args.out_dir``
    defaults to `results_dir`, or for ``--quick`` to a fresh temporary directory named
    `quick_prefix`..., so quick runs (the tests) never overwrite the committed results.
    """
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of: {', '.join(known)}"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help=out_dir_help)
    args = parser.parse_args(argv)
    names = list(known) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown {noun}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    args.names = names
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix=quick_prefix)) if args.quick else results_dir
    return args


# ---------------------------------------------------------------------------------------
# Statistics and reports
# ---------------------------------------------------------------------------------------


def stats(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of `samples` (machines are noisy: never one number alone)."""
    if not samples:
        raise ValueError("no samples")
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def stats_ms(samples: Sequence[float]) -> dict[str, Any]:
    """`stats` of durations in seconds, reported in milliseconds with the samples."""
    return {
        "median_ms": round(statistics.median(samples) * 1000, 2),
        "min_ms": round(min(samples) * 1000, 2),
        "max_ms": round(max(samples) * 1000, 2),
        "samples_ms": [round(s * 1000, 2) for s in samples],
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version_of(command: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stderr or out.stdout).strip()
    return text.splitlines()[0] if text else None


def machine_info(nginx: str | None = None) -> dict[str, Any]:
    """Where a result was measured: platform, CPUs, load, Python, nginx."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "nginx": _version_of([nginx, "-v"]) if nginx else None,
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------

_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_REQUESTS = re.compile(r"(\d+) requests in")


def parse_wrk(output: str) -> dict[str, int]:
    """wrk's summary → requests and error counts (all zero when wrk printed none)."""
    errors = _ERRORS.search(output)
    connect, read, write, timeout = (int(x) for x in errors.groups()) if errors else (0,) * 4
    non_2xx = _NON_2XX.search(output)
    requests = _REQUESTS.search(output)
    counts = {
        "requests": int(requests.group(1)) if requests else 0,
        "connect": connect,
        "read": read,
        "write": write,
        "timeout": timeout,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }
    counts["errors"] = connect + read + write + timeout + counts["non_2xx"]
    return counts


async def under_wrk(
    wrk: str,
    port: int,
    keepalive: bool,
    work: Callable[[], Awaitable[None]],
    *,
    host: str = "127.0.0.1",
    threads: int = 2,
    connections: int = 16,
) -> dict[str, int]:
    """Run `work` while wrk loads ``host:port``; stop wrk (SIGINT) when it is done."""
    command = [wrk, f"-t{threads}", f"-c{connections}", "-d300s", "--latency",
               f"http://{host}:{port}/"]  # fmt: skip
    if not keepalive:
        command[1:1] = ["-H", "Connection: close"]
    async with await anyio.open_process(command) as proc:
        await anyio.sleep(0.5)  # wrk connected and running before the first apply
        try:
            await work()
            await anyio.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGINT)  # wrk prints its summary on SIGINT
            with anyio.fail_after(30):
                await proc.wait()
        assert proc.stdout is not None
        output = b""
        async for chunk in proc.stdout:
            output += chunk
    return parse_wrk(output.decode(errors="replace"))


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def pss_mb(pid: int) -> float:
    """Proportional set size of `pid` in MiB (shared pages counted by share)."""
    info = psutil.Process(pid).memory_full_info()
    return float(getattr(info, "pss", info.rss)) / 2**20


def bare_python_pss(seconds: float = 1.0) -> dict[str, float]:
    """PSS of a bare interpreter of this venv, doing nothing: the floor of any Python
    process (the baseline an idle agent is compared with)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(max(0.5, seconds))
        samples = [pss_mb(proc.pid) for _ in range(3)]
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.kill()
        proc.wait()
    return {"pss_mb": round(max(samples), 2), "rss_mb": round(rss, 2)}


# ---------------------------------------------------------------------------------------
# Fleets: the end-to-end harness
# ---------------------------------------------------------------------------------------

_HARNESS_PATH = REPO_ROOT / "tests" / "e2e" / "conftest.py"
_harness: ModuleType | None = None


def e2e_harness() -> ModuleType:
    """``tests/e2e/conftest.py`` as a module: `Master`, `Agent`, `Fleet`, `make_fleet`,
    `site_state`, `wait_for`.

    Its waits fail through ``pytest.fail``; catch `harness_failure()` around them.
    """
    global _harness
    if _harness is None:
        spec = importlib.util.spec_from_file_location("nxmesh_e2e_harness", _HARNESS_PATH)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the end-to-end harness from {_HARNESS_PATH}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _harness = module
    return _harness


def harness_failure() -> type[BaseException]:
    """What the harness raises when one of its bounded waits runs out (``pytest.fail``'s
    exception, a `BaseException`): ``except harness_failure() as exc``."""
    import pytest

    failed: type[BaseException] = pytest.fail.Exception
    return failed


# The harness tunes the reload driver for test speed; benchmarks and chaos cases run
# the agent as shipped.
_TEST_KNOBS = {
    "error_log_window = 0.05": None,
    "debounce = 0.02": None,
    "min_reload_interval = 0.0": None,
}


def shipped_agent_defaults(agent: Any) -> None:
    """Drop the harness's test-speed driver settings from `agent`'s config file, so the
    agent runs with the defaults an operator gets (debounce, reload interval, watch
    window)."""
    config: Path = agent.config
    lines = [line for line in config.read_text().splitlines() if line.strip() not in _TEST_KNOBS]
    config.write_text("\n".join(lines) + "\n")


async def wait_serving(
    targets: Iterable[tuple[str, int]],
    body: str,
    *,
    limit: float = 60.0,
    interval: float = 0.005,
    host_header: str = "localhost",
) -> dict[tuple[str, int], float]:
    """Poll every ``(address, port)`` at once until each answers `body`; return the
    monotonic time each first did. Raises TimeoutError after `limit` seconds."""
    done: dict[tuple[str, int], float] = {}

    async def one(target: tuple[str, int]) -> None:
        while True:
            try:
                response = await http_get(target[0], target[1], "/", host_header=host_header)
                if response.text.strip() == body:
                    done[target] = time.monotonic()
                    return
            except (OSError, TimeoutError):
                pass
            await anyio.sleep(interval)

    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            for target in targets:
                tg.start_soon(one, target)
    return done


@contextlib.contextmanager
def fleet(
    root: Path,
    nginx: str,
    *,
    agents: int,
    transport: str = "grpc",
    storage_url: str = "",
    event_bus_url: str = "memory://",
    shipped_defaults: bool = True,
    enroll_timeout: float = 60.0,
    before_agents: Callable[[Any], None] | None = None,
) -> Iterator[Any]:
    """A real master and `agents` enrolled real agents (each with its own nginx on
    ``127.0.0.<i+2>``) from the end-to-end harness; everything is killed afterwards.

    `shipped_defaults`: agents run with the driver's default settings rather than the
    harness's test-speed ones. `before_agents(master)` runs once the master is up and
    no agent has started yet.
    """
    h = e2e_harness()
    master = h.Master(root, storage_url=storage_url, event_bus_url=event_bus_url)
    started = h.Fleet(master, [])
    try:
        master.start()
        if before_agents is not None:
            before_agents(master)
        for i in range(agents):
            agent = h.Agent(root / f"agent-{i}", f"agent-{i}", f"127.0.0.{i + 2}", master,
                            transport, nginx)  # fmt: skip
            if shipped_defaults:
                shipped_agent_defaults(agent)
            started.agents.append(agent)
            agent.start(master.token(node=agent.name))

        def enrolled() -> bool:
            online: int = sum(a["status"] == "online" for a in master.agents())
            return online == agents

        h.wait_for(f"{agents} agents to enroll over {transport}", enrolled,
                   timeout=enroll_timeout, logs=started.logs)  # fmt: skip
        yield started
    finally:
        started.close()
