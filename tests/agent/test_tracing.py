"""The agent's apply spans: OpenTelemetry only once something in the process uses it."""

from __future__ import annotations

import subprocess
import sys

from nxmesh.testing.services import require_module

require_module("opentelemetry.sdk")

CODE = """
import sys
from nxmesh.agent.tracing import apply_span, tracing_available

assert tracing_available()
with apply_span("nxmesh.agent.apply", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}):
    pass
print("unconfigured imports opentelemetry:", "opentelemetry" in sys.modules)

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
with apply_span("nxmesh.agent.apply", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
                {"nxmesh.version": 3}):
    pass
(span,) = exporter.get_finished_spans()
print("span:", span.name, format(span.context.trace_id, "032x"), span.attributes["nxmesh.version"])
"""


def test_spans_need_a_configured_sdk_and_continue_the_masters_trace() -> None:
    """Without an SDK nothing is imported; with one, the apply joins the rollout's trace."""
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "unconfigured imports opentelemetry: False",
        f"span: nxmesh.agent.apply {'1' * 32} 3",
    ]
