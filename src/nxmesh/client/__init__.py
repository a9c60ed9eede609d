"""A small typed client of the master's REST API, and where the CLI keeps its logins.

::

    from nxmesh.client import Client, CredentialStore

    store = CredentialStore.default()
    with Client.from_store(store) as client:       # the profile `nxmesh login` saved
        print([v.number for v in client.list_versions("default")])

`Client` (sync, httpx) rotates refresh tokens on its own and saves them to the store;
errors are `ClientError` subclasses whose ``exit_code`` is what ``nxmesh`` exits with.
"""

from __future__ import annotations

from nxmesh.client.api import DEFAULT_URL, Client, NotLoggedInError, normalize_url
from nxmesh.client.credentials import (
    DEFAULT_PROFILE,
    ENV_CONFIG_HOME,
    CredentialsError,
    CredentialStore,
    Profile,
    config_dir,
)
from nxmesh.client.errors import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ApiError,
    AuthError,
    ClientError,
    ConflictError,
    FieldError,
    InvalidError,
    NotFoundError,
    ServerError,
    UnreachableError,
)

__all__ = [
    "DEFAULT_PROFILE",
    "DEFAULT_URL",
    "ENV_CONFIG_HOME",
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "ApiError",
    "AuthError",
    "Client",
    "ClientError",
    "ConflictError",
    "CredentialStore",
    "CredentialsError",
    "FieldError",
    "InvalidError",
    "NotFoundError",
    "NotLoggedInError",
    "Profile",
    "ServerError",
    "UnreachableError",
    "config_dir",
    "normalize_url",
]
