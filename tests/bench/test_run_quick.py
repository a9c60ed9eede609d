"""``python -m bench.run``: the one command, its summary (ratios, goals) and its plots.

Each benchmark's own quick run is tested beside this file; here the runner runs one real
benchmark end to end, shows that a failing one fails the run, and the report logic is
fed canned results so its ratios and verdicts are checked exactly. No timing asserted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import report, run  # noqa: E402


def _fanout_run(kind: str, agents: int, acked: float, kb: float) -> dict[str, Any]:
    rounds = [{"all_acked_s": acked * f} for f in (0.9, 1.0, 1.2)]
    return {
        "kind": kind,
        "agents": agents,
        "memory": {
            "pss_kb_per_agent_connected": kb,
            "pss_before_mb": 50.0,
            "pss_connected_mb": 50.0 + kb * agents / 1024,
        },
        "sizes": {"2KB": {"rounds": rounds}},
    }


CANNED: dict[str, dict[str, Any]] = {
    "fanout": {
        "runs": [
            _fanout_run("nxmesh", 5000, 1.2, 58.0),
            _fanout_run("ws", 5000, 1.5, 50.0),
            _fanout_run("raw", 5000, 1.0, 40.0),
            _fanout_run("nxmesh", 10000, 2.6, 61.0),
            _fanout_run("raw", 10000, 2.0, 41.0),
        ]
    },
    "apply": {
        "runs": [
            {
                "sites": 10,
                "goal_met": True,
                "agent": {"median_ms": 30.0, "min_ms": 20.0, "max_ms": 50.0},
                "agent_total": {"median_ms": 180.0},
                "raw": {"median_ms": 20.0, "min_ms": 15.0, "max_ms": 30.0},
            }
        ]
    },
    "convergence": {
        "instances": 10,
        "transport": "grpc",
        "nxmesh": {"serving_s": {"median": 0.5, "min": 0.4, "max": 0.6}},
        "baseline_ansible": {"serving_s": {"median": 11.0, "min": 10.0, "max": 12.0}},
        "speedup_ansible_over_nxmesh": 22.0,
        "goal": {"met": True},
        "master_pss_mb_no_agents": 80.0,
        "master_pss_mb_with_agents": 82.0,
        "agent_pss_mb": [45.0, 46.0, 44.0],
    },
    "render": {
        "results": [
            {
                "sites": 10_000,
                "render": {"median": 0.8, "min": 0.7, "max": 0.9},
                "nginx_t": {"median": 4.0, "min": 3.9, "max": 4.1},
            }
        ]
    },
    "idle": {
        "idle": {
            "pss_mb": {"median": 39.0, "min": 38.0, "max": 39.5},
            "pss_mb_max": 39.5,
            "cpu_percent": 0.2,
            "seconds": 60,
        },
        "idle_baseline_python": {"pss_mb": 3.0},
    },
}


class TestReport:
    def test_ratios_are_value_over_baseline_medians(self) -> None:
        figs = {f.name: f for f in report.figures(CANNED)}
        acked = figs["5,000 agents, 2KB version, gRPC: all acked"]
        assert acked.ratio == pytest.approx(1.2)
        assert acked.value == {"median": 1.2, "min": pytest.approx(1.08), "max": 1.44}
        assert acked.met is True  # <= 1.3x
        assert figs["5,000 agents, 2KB version, WebSocket: all acked"].met is False
        conv = figs["10 nginx: one change until every instance serves it"]
        assert conv.ratio == pytest.approx(0.5 / 11.0)
        render = figs["10,000 sites: render + digest"]
        assert (render.ratio, render.met) == (pytest.approx(0.2), True)

    def test_goals_verdicts(self) -> None:
        verdicts = {g.text: g.met for g in report.goals(CANNED)}
        assert verdicts["push to 5,000 agents <= 1.3x raw grpclib"] is True  # gRPC only
        assert verdicts[">= 10,000 agents per master at <= 60 KB each"] is False  # 61 KB
        assert verdicts["apply <= 1.15x raw + 20 ms"] is True
        assert verdicts[">= 20x faster than the Ansible playbook on 10 instances"] is True
        assert verdicts["render 10,000 sites <= 1 s"] is True
        assert verdicts["agent idle <= 40 MB PSS"] is False  # the connected agents: 46 MB
        # Without the chaos suite's results, its goals are "not measured", never assumed.
        assert verdicts["nothing lost in any chaos case"] is None
        assert verdicts["0 failed requests with Connection: close during applies"] is None

    def test_chaos_results_feed_their_goals(self) -> None:
        chaos = {
            "cases": {
                "wrk_applies": {
                    "passed": True,
                    "details": {"applies": 30, "agent/close": {"errors": 0, "requests": 1000}},
                },
                "burst": {"passed": False},
            }
        }
        verdicts = {g.text: g.met for g in report.goals(CANNED, chaos)}
        assert verdicts["0 failed requests with Connection: close during applies"] is True
        assert verdicts["nothing lost in any chaos case"] is False

    def test_missing_benchmarks_are_not_measured(self) -> None:
        verdicts = {g.text: g.met for g in report.goals({})}
        assert set(verdicts.values()) == {None}

    def test_summary_and_plots(self, tmp_path: Path) -> None:
        for name, data in CANNED.items():
            (tmp_path / f"{name}.json").write_text(json.dumps(data))
        path = report.write_summary(tmp_path)
        text = path.read_text()
        assert "| push to 5,000 agents <= 1.3x raw grpclib |" in text
        assert "1.20x" in text
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert {
            "fanout.png",
            "apply.png",
            "convergence.png",
            "render.png",
            "memory.png",
            "ratios.png",
        } == set(summary["plots"])
        for plot in summary["plots"]:
            assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")
            assert f"![{plot}]({plot})" in text


@pytest.mark.nginx
class TestRunner:
    def test_one_benchmark_end_to_end(self, tmp_path: Path) -> None:
        """--only render --quick: its JSON, the summary and the plots are written."""
        assert run.main(["--quick", "--only", "render", "--out-dir", str(tmp_path)]) == 0
        assert json.loads((tmp_path / "render.json").read_text())["quick"] is True
        runs = json.loads((tmp_path / "runs.json").read_text())
        assert [(r["name"], r["ok"]) for r in runs["runs"]] == [("render", True)]
        assert "## render" in (tmp_path / "SUMMARY.md").read_text()
        assert (tmp_path / "render.png").exists()

    def test_a_failing_benchmark_fails_the_run(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A benchmark that crashes is reported and makes the command exit 1."""
        broken = run.Benchmark("render", "bench.no_such_module", (), (), 60, "broken")
        monkeypatch.setitem(run.BENCHMARKS, "render", broken)
        assert run.main(["--quick", "--only", "render", "--out-dir", str(tmp_path)]) == 1
        runs = json.loads((tmp_path / "runs.json").read_text())
        assert runs["runs"][0]["ok"] is False

    def test_unknown_names_are_refused(self) -> None:
        with pytest.raises(SystemExit):
            run.parse_args(["--only", "nope"])


class TestArguments:
    """The options bench.run shares with chaos.run (`bench.common.parse_suite_args`)."""

    def test_only_keeps_the_given_order(self) -> None:
        args = run.parse_args(["--only", "idle, render", "--out-dir", "x"])
        assert (args.names, args.out_dir) == (["idle", "render"], Path("x"))

    def test_default_out_dirs(self) -> None:
        assert run.parse_args([]).out_dir == run.RESULTS_DIR
        quick = run.parse_args(["--quick"]).out_dir
        try:
            assert quick.is_dir()
            assert quick.name.startswith("nxmesh-bench-quick-")
        finally:
            quick.rmdir()

    def test_unknown_name_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            run.parse_args(["--only", "render,nope"])
        assert info.value.code == 2
        assert "unknown benchmark(s) nope; known: render, apply" in capsys.readouterr().err
