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
    "validate_certificate",
    "wait_until_served",
]
