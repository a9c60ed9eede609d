"""Optional OpenTelemetry spans around the agent's applies (``pip install nxmesh[otel]``).

An update from the master carries the rollout's W3C trace context (``traceparent``,
``tracestate``) in `PendingApply.trace`; `apply_span` continues that trace, so one trace
runs from the API call that stored the version, through the master's push, to each
agent's apply. Without OpenTelemetry installed (or without a configured SDK) it does
nothing.

The API is imported only once something in the process has imported OpenTelemetry (an
SDK being configured, auto-instrumentation) or names a tracer provider in the
environment: until then every span would be a no-op, and the import is ~0.5 MB of
every idle agent.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["apply_span", "tracing_available"]

_TRACER_NAME = "nxmesh.agent"


def tracing_available() -> bool:
    """Whether the OpenTelemetry API is installed (asked of its metadata: no import)."""
    try:
        importlib.metadata.distribution("opentelemetry-api")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - without the extra
        return False
    return True


def _configured() -> bool:
    # Configuring an SDK imports opentelemetry; OTEL_PYTHON_TRACER_PROVIDER makes the API
    # load one by itself on first use.
    return "opentelemetry" in sys.modules or "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


@contextlib.contextmanager
def apply_span(
    name: str, trace: Mapping[str, str] | None, attributes: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """A span named `name` for the block, child of the trace context in `trace`."""
    if not _configured():
        yield
        return
    try:  # the otel extra is optional
        from opentelemetry import context as otel_context
        from opentelemetry import propagate
        from opentelemetry import trace as otel_trace
    except ImportError:  # pragma: no cover - exercised only without the extra
        yield
        return
    token = otel_context.attach(propagate.extract(dict(trace))) if trace else None
    try:
        tracer = otel_trace.get_tracer(_TRACER_NAME)
        with tracer.start_as_current_span(name, attributes=dict(attributes or {})):
            yield
    finally:
        if token is not None:
            otel_context.detach(token)
