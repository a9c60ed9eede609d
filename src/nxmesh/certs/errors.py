"""Errors of certificate management: ACME, DNS providers, distribution.

Every error derives from `CertificateError` (an `NxMeshError`), so callers catch one
class; the ACME ones carry what the CA said (`AcmeError.acme_type`, `AcmeError.detail`)
and, for rate limits, when to try again (`AcmeRateLimitedError.retry_at`). Messages name
the domains and never contain key material.
"""

from __future__ import annotations

from collections.abc import Sequence

from nxmesh.core.errors import NxMeshError

__all__ = [
    "AcmeAccountError",
    "AcmeChallengeError",
    "AcmeConnectionError",
    "AcmeError",
    "AcmeOrderError",
    "AcmeRateLimitedError",
    "AcmeTimeoutError",
    "CertificateConflictError",
    "CertificateError",
    "ChallengeFailure",
    "DnsProviderError",
]

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"


class CertificateError(NxMeshError):
    """Base class of every certificate-management error."""


class CertificateConflictError(CertificateError):
    """An ACME certificate would replace an uploaded one of the same name (or vice versa)."""


class AcmeError(CertificateError):
    """The ACME server refused a request or the exchange failed.

    :ivar acme_type: the problem type the CA sent (``urn:ietf:params:acme:error:...``),
        or ``""`` when the failure happened before the CA answered.
    :ivar detail: the CA's own explanation, as sent.
    :ivar domains: the names the request was about.
    """

    def __init__(
        self,
        message: str,
        *,
        acme_type: str = "",
        detail: str = "",
        domains: Sequence[str] = (),
    ) -> None:
        self.acme_type = acme_type
        self.detail = detail
        self.domains = tuple(domains)
        super().__init__(message)

    @property
    def code(self) -> str:
        """The short problem code (``rateLimited``, ``rejectedIdentifier``...) or ``""``."""
        if self.acme_type.startswith(ACME_ERROR_PREFIX):
            return self.acme_type[len(ACME_ERROR_PREFIX) :]
        return ""


class AcmeConnectionError(AcmeError):
    """The ACME server could not be reached (refused, DNS, timeout, TLS verification)."""


class AcmeAccountError(AcmeError):
    """The account could not be registered or found (terms not agreed, bad contact...)."""


class AcmeOrderError(AcmeError):
    """The CA refused the order or marked it invalid (a name it will not issue for...)."""


class AcmeTimeoutError(AcmeError):
    """An authorization or the order did not finish within the order timeout."""


class AcmeRateLimitedError(AcmeError):
    """The CA rate-limited us (``rateLimited``); do not retry before `retry_at`.

    :ivar retry_at: seconds since the epoch from the ``Retry-After`` header, or None
        when the CA did not say (the caller then backs off on its own schedule).
    """

    def __init__(
        self,
        message: str,
        *,
        retry_at: float | None = None,
        acme_type: str = "",
        detail: str = "",
        domains: Sequence[str] = (),
    ) -> None:
        self.retry_at = retry_at
        super().__init__(message, acme_type=acme_type, detail=detail, domains=domains)


class ChallengeFailure:
    """Why one domain's challenge failed, as the CA reported it."""

    __slots__ = ("acme_type", "challenge", "detail", "domain")

    def __init__(self, domain: str, challenge: str, acme_type: str, detail: str) -> None:
        self.domain = domain
        self.challenge = challenge
        self.acme_type = acme_type
        self.detail = detail

    def __repr__(self) -> str:
        return f"ChallengeFailure({self.domain!r}, {self.challenge!r}, {self.acme_type!r})"

    def __str__(self) -> str:
        code = self.acme_type.removeprefix(ACME_ERROR_PREFIX) or "error"
        return f"{self.domain}: {self.challenge} challenge failed ({code}): {self.detail}"


class AcmeChallengeError(AcmeError):
    """The CA could not validate control of one or more domains.

    :ivar failures: one `ChallengeFailure` per failed domain.
    """

    def __init__(
        self,
        message: str,
        *,
        failures: Sequence[ChallengeFailure] = (),
        domains: Sequence[str] = (),
    ) -> None:
        self.failures = tuple(failures)
        if self.failures:
            message = message + "\n" + "\n".join(f"  - {f}" for f in self.failures)
        first = self.failures[0] if self.failures else None
        super().__init__(
            message,
            acme_type=first.acme_type if first else "",
            detail=first.detail if first else "",
            domains=domains,
        )


class DnsProviderError(CertificateError):
    """A DNS provider could not publish or remove a challenge record.

    :ivar stderr: what the provider's command wrote to stderr (truncated), if any.
    :ivar returncode: the command's exit status; None when it timed out or did not start.
    """

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None) -> None:
        self.stderr = stderr
        self.returncode = returncode
        if stderr.strip():
            message = f"{message}; stderr: {stderr.strip()}"
        super().__init__(message)
