"""From the benchmarks' JSON to figures, goals, plots and ``SUMMARY.md``.

Every figure is NxMesh's measurement next to a baseline measured in the same run on the
same machine, as medians with min/max, and their **ratio** (NxMesh / baseline: below 1
is faster or smaller than the baseline). Goals from the issue are checked against the
figures and reported as met / not met; a goal whose benchmark did not run is "not
measured", never assumed.

`figures(results)` and `goals(results, chaos)` are pure functions of the loaded JSON
(tested with canned reports); `write_summary` writes ``SUMMARY.md``, ``summary.json``
and the PNG plots (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS_ORDER",
    "Figure",
    "Goal",
    "figures",
    "goals",
    "load_results",
    "render_markdown",
    "write_plots",
    "write_summary",
]

BENCHMARKS_ORDER = ("fanout", "apply", "convergence", "render", "idle", "api")
"""Result files ``<name>.json`` the summary reads, in the order it shows them."""

Stat = dict[str, float]


@dataclass
class Figure:
    """One measured figure beside its baseline."""

    group: str
    name: str
    unit: str
    value: Stat | None
    baseline: Stat | None
    baseline_name: str
    goal: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.value or not self.baseline or not self.baseline["median"]:
            return None
        return self.value["median"] / self.baseline["median"]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Goal:
    """A goal of the issue and the verdict of this run."""

    text: str
    measured: str
    met: bool | None
    source: str
    details: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**not met**", None: "not measured"}[self.met]


def _stat(median: float, low: float | None = None, high: float | None = None) -> Stat:
    return {"median": median, "min": median if low is None else low,
            "max": median if high is None else high}  # fmt: skip


def _scaled(s: Mapping[str, Any] | None, factor: float) -> Stat | None:
    if not s:
        return None
    return {k: float(s[k]) * factor for k in ("median", "min", "max")}


def _ms(s: Mapping[str, Any]) -> Stat:
    return _stat(s["median_ms"], s["min_ms"], s["max_ms"])


def _rounds_stat(rounds: Sequence[Mapping[str, Any]], key: str) -> Stat:
    values = sorted(float(r[key]) for r in rounds)
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return _stat(median, values[0], values[-1])


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` of `BENCHMARKS_ORDER` found in `directory`."""
    found: dict[str, dict[str, Any]] = {}
    for name in BENCHMARKS_ORDER:
        path = directory / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

_KIND = {
    "nxmesh": "gRPC",
    "ws": "WebSocket",
    "wsapi": "WebSocket on the API listener (hypercorn)",
    "plain": "gRPC uncompressed (diagnostic)",
}


# The fan-out kinds in the plots (the uncompressed diagnostic is in the tables only).
_PLOTTED = {
    **{kind: f"NxMesh {_KIND[kind]}" for kind in ("nxmesh", "ws", "wsapi")},
    "raw": "raw grpclib",
}


def _wire_note(size: Mapping[str, Any]) -> str:
    wire, version = size.get("frame_bytes"), size.get("version_bytes", size.get("frame_bytes"))
    if not wire or wire == version:
        return ""
    return f"sent compressed: {wire / 1024:.1f} KB frames for a {version / 1024:.1f} KB version"


def _fanout(report: Mapping[str, Any]) -> list[Figure]:
    out: list[Figure] = []
    runs = {(r["kind"], r["agents"]): r for r in report.get("runs", [])}
    counts = sorted({agents for _, agents in runs})
    for agents in counts:
        raw = runs.get(("raw", agents))
        for kind in ("nxmesh", "ws", "wsapi", "plain"):
            run = runs.get((kind, agents))
            if run is None:
                continue
            for size in run["sizes"]:
                base = raw["sizes"][size] if raw else None
                figure = Figure(
                    group="fan-out",
                    name=f"{agents:,} agents, {size} version, {_KIND[kind]}: all acked",
                    unit="s",
                    value=_rounds_stat(run["sizes"][size]["rounds"], "all_acked_s"),
                    baseline=_rounds_stat(base["rounds"], "all_acked_s") if base else None,
                    baseline_name="raw grpclib",
                    note=_wire_note(run["sizes"][size]),
                )
                if agents == 5000 and kind != "plain":
                    figure.goal = "<= 1.3x raw grpclib"
                    figure.met = None if figure.ratio is None else figure.ratio <= 1.3
                out.append(figure)
            if kind == "plain":  # the same master, its memory is nxmesh's
                continue
            memory = run["memory"]
            figure = Figure(
                group="fan-out",
                name=f"{agents:,} agents, {_KIND[kind]}: master memory per agent (PSS)",
                unit="KB",
                value=_stat(memory["pss_kb_per_agent_connected"]),
                baseline=_stat(raw["memory"]["pss_kb_per_agent_connected"]) if raw else None,
                baseline_name="raw grpclib",
                goal="<= 60 KB per agent",
                met=memory["pss_kb_per_agent_connected"] <= 60.0,
                note="(PSS after all connected - before) / agents",
            )
            out.append(figure)
    return out


