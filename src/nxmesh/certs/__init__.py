"""Certificates for the fleet: upload validation, ACME issuance and renewal, distribution.

- `validate_certificate`: checks an uploaded certificate, chain and key (field-named
  errors); `check_state_certificates` checks sites against stored certificates.
- `AcmeClient` (+ `AccountKeyFile`, `open_acme_client`): account, orders, HTTP-01 and
  DNS-01 challenges, finalisation with a fresh key, chain download, revocation.
- `Http01Solver` / `ChallengeBoard`: HTTP-01 answered by the agents' own nginx from
  bundle files; `Dns01Solver`: DNS-01 through a `DnsProvider` plugin.
- `RenewalScheduler`: renews ahead of expiry on one master, with events, metrics and a
  health result.
- `CertificateDistributor` (master) and `AgentKeyVault` (agent): only the certificates an
  agent's sites use, keys encrypted on the agent's disk.

See ``docs/certificates.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh.core.lazy import lazy_exports

# Imported on first use: every process loads this plugin's entry point at start-up.
_EXPORTS = {
    "AccountKeyFile": "nxmesh.certs.acme_client",
    "AcmeAccount": "nxmesh.certs.acme_client",
    "AcmeAccountError": "nxmesh.certs.errors",
    "AcmeChallengeError": "nxmesh.certs.errors",
    "AcmeClient": "nxmesh.certs.acme_client",
    "AcmeConnectionError": "nxmesh.certs.errors",
    "AcmeError": "nxmesh.certs.errors",
    "AcmeIssuer": "nxmesh.certs.acme_client",
    "AcmeOrderError": "nxmesh.certs.errors",
    "AcmeRateLimitedError": "nxmesh.certs.errors",
    "AcmeTimeoutError": "nxmesh.certs.errors",
    "AgentKeyVault": "nxmesh.certs.distribution",
    "AgentMaterial": "nxmesh.certs.distribution",
    "CertificateCheck": "nxmesh.certs.validate",
    "CertificateConflictError": "nxmesh.certs.errors",
    "CertificateDistributor": "nxmesh.certs.distribution",
    "CertificateError": "nxmesh.certs.errors",
    "CertificateMaterial": "nxmesh.certs.distribution",
    "CertificateMetrics": "nxmesh.certs.renewal",
    "CertificateNeed": "nxmesh.certs.distribution",
    "CertsSettings": "nxmesh.certs.settings",
    "ChallengeBoard": "nxmesh.certs.http01",
    "ChallengeFailure": "nxmesh.certs.errors",
    "ChallengeSolver": "nxmesh.certs.acme_client",
    "Dns01Solver": "nxmesh.certs.dns01",
    "DnsProviderError": "nxmesh.certs.errors",
    "Http01Solver": "nxmesh.certs.http01",
    "IssuedCertificate": "nxmesh.certs.acme_client",
    "PendingChallenge": "nxmesh.certs.acme_client",
    "RenewalHealthCheck": "nxmesh.certs.renewal",
    "RenewalOutcome": "nxmesh.certs.renewal",
    "RenewalPolicy": "nxmesh.certs.renewal",
    "RenewalScheduler": "nxmesh.certs.renewal",
    "acme_needs": "nxmesh.certs.distribution",
    "agents_needing": "nxmesh.certs.distribution",
    "certificate_needs": "nxmesh.certs.distribution",
    "certs_settings": "nxmesh.certs.settings",
    "challenge_files": "nxmesh.certs.http01",
    "check_state_certificates": "nxmesh.certs.validate",
    "covers": "nxmesh.certs.validate",
    "dns_provider_from_settings": "nxmesh.certs.dns01",
    "generate_private_key": "nxmesh.certs.acme_client",
    "is_placeholder": "nxmesh.certs.distribution",
    "leader_lock": "nxmesh.certs.renewal",
    "open_acme_client": "nxmesh.certs.acme_client",
    "placeholder_material": "nxmesh.certs.distribution",
    "rewrap_account_keys": "nxmesh.certs.acme_client",
    "validate_certificate": "nxmesh.certs.validate",
    "wait_until_served": "nxmesh.certs.http01",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from nxmesh.certs.acme_client import (
        AccountKeyFile,
        AcmeAccount,
        AcmeClient,
        AcmeIssuer,
        ChallengeSolver,
        IssuedCertificate,
        PendingChallenge,
        generate_private_key,
        open_acme_client,
        rewrap_account_keys,
    )
    from nxmesh.certs.distribution import (
        AgentKeyVault,
        AgentMaterial,
        CertificateDistributor,
        CertificateMaterial,
        CertificateNeed,
        acme_needs,
        agents_needing,
        certificate_needs,
        is_placeholder,
        placeholder_material,
    )
    from nxmesh.certs.dns01 import Dns01Solver, dns_provider_from_settings
    from nxmesh.certs.errors import (
        AcmeAccountError,
        AcmeChallengeError,
        AcmeConnectionError,
        AcmeError,
        AcmeOrderError,
        AcmeRateLimitedError,
        AcmeTimeoutError,
        CertificateConflictError,
        CertificateError,
        ChallengeFailure,
        DnsProviderError,
    )
    from nxmesh.certs.http01 import ChallengeBoard, Http01Solver, challenge_files, wait_until_served
    from nxmesh.certs.renewal import (
        CertificateMetrics,
        RenewalHealthCheck,
        RenewalOutcome,
        RenewalPolicy,
        RenewalScheduler,
        leader_lock,
    )
    from nxmesh.certs.settings import CertsSettings, certs_settings
    from nxmesh.certs.validate import (
        CertificateCheck,
        check_state_certificates,
        covers,
        validate_certificate,
    )

__all__ = [
    "AccountKeyFile",
    "AcmeAccount",
    "AcmeAccountError",
    "AcmeChallengeError",
    "AcmeClient",
    "AcmeConnectionError",
    "AcmeError",
    "AcmeIssuer",
    "AcmeOrderError",
    "AcmeRateLimitedError",
    "AcmeTimeoutError",
    "AgentKeyVault",
    "AgentMaterial",
    "CertificateCheck",
    "CertificateConflictError",
    "CertificateDistributor",
    "CertificateError",
    "CertificateMaterial",
    "CertificateMetrics",
    "CertificateNeed",
    "CertsSettings",
    "ChallengeBoard",
    "ChallengeFailure",
    "ChallengeSolver",
    "Dns01Solver",
    "DnsProviderError",
    "Http01Solver",
    "IssuedCertificate",
    "PendingChallenge",
    "RenewalHealthCheck",
    "RenewalOutcome",
    "RenewalPolicy",
    "RenewalScheduler",
    "acme_needs",
    "agents_needing",
    "certificate_needs",
    "certs_settings",
    "challenge_files",
    "check_state_certificates",
    "covers",
    "dns_provider_from_settings",
    "generate_private_key",
    "is_placeholder",
    "leader_lock",
    "open_acme_client",
    "placeholder_material",
    "rewrap_account_keys",
    "validate_certificate",
    "wait_until_served",
]
