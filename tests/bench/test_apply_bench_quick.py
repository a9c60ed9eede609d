"""The apply benchmark harness runs end to end in quick mode, so it cannot rot.

No timing is asserted: this machine's speed is not a test result. The figures come from
running ``bench/apply_bench.py`` itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "apply_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("apply_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.nginx
class TestApplyBenchQuick:
    """bench/apply_bench.py --quick: both sides measured for each size, JSON written."""

    def test_quick_run_reports_agent_and_baseline(
        self, bench: ModuleType, nginx_binary: str, tmp_path: Path
    ) -> None:
        """Each size has agent, agent_total and raw figures, a ratio and the goal verdict."""
        out = tmp_path / "apply.json"
        results = bench.main(
            ["--quick", "--sites", "3", "--rounds", "2", "--nginx", nginx_binary, "--out", str(out)]
        )
        assert json.loads(out.read_text()) == results
        [run] = results["runs"]
        assert run["sites"] == 3
        for side in ("agent", "agent_total", "raw"):
            assert len(run[side]["samples_ms"]) == 2
            assert run[side]["min_ms"] <= run[side]["median_ms"] <= run[side]["max_ms"]
        assert run["agent_total"]["median_ms"] >= run["agent"]["median_ms"]
        assert run["ratio"] > 0
        assert isinstance(run["goal_met"], bool)
        assert {"stage", "test", "swap", "reload", "confirm"} <= set(run["agent_stage_medians_ms"])
