"""Benchmark: render + digest N sites, and compare with ``nginx -t`` on the same bundle.

    .venv/bin/python bench/render_bench.py                    # 10, 1,000, 10,000 sites
    .venv/bin/python bench/render_bench.py --sizes 10,100 --repeats 3 --no-nginx
    .venv/bin/python bench/render_bench.py --quick --out /tmp/render.json

For each size it builds a realistic state (every site: two server names, a proxied ``/``,
a static ``/static/``, an exact ``/healthz``, a response header; every tenth site TLS
with HSTS and a WebSocket location; one upstream per site), then times
``NginxRenderer.render`` — which includes the bundle digest and the status server's config
digest — ``--repeats`` times, and ``nginx -t`` on the resulting bundle (staged once in a
scratch prefix, placeholder certificates included) ``--nginx-repeats`` times. The renderer
is built (templates compiled) once, outside the timings, as the agent does.

Prints a table and writes JSON (default ``bench/results/render.json``). The goal from
issue 3: 10,000 sites in at most 1 s.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, stats, utc_now, write_json
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Header,
    Listener,
    Location,
    Return,
    Site,
    TLSConfig,
    Upstream,
    UpstreamServer,
)
from nxmesh.nginx_check import NginxNotFoundError, check_bundle, find_nginx
from nxmesh.plugins.render_nginx import NginxRenderer

DEFAULT_SIZES = (10, 1_000, 10_000)
QUICK_SIZES = (10, 100)
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "render.json"
GOAL_SITES = 10_000
GOAL_SECONDS = 1.0


def build_state(sites: int) -> DesiredState:
    """A state with `sites` realistic sites, one upstream each; every tenth uses TLS."""
    upstreams, site_list, certificates = [], [], []
    for i in range(sites):
        name = f"site{i:05d}"
        upstreams.append(
            Upstream(
                name=f"app{i:05d}",
                servers=(
                    UpstreamServer(address=f"127.0.0.1:{10_000 + i % 50_000}"),
                    UpstreamServer(address=f"127.0.0.2:{10_000 + i % 50_000}", backup=True),
                ),
                keepalive=16,
            )
        )
        locations = [
            Location(path="/", upstream=f"app{i:05d}"),
            Location(path="/static/", root="/srv/www", index=("index.html",)),
            Location(path="/healthz", match="exact", return_=Return(code=200, body="ok")),
        ]
        listeners = [Listener(port=80)]
        tls = None
        if i % 10 == 0:
            certificates.append(
                CertificateRef(name=f"cert{i:05d}", domains=(f"{name}.example.com",))
            )
            listeners = [Listener(port=443, tls=True, http2=True), Listener(port=80)]
            tls = TLSConfig(certificate=f"cert{i:05d}", hsts=True)
            locations.append(Location(path="/ws/", upstream=f"app{i:05d}", websocket=True))
        site_list.append(
            Site(
                name=name,
                server_names=(f"{name}.example.com", f"www.{name}.example.com"),
                listeners=tuple(listeners),
                tls=tls,
                headers=(Header(name="X-Frame-Options", value="DENY"),),
                locations=tuple(locations),
            )
        )
    return DesiredState(
        sites=tuple(site_list), upstreams=tuple(upstreams), certificates=tuple(certificates)
    )


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    summary = stats(samples)
    summary["repeats"] = summary.pop("n")
    return summary


def timed(action: Callable[[], object], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def time_nginx_t(bundle: Any, binary: str, repeats: int) -> tuple[list[float], bool, str]:
    """Stage the bundle once (with placeholder certificates), then time bare ``nginx -t``."""
    scratch = Path(tempfile.mkdtemp(prefix="nxmesh-bench-"))
    try:
        first = check_bundle(
            bundle, binary=binary, placeholder_certificates=True, scratch=scratch / "prefix"
        )
        root = scratch / "prefix"
        command = [
            binary,
            "-t",
            "-q",
            "-p",
            f"{root}/",
            "-c",
            str(root / "nginx.conf"),
            "-e",
            "stderr",
        ]
        samples = timed(
            lambda: subprocess.run(command, check=False, capture_output=True, timeout=600),  # noqa: S603
            repeats,
        )
        return samples, first.ok, first.message
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(
    sizes: Sequence[int], repeats: int, nginx_repeats: int, binary: str | None
) -> dict[str, Any]:
    started = time.perf_counter()
    renderer = NginxRenderer()
    # Templates compile at first use; count that as building, not as the first render.
    renderer.environment  # noqa: B018
    build_seconds = time.perf_counter() - started
    rows = []
    for size in sizes:
        state = build_state(size)
        bundle = renderer.render(state)  # warm-up, and the bundle nginx -t checks
        render = summarize(timed(partial(renderer.render, state), repeats))
        row: dict[str, Any] = {
            "sites": size,
            "files": len(bundle.files),
            "bytes": sum(len(d) for d in bundle.files.values()),
            "render": render,
            "nginx_t": None,
            "ratio_render_to_nginx_t": None,
        }
        if binary is not None:
            samples, ok, message = time_nginx_t(bundle, binary, nginx_repeats)
            row["nginx_t"] = {**summarize(samples), "ok": ok}
            if not ok:
                row["nginx_t"]["message"] = message
            row["ratio_render_to_nginx_t"] = render["median"] / row["nginx_t"]["median"]
        rows.append(row)
    goal_row = next((r for r in rows if r["sites"] == GOAL_SITES), None)
    return {
        "benchmark": "render",
        "generated_at": utc_now(),
        "machine": machine_info(binary),
        "renderer_build_seconds": build_seconds,
        "results": rows,
        "goal": {
            "sites": GOAL_SITES,
            "seconds": GOAL_SECONDS,
            "met": None if goal_row is None else goal_row["render"]["median"] <= GOAL_SECONDS,
        },
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'sites':>7} {'files':>7} {'MiB':>7} | {'render+digest median (min-max) s':>34} | "
        f"{'nginx -t median s':>17} | {'render/nginx -t':>15}",
        "-" * 100,
    ]
    for row in report["results"]:
        r = row["render"]
        render = f"{r['median']:.4f} ({r['min']:.4f}-{r['max']:.4f})"
        n = row["nginx_t"]
        nginx = "-" if n is None else f"{n['median']:.4f}" + ("" if n["ok"] else " FAIL")
        ratio = row["ratio_render_to_nginx_t"]
        lines.append(
            f"{row['sites']:>7} {row['files']:>7} {row['bytes'] / 2**20:>7.2f} | {render:>34} | "
            f"{nginx:>17} | {'-' if ratio is None else f'{ratio:.3f}':>15}"
        )
    goal = report["goal"]
    if goal["met"] is not None:
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(f"goal: {goal['sites']} sites in <= {goal['seconds']} s: {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated site counts (default: {','.join(map(str, DEFAULT_SIZES))}; "
        f"--quick: {','.join(map(str, QUICK_SIZES))})",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="render timings per size")
    parser.add_argument("--nginx-repeats", type=int, default=None, help="nginx -t timings per size")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx -t comparison")
    parser.add_argument("--nginx", default="nginx", help="nginx binary (default: %(default)s)")
    parser.add_argument(
        "--output", "--out", type=Path, default=DEFAULT_OUTPUT, help="JSON report path"
    )
    args = parser.parse_args(argv)
    default_sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] if args.sizes else default_sizes
    repeats = args.repeats or (2 if args.quick else 5)
    nginx_repeats = args.nginx_repeats or (1 if args.quick else 3)
    binary = None
    if not args.no_nginx:
        try:
            binary = find_nginx(args.nginx)
        except NginxNotFoundError as exc:
            print(f"note: {exc}; skipping the nginx -t comparison", file=sys.stderr)
    report = run(sizes, repeats, nginx_repeats, binary)
    report["quick"] = args.quick
    write_json(args.output, report)
    print(table(report))
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
