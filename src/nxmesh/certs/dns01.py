"""DNS-01: prove control of a domain with a TXT record, published by a DNS provider plugin.

DNS-01 is the only way to a wildcard certificate and works for names no agent serves on
port 80 yet. Providers are plugins (``nxmesh_register_dns_providers``, protocol
`nxmesh.core.interfaces.DnsProvider`); the built-in ``command`` provider runs a program
you configure (an nsupdate script, your DNS host's CLI).

`Dns01Solver` publishes every TXT record of an order, waits ``dns_propagation_seconds``
for secondaries to catch up, and removes the records again after validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import structlog

from nxmesh.certs.acme_client import PendingChallenge
from nxmesh.certs.settings import certs_settings
from nxmesh.core.errors import ConfigurationError, ProviderNotFoundError
from nxmesh.core.registry import from_settings_or

if TYPE_CHECKING:
    from nxmesh.core.interfaces import DnsProvider
    from nxmesh.core.registry import ProviderRegistries
    from nxmesh.core.settings import Settings

__all__ = ["Dns01Solver", "dns_provider_from_settings"]

log = structlog.get_logger("nxmesh.certs.dns01")


class Dns01Solver:
    """Solves DNS-01 through a `DnsProvider`.

    :param provider: publishes and removes TXT records.
    :param propagation_seconds: wait after publishing, before the CA is told to look.
    """

    challenge_type: ClassVar[str] = "dns-01"

    def __init__(self, provider: DnsProvider, *, propagation_seconds: float = 0.0) -> None:
        self.provider = provider
        self.propagation_seconds = propagation_seconds

    async def present(self, challenges: Sequence[PendingChallenge]) -> None:
        added: list[PendingChallenge] = []
        try:
            for challenge in challenges:
                await self.provider.add_txt(challenge.record_name, challenge.txt_value)
                added.append(challenge)
                log.info("dns-01 record published", record=challenge.record_name)
        except BaseException:
            # The order is abandoned: take back what was published so far.
            with anyio.CancelScope(shield=True):
                await self.cleanup(added)
            raise
        if self.propagation_seconds:
            await anyio.sleep(self.propagation_seconds)

    async def cleanup(self, challenges: Sequence[PendingChallenge]) -> None:
        for challenge in challenges:
            try:
                await self.provider.remove_txt(challenge.record_name, challenge.txt_value)
            except Exception as exc:  # one stale record must not keep the others
                log.warning(
                    "dns-01 record removal failed",
                    record=challenge.record_name,
                    error=str(exc),
                    error_type=type(exc).__name__,
                )


def dns_provider_from_settings(settings: Settings, registries: ProviderRegistries) -> DnsProvider:
    """The provider ``[plugins.certs] dns_provider`` names, built from the settings.

    :raises ConfigurationError: no plugin registers a provider by that name, or the
        provider rejects its settings.
    """
    name = certs_settings(settings).dns_provider
    try:
        cls: Any = registries["dns_provider"].get(name)
    except ProviderNotFoundError as exc:
        raise ConfigurationError(f"[plugins.certs] dns_provider: {exc}") from None
    provider: DnsProvider = from_settings_or(cls, settings, cls)
    return provider
