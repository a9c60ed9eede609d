"""The API benchmark harness runs end to end in quick mode, so it cannot rot.

No timing is asserted: this machine's speed is not a test result. The figures come from
running ``bench/api_bench.py`` itself.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "api_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("api_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _well_formed(figure: dict[str, object]) -> None:
    assert figure["n"] >= 1
    assert figure["min"] <= figure["median"] <= figure["max"]  # type: ignore[operator]


@pytest.mark.nginx
class TestApiBenchQuick:
    """bench/api_bench.py --quick: both parts measured, ratios computed, JSON written."""

    def test_quick_run_reports_throughput_and_convergence(
        self, bench: ModuleType, nginx_binary: str, tmp_path: Path
    ) -> None:
        out = tmp_path / "api.json"
        results = bench.main(
            ["--quick", "--agents", "3", "--converge-agents", "2", "--rounds", "1",
             "--duration", "0.5", "--nginx", nginx_binary, "--out", str(out)]
        )  # fmt: skip
        assert json.loads(out.read_text()) == json.loads(json.dumps(results, default=str))
        t = results["throughput"]
        assert t["agents_online"] == 3
        for name in (*bench.READS, "put_state"):
            _well_formed(t["nxmesh"][name])
            assert t["ratios"][name] > 0
        _well_formed(t["baseline"]["get"])
        _well_formed(t["baseline"]["put"])
        c = results["convergence"]
        assert c["baseline"]["agents"] == 1
        assert c["fleet"]["agents"] == 3
        for key in ("baseline", "fleet"):
            assert c[key]["converged"]["median_ms"] >= c[key]["apply"]["min_ms"] > 0
        assert c["ratio"] > 0
