"""``[plugins.certs]``: the ACME server, challenges, renewal schedule and DNS provider.

Declared by the built-in ``certs`` plugin through ``nxmesh_add_settings``; read with
`certs_settings` (defaults when the plugin is blocked). Every value can also come from
``NXMESH_PLUGINS__CERTS__<FIELD>`` (tuples comma-separated).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings

__all__ = [
    "CHALLENGE_TYPES",
    "KEY_TYPES",
    "LETS_ENCRYPT",
    "LETS_ENCRYPT_STAGING",
    "SECTION",
    "CertsSettings",
    "certs_settings",
]

SECTION = "certs"
"""Name of the settings section (``[plugins.certs]``)."""

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
CHALLENGE_TYPES = ("http-01", "dns-01")
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")

ChallengeType = Literal["http-01", "dns-01"]
KeyType = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"]


def _https_url(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith(("https://", "http://")):
        raise ValueError(f"{attribute.name} must be an http(s):// URL, got {value!r}")


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value}")


def _not_negative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value}")


def _email(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value and (value.count("@") != 1 or any(c in value for c in " \t\r\n,<>")):
        raise ValueError(f"{attribute.name} must be one e-mail address, got {value!r}")


def _argv(_inst: object, attribute: attrs.Attribute[tuple[str, ...]], value: Any) -> None:
    if not all(isinstance(arg, str) and "\0" not in arg for arg in value):
        raise ValueError(f"{attribute.name} must be a list of strings (argv, no shell)")
    if value and not value[0]:
        raise ValueError(f"{attribute.name} must start with the program to run")


def _optional_path(value: object) -> Path | None:
    return None if value in (None, "") else Path(str(value))


def _tuple(value: Any) -> tuple[str, ...]:
    return tuple(value)


def _env(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    for item in value:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise ValueError(f"{attribute.name} entries must be NAME=value, got {item!r}")


@attrs.frozen(kw_only=True)
class CertsSettings:
    """``[plugins.certs]``: how the master obtains, renews and distributes certificates.

    `acme_directory`: the CA's directory URL (Let's Encrypt production by default; use
    `LETS_ENCRYPT_STAGING` while trying things out). `agree_tos` must be true to
    register: it is your agreement to the CA's terms of service. `ca_bundle` is a PEM
    file of CAs to trust for the ACME server's own HTTPS (a private CA, Pebble).
    `renew_before_days` before expiry a certificate is renewed, spread over
    `renew_jitter_hours` so a fleet's certificates do not all renew in one minute.
    `dns_command` is run (argv, never a shell) to publish DNS-01 records; see
    ``docs/certificates.md`` for its arguments and environment.
    """

    acme_directory: str = attrs.field(default=LETS_ENCRYPT, validator=_https_url)
    contact_email: str = attrs.field(default="", validator=_email)
    agree_tos: bool = False
    ca_bundle: Path | None = attrs.field(default=None, converter=_optional_path)
    account_key_file: Path | None = attrs.field(default=None, converter=_optional_path)
    key_type: KeyType = attrs.field(default="ec-p256", validator=attrs.validators.in_(KEY_TYPES))
    challenge: ChallengeType = attrs.field(
        default="http-01", validator=attrs.validators.in_(CHALLENGE_TYPES)
    )
    dns_provider: str = "command"
    dns_command: tuple[str, ...] = attrs.field(default=(), converter=_tuple, validator=_argv)
    dns_command_env: tuple[str, ...] = attrs.field(default=(), converter=_tuple, validator=_env)
    dns_command_timeout: float = attrs.field(default=60.0, validator=_positive)
    dns_propagation_seconds: float = attrs.field(default=30.0, validator=_not_negative)
    renew_before_days: float = attrs.field(default=30.0, validator=_positive)
    renew_jitter_hours: float = attrs.field(default=24.0, validator=_not_negative)
    expiry_warning_days: float = attrs.field(default=21.0, validator=_positive)
    check_interval: float = attrs.field(default=3600.0, validator=_positive)
    retry_initial: float = attrs.field(default=300.0, validator=_positive)
    retry_max: float = attrs.field(default=6 * 3600.0, validator=_positive)
    order_timeout: float = attrs.field(default=180.0, validator=_positive)
    poll_interval: float = attrs.field(default=1.0, validator=_positive)
    network_timeout: float = attrs.field(default=30.0, validator=_positive)


def certs_settings(settings: Settings) -> CertsSettings:
    """The ``certs`` section of `settings`, or the defaults when it is not declared."""
    section = settings.plugins.get(SECTION)
    return section if isinstance(section, CertsSettings) else CertsSettings()