def _master_memory(
    report: Mapping[str, Any], convergence: Mapping[str, Any] | None
) -> list[Figure]:
    out: list[Figure] = []
    runs = {(r["kind"], r["agents"]): r for r in report.get("runs", [])}
    counts = sorted({agents for _, agents in runs})
    if counts:
        first = runs.get(("nxmesh", counts[0]))
        raw_first = runs.get(("raw", counts[0]))
        if first and "pss_before_mb" in first["memory"]:
            out.append(Figure(
                group="memory", name="master process, 0 agents (hub + gRPC + SQLite)",
                unit="MB", value=_stat(first["memory"]["pss_before_mb"]),
                baseline=_stat(raw_first["memory"]["pss_before_mb"]) if raw_first else None,
                baseline_name="raw grpclib server",
            ))  # fmt: skip
        for agents in counts:
            run, raw = runs.get(("nxmesh", agents)), runs.get(("raw", agents))
            if run is None or "pss_connected_mb" not in run["memory"]:
                continue
            out.append(Figure(
                group="memory", name=f"master process, {agents:,} agents connected (gRPC)",
                unit="MB", value=_stat(run["memory"]["pss_connected_mb"]),
                baseline=_stat(raw["memory"]["pss_connected_mb"]) if raw else None,
                baseline_name="raw grpclib server",
            ))  # fmt: skip
    if convergence and convergence.get("master_pss_mb_no_agents"):
        out.append(Figure(
            group="memory", name="`nxmesh master` (API + agent plane), 0 agents",
            unit="MB", value=_stat(convergence["master_pss_mb_no_agents"]),
            baseline=None, baseline_name="",
        ))  # fmt: skip
    if convergence and convergence.get("master_pss_mb_with_agents"):
        out.append(Figure(
            group="memory",
            name=f"`nxmesh master`, {convergence['instances']} real agents connected",
            unit="MB", value=_stat(convergence["master_pss_mb_with_agents"]),
            baseline=None, baseline_name="",
        ))  # fmt: skip
    return out


def _apply(report: Mapping[str, Any]) -> list[Figure]:
    out = []
    for run in report.get("runs", []):
        figure = Figure(
            group="apply",
            name=f"{run['sites']:,} sites: receive -> new config serving",
            unit="ms",
            value=_ms(run["agent"]),
            baseline=_ms(run["raw"]),
            baseline_name="raw write + nginx -t + HUP + poll",
            goal="<= 1.15x raw + 20 ms",
            met=bool(run["goal_met"]),
            note=f"with the post-reload watch window: {run['agent_total']['median_ms']:.0f} ms",
        )
        out.append(figure)
    return out


def _convergence(report: Mapping[str, Any]) -> list[Figure]:
    nx = report.get("nxmesh", {}).get("serving_s")
    base = report.get("baseline_ansible", {}).get("serving_s")
    if not nx:
        return []
    speedup = report.get("speedup_ansible_over_nxmesh")
    return [Figure(
        group="convergence",
        name=f"{report['instances']} nginx: one change until every instance serves it",
        unit="s", value=_scaled(nx, 1.0), baseline=_scaled(base, 1.0),
        baseline_name="Ansible playbook (template + nginx -t + reload handler)",
        goal=">= 20x faster than Ansible (ratio <= 0.05)",
        met=report.get("goal", {}).get("met"),
        note="" if speedup is None else f"speed-up {speedup:.1f}x",
    )]  # fmt: skip


def _render(report: Mapping[str, Any]) -> list[Figure]:
    out = []
    for row in report.get("results", []):
        figure = Figure(
            group="render",
            name=f"{row['sites']:,} sites: render + digest",
            unit="s",
            value=_scaled(row["render"], 1.0),
            baseline=_scaled(row["nginx_t"], 1.0) if row.get("nginx_t") else None,
            baseline_name="nginx -t on the same bundle",
        )
        if row["sites"] == 10_000:
            figure.goal = "<= 1 s"
            figure.met = row["render"]["median"] <= 1.0
        out.append(figure)
    return out


