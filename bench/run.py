"""Run every NxMesh benchmark, then write the summary and plots.

    .venv/bin/python -m bench.run                     # everything (long: tens of minutes)
    .venv/bin/python -m bench.run --quick             # every harness, tiny sizes (a minute)
    .venv/bin/python -m bench.run --only apply,render # some of them
    .venv/bin/python -m bench.run --summary-only      # re-read the JSON, redo SUMMARY.md

Each benchmark runs in a fresh process (``python -m bench.<module>``) and writes
``<out-dir>/<name>.json``; one failing does not stop the others (the command then exits
1). Afterwards ``SUMMARY.md``, ``summary.json`` and PNG plots are written from *every*
result file in the directory — so ``--only`` refreshes some figures and keeps the others
— together with the chaos suite's verdicts when ``chaos/results/summary.json`` exists.

Full runs write to ``bench/results`` (committed, so changes show in review); quick runs
to a temporary directory unless ``--out-dir`` says otherwise. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, RESULTS_DIR, parse_suite_args, utc_now, write_json
from bench.report import write_summary

CHAOS_SUMMARY = REPO_ROOT / "chaos" / "results" / "summary.json"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its module, and its arguments for a full and a quick run."""

    name: str
    module: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    timeout: float
    about: str


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "render", "bench.render_bench", (), ("--quick",), 1800,
            "render + digest 10 / 1,000 / 10,000 sites vs nginx -t on the same bundle",
        ),
        Benchmark(
            "apply", "bench.apply_bench", (), ("--quick",), 1800,
            "agent apply latency, 10 / 1,000 sites, vs raw write + nginx -t + HUP + poll",
        ),
        Benchmark(
            "fanout", "bench.fanout_bench",
            ("--agents", "1000,5000,10000", "--kinds", "nxmesh,plain,ws,wsapi,raw",
             "--rounds", "5",
             "--repeat", "2"),
            ("--quick", "--kinds", "nxmesh,plain,ws,wsapi,raw"), 7200,
            "1k / 5k / 10k simulated agents over gRPC (compressed and plain) and WebSocket "
            "vs raw grpclib",
        ),
        Benchmark(
            "convergence", "bench.convergence_bench", (), ("--quick",), 3600,
            "10 real nginx + agents + master after one change vs an Ansible playbook",
        ),
        Benchmark(
            "api", "bench.api_bench", (), ("--quick",), 3600,
            "API req/s with 1k agents vs bare Litestar; apply → 100 sim + 1 real converged",
        ),
        Benchmark(
            "idle", "bench.agent_reliability", ("--skip-traffic",),
            ("--quick", "--skip-traffic", "--idle-seconds", "1"), 900,
            "idle agent PSS and CPU vs a bare Python interpreter",
        ),
    )
}  # fmt: skip
"""In the order they run (cheap first)."""


def run_benchmark(
    bench: Benchmark, out_dir: Path, *, quick: bool, log_dir: Path, echo: bool = True
) -> dict[str, object]:
    """Run one benchmark in its own process (own session: a timeout kills all of it);
    its output goes to a log and, with `echo`, to the console."""
    out = out_dir / f"{bench.name}.json"
    command = [sys.executable, "-m", bench.module, *(bench.quick if quick else bench.full),
               "--out", str(out)]  # fmt: skip
    log = log_dir / f"{bench.name}.log"
    print(f"== {bench.name}: {bench.about}", flush=True)
    print(f"   {' '.join(command[1:])}  (log: {log})", flush=True)
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                if echo:
                    sys.stdout.write("   " + line.decode(errors="replace"))
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        with proc:  # closes the pipe at the end
            reader.start()
            try:
                code = proc.wait(timeout=bench.timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
                print(f"   timed out after {bench.timeout:.0f} s", flush=True)
            reader.join(10)
    seconds = round(time.monotonic() - started, 1)
    ok = code == 0 and out.exists()
    print(f"   {'ok' if ok else f'FAILED (exit {code})'} in {seconds} s", flush=True)
    return {"name": bench.name, "ok": ok, "exit": code, "seconds": seconds,
            "finished_at": utc_now(), "args": command[2:-2], "log": str(log)}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: rewrite SUMMARY.md and plots from the JSON files",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--chaos-summary", type=Path, default=CHAOS_SUMMARY,
                        help="the chaos suite's summary.json, for its goals")  # fmt: skip
    return parse_suite_args(
        parser,
        argv,
        list(BENCHMARKS),
        noun="benchmark",
        results_dir=RESULTS_DIR,
        quick_prefix="nxmesh-bench-quick-",
        quick_help="every harness at tiny sizes (seconds each); not for figures",
        out_dir_help="where results go (default: bench/results; --quick: a temp dir)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, object]] = []
    if not args.summary_only:
        # Quick runs keep their logs beside their (throwaway) results; full runs in a
        # temporary directory, so bench/results holds only what is committed.
        if args.quick:
            log_dir = out_dir / "logs"
            log_dir.mkdir(exist_ok=True)
        else:
            log_dir = Path(tempfile.mkdtemp(prefix="nxmesh-bench-logs-"))
        for name in args.names:
            runs.append(run_benchmark(BENCHMARKS[name], out_dir, quick=args.quick,
                                      log_dir=log_dir))  # fmt: skip
        # Each benchmark's last run (how long it took, where its log is), merged with
        # the earlier runs of the others.
        record = out_dir / "runs.json"
        previous = json.loads(record.read_text()).get("runs", []) if record.exists() else []
        merged = {r["name"]: r for r in previous}
        merged.update({str(r["name"]): r for r in runs})
        write_json(record, {"quick": args.quick, "runs": list(merged.values())})
    summary = write_summary(out_dir, args.chaos_summary, plots=not args.no_plots)
    print(f"summary: {summary}")
    failed = [r["name"] for r in runs if not r["ok"]]
    if failed:
        print(f"FAILED: {', '.join(map(str, failed))} (see the logs above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
