"""Optional OpenTelemetry spans around the agent's applies (``pip install nxmesh[otel]``).

An update from the master carries the rollout's W3C trace context (``traceparent``,
``tracestate``) in `PendingApply.trace`; `apply_span` continues that trace, so one trace
runs from the API call that stored the version, through the master's push, to each
agent's apply. Without OpenTelemetry installed (or without a configured SDK) it does
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["apply_span", "tracing_available"]

try:  # the otel extra is optional
    from opentelemetry import context as _otel_context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised only without the extra
    _trace = None  # type: ignore[assignment]

_TRACER_NAME = "nxmesh.agent"


def tracing_available() -> bool:
    """Whether the OpenTelemetry API is installed."""
    return _trace is not None


@contextlib.contextmanager
def apply_span(
    name: str, trace: Mapping[str, str] | None, attributes: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """A span named `name` for the block, child of the trace context in `trace`."""
    if _trace is None:
        yield
        return
    token = _otel_context.attach(_propagate.extract(dict(trace))) if trace else None
    try:
        tracer = _trace.get_tracer(_TRACER_NAME)
        with tracer.start_as_current_span(name, attributes=dict(attributes or {})):
            yield
    finally:
        if token is not None:
            _otel_context.detach(token)
