"""The fan-out benchmark runs end to end in quick mode (50 agents), so it cannot rot.

No timing is asserted: this machine's speed is not a test result. The figures come from
running ``bench/fanout_bench.py`` itself (``bench/results/fanout.json``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fanout_bench.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("fanout") / "fanout.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--kinds",
            "nxmesh,ws,raw,plain",
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    data: dict[str, Any] = json.loads(output.read_text())
    return data


class TestFanoutBenchQuick:
    """Every kind runs in separate processes and every simulated agent acknowledges."""

    def test_every_kind_ran_with_fifty_agents(self, report: dict[str, Any]) -> None:
        """nxmesh (gRPC), ws (WebSocket), plain (uncompressed) and raw grpclib runs, each
        over TLS, 50 agents."""
        assert report["config"]["tls"] is True
        assert sorted((r["kind"], r["agents"]) for r in report["runs"]) == [
            ("nxmesh", 50),
            ("plain", 50),
            ("raw", 50),
            ("ws", 50),
        ]

    def test_every_size_was_pushed_and_timed(self, report: dict[str, Any]) -> None:
        """2 KB and 64 KB versions were pushed; per-agent latencies are consistent."""
        for run in report["runs"]:
            assert set(run["sizes"]) == {"2KB", "64KB"}
            for size in run["sizes"].values():
                for push in size["rounds"]:
                    assert 0 < push["p50_s"] <= push["p99_s"] <= push["all_acked_s"]
            assert run["sizes"]["64KB"]["version_bytes"] > 60 * 1024
            assert 2 * 1024 < run["sizes"]["2KB"]["version_bytes"] < 4 * 1024

    def test_nxmesh_sends_versions_compressed_raw_and_plain_do_not(
        self, report: dict[str, Any]
    ) -> None:
        """The master compresses the fleet-like versions (~10x at 64 KB); raw grpclib and
        the diagnostic ``plain`` kind send frames of the version's full size."""
        for run in report["runs"]:
            size = run["sizes"]["64KB"]
            if run["kind"] in ("nxmesh", "ws"):
                assert size["frame_bytes"] * 5 < size["version_bytes"]
            else:
                assert size["frame_bytes"] == size["version_bytes"]

    @pytest.mark.parametrize("kind", ["nxmesh", "ws", "plain"])
    def test_nxmesh_frames_were_all_accepted(self, report: dict[str, Any], kind: str) -> None:
        """The simulated agents' signed acks were all verified by the master."""
        nxmesh = next(r for r in report["runs"] if r["kind"] == kind)
        counters = nxmesh["counters"]
        assert counters["accepted"] >= 50 * 3  # registrations + one ack per size
        assert sum(v for k, v in counters.items() if k != "accepted") == 0

    def test_memory_and_ratios_are_reported(self, report: dict[str, Any]) -> None:
        """Memory per agent and nxmesh/raw ratios are in the report."""
        for run in report["runs"]:
            assert run["memory"]["pss_kb_per_agent_connected"] != 0
            assert run["memory"]["pss_connected_mb"] > 0
        for key in ("ratios_nxmesh_over_raw", "ratios_ws_over_raw", "ratios_plain_over_raw"):
            ratios = report[key]["50"]
            assert set(ratios) >= {"2KB", "64KB", "memory_connected_pss"}
            assert ratios["2KB"]["all_acked"] > 0

    def test_both_processes_cpu_is_reported(self, report: dict[str, Any]) -> None:
        """Each push records the master's and the agent simulator's CPU seconds; a ratio
        over a baseline that read 0 (psutil counts the other process in 10 ms ticks) is
        None, not a division by zero."""
        for run in report["runs"]:
            for size in run["sizes"].values():
                assert size["agents_cpu_median_s"] >= 0
                assert all(push["agents_cpu_s"] >= 0 for push in size["rounds"])
        for label in ("2KB", "64KB"):
            ratio = report["ratios_nxmesh_over_raw"]["50"][label]["agents_cpu"]
            assert ratio is None or ratio >= 0


def test_a_zero_cpu_baseline_gives_no_ratio() -> None:
    """`summarize` turns a baseline of 0 CPU seconds into no ratio."""
    sys.path.insert(0, str(BENCH.parent.parent))
    from bench.fanout_bench import summarize

    def run(kind: str, agents_cpu: float) -> dict[str, Any]:
        size = {
            "all_acked_median_s": 1.0,
            "p99_median_s": 1.0,
            "master_cpu_median_s": 1.0,
            "agents_cpu_median_s": agents_cpu,
        }
        return {
            "kind": kind,
            "agents": 50,
            "sizes": {"2KB": size, "64KB": size},
            "memory": {"pss_kb_per_agent_connected": 1.0, "rss_kb_per_agent_connected": 1.0},
        }

    ratios = summarize([run("nxmesh", 0.02), run("raw", 0.0)])["ratios_nxmesh_over_raw"]["50"]
    assert ratios["2KB"]["agents_cpu"] is None
    ratios = summarize([run("nxmesh", 0.02), run("raw", 0.01)])["ratios_nxmesh_over_raw"]["50"]
    assert ratios["2KB"]["agents_cpu"] == pytest.approx(2.0)