def _idle(report: Mapping[str, Any], convergence: Mapping[str, Any] | None) -> list[Figure]:
    out = []
    base = report.get("idle_baseline_python")
    baseline = _stat(base["pss_mb"]) if base else None
    for key, label in (("idle", "every plugin loaded"),
                       ("idle_agent_only", "master-side plugins disabled")):  # fmt: skip
        idle = report.get(key)
        if not idle:
            continue
        value = _scaled(idle.get("pss_mb"), 1.0) or _stat(idle["pss_mb_max"])
        out.append(Figure(
            group="agent idle", name=f"masterless agent, {label}: PSS", unit="MB",
            value=value, baseline=baseline, baseline_name="bare Python interpreter",
            goal="<= 40 MB", met=value["max"] <= 40.0,
            note=f"CPU {idle['cpu_percent']:.2f} % of one core over {idle['seconds']:.0f} s",
        ))  # fmt: skip
    if convergence and convergence.get("agent_pss_mb"):
        values = [v for v in convergence["agent_pss_mb"] if v is not None]
        if values:
            ordered = sorted(values)
            median = ordered[len(ordered) // 2]
            out.append(Figure(
                group="agent idle",
                name=f"agent connected to its master over {convergence.get('transport', 'grpc')}"
                     f" ({len(values)} agents at rest): PSS",
                unit="MB", value=_stat(median, ordered[0], ordered[-1]), baseline=baseline,
                baseline_name="bare Python interpreter", goal="<= 40 MB",
                met=ordered[-1] <= 40.0,
                note="several identical agents share library pages: one alone is a bit more",
            ))  # fmt: skip
    return out


def _api(report: Mapping[str, Any]) -> list[Figure]:
    """bench/api_bench.py (issue 6): API throughput with agents connected, convergence."""
    out: list[Figure] = []
    throughput = report.get("throughput") or {}
    base = throughput.get("baseline") or {}
    agents = throughput.get("agents", "?")
    for name, data in (throughput.get("nxmesh") or {}).items():
        baseline = base.get("put") if name == "put_state" else base.get("get")
        out.append(
            Figure(
                group="api",
                name=f"{name} with {agents} agents connected (higher is better)",
                unit="req/s",
                value=_scaled(data, 1.0),
                baseline=_scaled(baseline, 1.0),
                baseline_name="bare Litestar",
                note=f"{data.get('errors', 0)} errors",
            )
        )
    conv = report.get("convergence") or {}
    if conv.get("fleet") and conv.get("baseline"):
        out.append(
            Figure(
                group="api",
                name=f"apply until {conv['fleet']['agents']} agents converged (sim + real)",
                unit="ms",
                value=_ms(conv["fleet"]["converged"]),
                baseline=_ms(conv["baseline"]["converged"]),
                baseline_name=f"the same with {conv['baseline']['agents']} agent",
            )
        )
    return out


def figures(results: Mapping[str, Mapping[str, Any]]) -> list[Figure]:
    """Every figure the loaded results hold, grouped as the summary shows them."""
    out: list[Figure] = []
    convergence = results.get("convergence")
    if "fanout" in results:
        out += _fanout(results["fanout"])
    if "apply" in results:
        out += _apply(results["apply"])
    if convergence:
        out += _convergence(convergence)
    if "render" in results:
        out += _render(results["render"])
    if "idle" in results:
        out += _idle(results["idle"], convergence)
    if "fanout" in results or convergence:
        out += _master_memory(results.get("fanout", {}), convergence)
    if "api" in results:
        out += _api(results["api"])
    return out


# ---------------------------------------------------------------------------------------
# Goals
# ---------------------------------------------------------------------------------------


def _all(values: Sequence[bool | None]) -> bool | None:
    if not values or any(v is None for v in values):
        return None
    return all(values)


def goals(
    results: Mapping[str, Mapping[str, Any]], chaos: Mapping[str, Any] | None = None
) -> list[Goal]:
    """The issue's goals, judged on `results` (and the chaos suite's summary)."""
    figs = figures(results)
    out: list[Goal] = []

    push = [f for f in figs if f.group == "fan-out" and f.name.startswith("5,000 agents")
            and f.unit == "s"]  # fmt: skip
    grpc = [f for f in push if "gRPC" in f.name and f.goal]
    out.append(Goal(
        "push to 5,000 agents <= 1.3x raw grpclib",
        ", ".join(f"{f.name.split(': ')[0]} {f.ratio:.2f}x" for f in push if f.ratio and f.goal)
        or "-",
        _all([f.met for f in grpc]) if grpc else None,
        "fanout.json",
        details=["gRPC is the agents' transport; WebSocket (the fallback) is shown for "
                 "reference and not part of the verdict"],
    ))  # fmt: skip

    runs = {(r["kind"], r["agents"]): r for r in results.get("fanout", {}).get("runs", [])}
    big = runs.get(("nxmesh", 10_000))
    if big:
        kb = big["memory"]["pss_kb_per_agent_connected"]
        measured = f"10,000 agents served; gRPC {kb:.0f} KB PSS per agent"
        for kind, label in (
            ("ws", "WebSocket"),
            ("wsapi", "WebSocket on the API listener"),
            ("raw", "raw grpclib"),
        ):
            if (kind, 10_000) in runs:
                other = runs[(kind, 10_000)]["memory"]["pss_kb_per_agent_connected"]
                measured += f", {label} {other:.0f} KB"
        met: bool | None = kb <= 60.0
    else:
        measured, met = "10,000 agents not run", None
    out.append(Goal(">= 10,000 agents per master at <= 60 KB each", measured, met,
                    "fanout.json",
                    details=["judged on gRPC, the agents' transport"]))  # fmt: skip

    applies = [f for f in figs if f.group == "apply"]
    out.append(Goal(
        "apply <= 1.15x raw + 20 ms",
        "; ".join(f"{f.name.split(':')[0]}: {f.value['median']:.0f} ms vs "  # type: ignore[index]
                  f"{f.baseline['median']:.0f} ms ({f.ratio:.2f}x)"  # type: ignore[index]
                  for f in applies) or "-",
        _all([f.met for f in applies]) if applies else None,
        "apply.json",
    ))  # fmt: skip

    conv = [f for f in figs if f.group == "convergence"]
    out.append(Goal(
        ">= 20x faster than the Ansible playbook on 10 instances",
        conv[0].note if conv and conv[0].note else "-",
        conv[0].met if conv else None,
        "convergence.json",
    ))  # fmt: skip

    render = [f for f in figs if f.group == "render" and f.goal]
    out.append(Goal(
        "render 10,000 sites <= 1 s",
        f"{render[0].value['median']:.3f} s" if render and render[0].value else "-",
        render[0].met if render else None,
        "render.json",
    ))  # fmt: skip

    idle = [f for f in figs if f.group == "agent idle"]
    out.append(Goal(
        "agent idle <= 40 MB PSS",
        "; ".join(f"{f.name.split(':')[0]}: {f.value['median']:.1f} MB"  # type: ignore[index]
                  for f in idle) or "-",
        _all([f.met for f in idle]) if idle else None,
        "idle.json, convergence.json",
    ))  # fmt: skip

    wrk = (chaos or {}).get("cases", {}).get("wrk_applies")
    if wrk and wrk.get("details", {}).get("agent/close"):
        close = wrk["details"]["agent/close"]
        out.append(Goal(
            "0 failed requests with Connection: close during applies",
            f"{close['errors']} errors in {close['requests']:,} requests "
            f"({wrk['details'].get('applies', '?')} applies)",
            close["errors"] == 0, "chaos/results/wrk_applies.json",
        ))  # fmt: skip
    else:
        out.append(Goal("0 failed requests with Connection: close during applies",
                        "chaos suite not run", None, "chaos/results"))  # fmt: skip

    if chaos and chaos.get("cases"):
        cases = chaos["cases"]
        failed = [name for name, case in cases.items() if not case.get("passed")]
        out.append(Goal(
            "nothing lost in any chaos case",
            f"{len(cases) - len(failed)}/{len(cases)} cases passed"
            + (f" (failed: {', '.join(failed)})" if failed else ""),
            not failed, "chaos/results/summary.json",
        ))  # fmt: skip
    else:
        out.append(Goal("nothing lost in any chaos case", "chaos suite not run", None,
                        "chaos/results"))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if unit == "s" and value < 1:
        return f"{value * 1000:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if abs(value) >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"


def _cell(s: Stat | None, unit: str) -> str:
    if not s:
        return "-"
    if s["min"] == s["max"]:
        return _fmt(s["median"], unit)
    return f"{_fmt(s['median'], unit)} ({_fmt(s['min'], unit)} to {_fmt(s['max'], unit)})"


def render_markdown(
    results: Mapping[str, Mapping[str, Any]],
    chaos: Mapping[str, Any] | None = None,
    *,
    plots: Sequence[str] = (),
) -> str:
    lines = ["# Benchmark summary", ""]
    lines.append(
        "Generated by `python -m bench.run` from the JSON files beside this one. Each figure "
        "is NxMesh's measurement next to a baseline measured **in the same run on the same "
        "machine**: medians with (min to max) over the repeats, and the ratio of medians "
        "(NxMesh / baseline; below 1 = faster or smaller). See `docs/benchmarks.md` for how "
        "to read it and the noise caveats."
    )
    lines.append("")
    machines = [r["machine"] for r in results.values() if r.get("machine")]
    if machines:
        m = dict(machines[0])
        m["nginx"] = next((x["nginx"] for x in machines if x.get("nginx")), None)
        lines.append(
            f"Machine: {m.get('cpus')} CPUs, {m.get('platform')}, Python {m.get('python')}, "
            f"{m.get('nginx') or 'nginx ?'}; load average when each benchmark started: "
            + ", ".join(
                f"{name} {r.get('machine', {}).get('load_average', '?')}"
                for name, r in results.items()
            )
        )
        lines.append("")
    runs = ", ".join(
        f"{name} {r.get('started_at') or r.get('generated_at') or r.get('measured_at') or '?'}"
        + (" (quick)" if r.get("quick") or r.get("config", {}).get("quick") else "")
        for name, r in results.items()
    )
    lines += [f"Runs: {runs}", ""]

    lines += ["## Goals", "", "| goal | measured | verdict | source |", "|---|---|---|---|"]
    for goal in goals(results, chaos):
        lines.append(f"| {goal.text} | {goal.measured} | {goal.verdict} | {goal.source} |")
    lines.append("")

    groups: dict[str, list[Figure]] = {}
    for figure in figures(results):
        groups.setdefault(figure.group, []).append(figure)
    for group, figs in groups.items():
        lines += [f"## {group}", "",
                  "| figure | NxMesh | baseline | ratio | goal | |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for f in figs:
            ratio = (
                "-"
                if f.ratio is None
                else (f"{f.ratio:.2f}x" if f.ratio >= 0.1 else f"{f.ratio:.3f}x")
            )
            verdict = {True: "met", False: "**not met**", None: ""}[f.met]
            base = f"{_cell(f.baseline, f.unit)} {f.baseline_name}" if f.baseline else "-"
            note = f" — {f.note}" if f.note else ""
            lines.append(f"| {f.name}{note} | {_cell(f.value, f.unit)} | {base} | {ratio} | "
                         f"{f.goal or '-'} | {verdict} |")  # fmt: skip
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def _bars(ax: Any, labels: Sequence[str], series: Mapping[str, Sequence[Stat | None]]) -> None:
    """Grouped bars of medians with min-max error bars."""
    width = 0.8 / max(1, len(series))
    for i, (name, stats) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        med = [s["median"] if s else 0.0 for s in stats]
        low = [s["median"] - s["min"] if s else 0.0 for s in stats]
        high = [s["max"] - s["median"] if s else 0.0 for s in stats]
        ax.bar(xs, med, width, label=name, yerr=[low, high], capsize=3)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def write_plots(results: Mapping[str, Mapping[str, Any]], directory: Path) -> list[str]:
    """One PNG per benchmark that has results; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fanout = results.get("fanout")
    if fanout and fanout.get("runs"):
        runs = {(r["kind"], r["agents"]): r for r in fanout["runs"]}
        counts = sorted({a for _, a in runs})
        sizes = list(next(iter(runs.values()))["sizes"])
        fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5 * (len(sizes) + 1), 4))
        for ax, size in zip(axes, sizes, strict=False):
            series = {
                _PLOTTED[kind]: [
                    _rounds_stat(runs[(kind, c)]["sizes"][size]["rounds"], "all_acked_s")
                    if (kind, c) in runs else None
                    for c in counts
                ]
                for kind in _PLOTTED
                if any((kind, c) in runs for c in counts)
            }  # fmt: skip
            _bars(ax, [f"{c:,} agents" for c in counts], series)
            ax.set_title(f"fan-out of a {size} version: time until all acked")
            ax.set_ylabel("seconds")
        ax = axes[-1]
        series = {
            _PLOTTED[kind]: [
                _stat(runs[(kind, c)]["memory"]["pss_kb_per_agent_connected"])
                if (kind, c) in runs else None
                for c in counts
            ]
            for kind in _PLOTTED
            if any((kind, c) in runs for c in counts)
        }  # fmt: skip
        _bars(ax, [f"{c:,}" for c in counts], series)
        ax.axhline(60, color="red", linestyle="--", linewidth=1, label="goal 60 KB")
        ax.set_title("master memory per agent (PSS)")
        ax.set_ylabel("KB per agent")
        ax.legend(fontsize=8)
        save(fig, "fanout.png")

    apply = results.get("apply")
    if apply and apply.get("runs"):
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{r['sites']:,} sites" for r in apply["runs"]]
        _bars(ax, labels, {
            "NxMesh agent": [_ms(r["agent"]) for r in apply["runs"]],
            "raw write + nginx -t + HUP": [_ms(r["raw"]) for r in apply["runs"]],
        })  # fmt: skip
        ax.set_title("apply: receive -> new configuration serving")
        ax.set_ylabel("ms")
        save(fig, "apply.png")

    conv = results.get("convergence")
    if conv and conv.get("nxmesh", {}).get("serving_s"):
        fig, ax = plt.subplots(figsize=(6, 4))
        base = conv.get("baseline_ansible", {}).get("serving_s")
        _bars(ax, [f"{conv['instances']} nginx instances"], {
            "NxMesh (master + agents)": [_scaled(conv["nxmesh"]["serving_s"], 1.0)],
            "Ansible playbook": [_scaled(base, 1.0)],
        })  # fmt: skip
        ax.set_yscale("log")
        ax.set_title("one change until every nginx serves it (log scale)")
        ax.set_ylabel("seconds")
        save(fig, "convergence.png")

    render = results.get("render")
    if render and render.get("results"):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = render["results"]
        _bars(ax, [f"{r['sites']:,} sites" for r in rows], {
            "render + digest": [_scaled(r["render"], 1.0) for r in rows],
            "nginx -t (same bundle)": [_scaled(r.get("nginx_t"), 1.0) for r in rows],
        })  # fmt: skip
        ax.set_yscale("log")
        ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="goal 1 s (10k sites)")
        ax.legend(fontsize=8)
        ax.set_title("render + digest vs nginx -t (log scale)")
        ax.set_ylabel("seconds")
        save(fig, "render.png")

    memory = [f for f in figures(results) if f.group in ("agent idle", "memory")]
    if memory:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        names = [f.name.replace(": PSS", "") for f in memory]
        values = [f.value["median"] if f.value else 0.0 for f in memory]
        bases = [f.baseline["median"] if f.baseline else 0.0 for f in memory]
        ys = range(len(memory))
        ax.barh([y + 0.2 for y in ys], values, 0.4, label="NxMesh")
        ax.barh([y - 0.2 for y in ys], bases, 0.4, label="baseline")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(names, fontsize=7)
        ax.axvline(40, color="red", linestyle="--", linewidth=1, label="agent goal 40 MB")
        ax.set_xlabel("PSS, MB")
        ax.set_title("process memory (PSS)")
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        save(fig, "memory.png")

    ratios = [f for f in figures(results) if f.ratio is not None]
    if ratios:
        fig, ax = plt.subplots(figsize=(12, max(3.0, 0.28 * len(ratios))))
        ys = range(len(ratios))
        colors = ["tab:green" if f.met else "tab:red" if f.met is False else "tab:blue"
                  for f in ratios]  # fmt: skip
        ax.barh(list(ys), [f.ratio or 0.0 for f in ratios], color=colors)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([f"{f.group}: {f.name}" for f in ratios], fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("NxMesh / baseline (log; green: goal met, red: missed, blue: no goal)")
        ax.set_title("every ratio to its baseline")
        ax.invert_yaxis()
        save(fig, "ratios.png")
    return written


def write_summary(
    directory: Path, chaos_summary: Path | None = None, *, plots: bool = True
) -> Path:
    """Read the results in `directory`; write SUMMARY.md, summary.json and the plots."""
    results = load_results(directory)
    chaos = None
    if chaos_summary is not None and chaos_summary.exists():
        chaos = json.loads(chaos_summary.read_text())
    written = write_plots(results, directory) if plots else []
    (directory / "summary.json").write_text(json.dumps({
        "figures": [f.as_dict() for f in figures(results)],
        "goals": [{**asdict(g), "verdict": g.verdict} for g in goals(results, chaos)],
        "plots": written,
    }, indent=2) + "\n")  # fmt: skip
    path = directory / "SUMMARY.md"
    path.write_text(render_markdown(results, chaos, plots=written))
    return path
