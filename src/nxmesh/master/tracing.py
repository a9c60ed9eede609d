"""Optional OpenTelemetry tracing (``pip install nxmesh[otel]``); a no-op without it.

`span` wraps API handlers and version creation. `inject_context` writes the current
trace context (W3C ``traceparent``/``tracestate``) into a dict — the master puts it in
the ``trace`` member of a ``version.created`` event payload, so whoever pushes that
version to agents can `extract_context` it and continue the same trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["extract_context", "inject_context", "span", "tracing_available"]

try:  # the otel extra is optional
    from opentelemetry import context as _otel_context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised only without the extra
    _trace = None  # type: ignore[assignment]

_TRACER_NAME = "nxmesh.master"


def tracing_available() -> bool:
    """Whether the OpenTelemetry API is installed."""
    return _trace is not None


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[None]:
    """A span named `name` around the block (nothing without OpenTelemetry)."""
    if _trace is None:
        yield
        return
    tracer = _trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(name, attributes=dict(attributes or {})):
        yield


def inject_context() -> dict[str, str]:
    """The current trace context as carrier headers (empty without a recording span)."""
    if _trace is None:
        return {}
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def extract_context(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Make the trace context in `carrier` current for the block (push path helper)."""
    if _trace is None or not carrier:
        yield
        return
    token = _otel_context.attach(_propagate.extract(dict(carrier)))
    try:
        yield
    finally:
        _otel_context.detach(token)
