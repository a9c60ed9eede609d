"""The reference master app: REST API, auth and RBAC, composed from plugins.

Public entry points (imported on first use, so loading the ``master`` plugin stays
cheap for every CLI start):

* `open_services` / `MasterServices` — everything a master process shares, from settings;
* `build_app` — the Litestar ASGI application (OpenAPI at ``/openapi.json``);
* `serve_api` / `run_master` — hypercorn on asyncio or trio, inside the core runtime;
* `Orchestrator` / `NoopOrchestrator` — what the API tells the rollout machinery;
* `ConfigChanges` — the one way to change desired state (validate, sign, store, announce).

See ``docs/api.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nxmesh.master.app import (
        AgentHealthCache,
        MasterServices,
        NoopOrchestrator,
        Orchestrator,
        build_app,
        open_services,
    )
    from nxmesh.master.changes import ConfigChanges
    from nxmesh.master.server import run_master, serve_api

_MODULES = {
    "AgentHealthCache": "app",
    "ConfigChanges": "changes",
    "MasterServices": "app",
    "NoopOrchestrator": "app",
    "Orchestrator": "app",
    "build_app": "app",
    "open_services": "app",
    "run_master": "server",
    "serve_api": "server",
}

__all__ = [
    "AgentHealthCache",
    "ConfigChanges",
    "MasterServices",
    "NoopOrchestrator",
    "Orchestrator",
    "build_app",
    "open_services",
    "run_master",
    "serve_api",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
