"""NxMesh: run a fleet of nginx servers from one control plane.

Plugin authors need only this module::

    from nxmesh import hookimpl

    @hookimpl
    def nxmesh_register_health_checks():
        return [MyCheck]
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from nxmesh.core.bundle import Bundle
from nxmesh.core.errors import (
    ConfigurationError,
    DuplicateProviderError,
    NxMeshError,
    PluginLoadError,
    Problem,
    ProviderNotFoundError,
    ValidationError,
)
from nxmesh.core.events import Event
from nxmesh.core.markers import hookimpl, hookspec
from nxmesh.core.model import (
    Agent,
    ApplyReport,
    CertificateRef,
    ConfigVersion,
    DesiredState,
    Header,
    HealthReport,
    HealthResult,
    LabelSelector,
    Listener,
    Location,
    PendingApply,
    Redirect,
    Return,
    Site,
    TLSConfig,
    Upstream,
    UpstreamServer,
)

try:
    __version__ = version("nxmesh")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Agent",
    "ApplyReport",
    "Bundle",
    "CertificateRef",
    "ConfigVersion",
    "ConfigurationError",
    "DesiredState",
    "DuplicateProviderError",
    "Event",
    "Header",
    "HealthReport",
    "HealthResult",
    "LabelSelector",
    "Listener",
    "Location",
    "NxMeshError",
    "PendingApply",
    "PluginLoadError",
    "Problem",
    "ProviderNotFoundError",
    "Redirect",
    "Return",
    "Site",
    "TLSConfig",
    "Upstream",
    "UpstreamServer",
    "ValidationError",
    "__version__",
    "hookimpl",
    "hookspec",
]
