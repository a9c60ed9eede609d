"""The reference NxMesh agent: applies configurations to the nginx beside it.

Parts (each its own module, each usable alone):

- `Applier` — one apply end to end: veto hook, verify, render, driver, hooks, cache.
- `Coalescer` — many updates in, few reloads out; the newest wins; rate-limited.
- `AgentCache` — the local last-known-good entry (sealed, verified) for island mode.
- `Watchdog` — drift detection (revert or report) and nginx restarts with backoff.
- `HealthMonitor` — health checks on an interval and on change → `HealthReport`.
- `AgentMetrics` — Prometheus metrics on a private registry, served on loopback.
- `StateFileSource` — masterless mode: a desired-state file as the source of updates.
- `MasterLink` — the protocol a transport implements to connect the agent to a master.
- `AgentApp` / `run_agent` — all of the above composed from plugins and settings.
"""

from typing import TYPE_CHECKING

from nxmesh.core.lazy import lazy_exports

# Imported on first use: plugins import this package's submodules (the reload driver
# needs `nxmesh.agent.events`, `.layout`...), which must not load the whole agent — `app`
# imports those plugins back. Masterless mode also brings PyYAML.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AGENT": ".app",
        "AgentApp": ".app",
        "AgentTuning": ".app",
        "choose_mode": ".app",
        "run_agent": ".app",
        "Applier": ".applier",
        "AgentCache": ".cache",
        "CacheEntry": ".cache",
        "CacheError": ".cache",
        "Coalescer": ".coalescer",
        "EventRecorder": ".events",
        "HealthMonitor": ".health",
        "NginxLayout": ".layout",
        "AgentHello": ".link",
        "AgentSession": ".link",
        "MasterLink": ".link",
        "StateFileSource": ".masterless",
        "load_update": ".masterless",
        "AgentMetrics": ".metrics",
        "serve_metrics": ".metrics",
        "pending_from_version": ".verify",
        "sign_update": ".verify",
        "update_signing_payload": ".verify",
        "verify_update": ".verify",
        "BackoffPolicy": ".watchdog",
        "Drift": ".watchdog",
        "Watchdog": ".watchdog",
    },
)

if TYPE_CHECKING:
    from nxmesh.agent.app import AGENT, AgentApp, AgentTuning, choose_mode, run_agent
    from nxmesh.agent.applier import Applier
    from nxmesh.agent.cache import AgentCache, CacheEntry, CacheError
    from nxmesh.agent.coalescer import Coalescer
    from nxmesh.agent.events import EventRecorder
    from nxmesh.agent.health import HealthMonitor
    from nxmesh.agent.layout import NginxLayout
    from nxmesh.agent.link import AgentHello, AgentSession, MasterLink
    from nxmesh.agent.masterless import StateFileSource, load_update
    from nxmesh.agent.metrics import AgentMetrics, serve_metrics
    from nxmesh.agent.verify import (
        pending_from_version,
        sign_update,
        update_signing_payload,
        verify_update,
    )
    from nxmesh.agent.watchdog import BackoffPolicy, Drift, Watchdog

__all__ = [
    "AGENT",
    "AgentApp",
    "AgentCache",
    "AgentHello",
    "AgentMetrics",
    "AgentSession",
    "AgentTuning",
    "Applier",
    "BackoffPolicy",
    "CacheEntry",
    "CacheError",
    "Coalescer",
    "Drift",
    "EventRecorder",
    "HealthMonitor",
    "MasterLink",
    "NginxLayout",
    "StateFileSource",
    "Watchdog",
    "choose_mode",
    "load_update",
    "pending_from_version",
    "run_agent",
    "serve_metrics",
    "sign_update",
    "update_signing_payload",
    "verify_update",
]
