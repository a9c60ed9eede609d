"""Call the observer hooks with the isolation their specs promise.

An observer's exception is logged and never changes the outcome or starves the other
observers, so these helpers call each implementation on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pluggy
import structlog

from nxmesh.core.events import Event
from nxmesh.core.model import ApplyReport, PendingApply

log = structlog.get_logger("nxmesh.observers")


def _call_each(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    caller = getattr(pm.hook, hook_name)
    for impl in reversed(caller.get_hookimpls()):
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception:  # an observer's bug must not stop the others
            log.exception("observer hook failed", hook=hook_name, plugin=impl.plugin_name)


def apply_veto(pm: pluggy.PluginManager, update: PendingApply) -> str | None:
    """Every veto reason from ``nxmesh_before_apply`` joined by "; ", or None to go ahead."""
    reasons = [r for r in pm.hook.nxmesh_before_apply(update=update) if r]
    return "; ".join(reasons) if reasons else None


def notify_after_apply(pm: pluggy.PluginManager, report: ApplyReport) -> None:
    """Tell every ``nxmesh_after_apply`` observer the outcome."""
    _call_each(pm, "nxmesh_after_apply", report=report)


def dispatch_event(pm: pluggy.PluginManager, event: Event) -> None:
    """Deliver an event to every ``nxmesh_on_event`` observer."""
    _call_each(pm, "nxmesh_on_event", event=event)


def api_routes(pm: pluggy.PluginManager) -> Sequence[Any]:
    """Every extra route handler plugins contribute, in plugin order."""
    return [route for routes in reversed(pm.hook.nxmesh_api_routes()) for route in routes or ()]
