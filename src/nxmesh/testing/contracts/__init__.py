"""Contract suites: one class per provider kind, reused by built-in and third-party providers.

Subclass a contract in your test module and provide the fixture it names; every test of
the contract then runs against your provider (on asyncio and trio for async providers).
"""

from nxmesh.testing.contracts.auth import AuthenticatorContract
from nxmesh.testing.contracts.deployment import DeploymentModeContract
from nxmesh.testing.contracts.driver import NginxDriverContract
from nxmesh.testing.contracts.eventbus import EventBusContract
from nxmesh.testing.contracts.health import HealthCheckContract
from nxmesh.testing.contracts.renderer import RendererContract
from nxmesh.testing.contracts.storage import StorageContract
from nxmesh.testing.contracts.transport import TransportContract

__all__ = [
    "AuthenticatorContract",
    "DeploymentModeContract",
    "EventBusContract",
    "HealthCheckContract",
    "NginxDriverContract",
    "RendererContract",
    "StorageContract",
    "TransportContract",
]
