"""The render benchmark harness runs end to end at tiny sizes, so it cannot rot.

No timing is asserted: this machine's speed is not a test result. The figures come from
running ``bench/render_bench.py`` itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from nxmesh.testing.services import require_binary

BENCH = Path(__file__).resolve().parents[2] / "bench" / "render_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestRenderBenchQuick:
    """bench/render_bench.py in quick mode: a report with every size, with and without nginx."""

    def test_report_without_nginx(self, bench: ModuleType, tmp_path: Path) -> None:
        """Each size gets render statistics and the JSON on disk matches what was returned."""
        out = tmp_path / "render.json"
        report = bench.main(
            ["--sizes", "2,12", "--repeats", "2", "--no-nginx", "--output", str(out)]
        )
        assert json.loads(out.read_text()) == report
        assert [r["sites"] for r in report["results"]] == [2, 12]
        for row in report["results"]:
            # nginx.conf, mime.types, upstreams, status, the servers of unknown names
            assert row["files"] == row["sites"] + 5
            assert row["render"]["repeats"] == 2
            assert row["render"]["min"] <= row["render"]["median"] <= row["render"]["max"]
            assert row["nginx_t"] is None
        assert report["goal"]["met"] is None  # 10,000 sites were not measured

    def test_report_with_nginx_t(self, bench: ModuleType, tmp_path: Path) -> None:
        """With nginx, the same bundle passes nginx -t (TLS placeholders included) and a
        ratio is reported."""
        require_binary("nginx")
        report = bench.main(
            [
                "--sizes",
                "11",
                "--repeats",
                "1",
                "--nginx-repeats",
                "1",
                "--output",
                str(tmp_path / "render.json"),
            ]
        )
        (row,) = report["results"]
        assert row["nginx_t"]["ok"], row["nginx_t"].get("message")
        assert row["ratio_render_to_nginx_t"] > 0

    def test_benchmark_state_is_valid(self, bench: ModuleType) -> None:
        """The generated state passes the model's cross-object checks (no dangling names)."""
        from nxmesh.core.model import check_state

        assert check_state(bench.build_state(25)) == []
