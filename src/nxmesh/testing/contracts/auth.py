"""Behaviour every authenticator provides."""

from __future__ import annotations

import pytest

from nxmesh.core.interfaces import Authenticator, Credentials


class AuthenticatorContract:
    """Provide ``authenticator`` and ``foreign_credentials`` (credentials of a kind the
    authenticator does not handle, so the chain moves on)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def authenticator(self) -> Authenticator:
        raise NotImplementedError("subclasses provide authenticator")

    @pytest.fixture
    def foreign_credentials(self) -> Credentials:
        return Credentials(scheme="x-nxmesh-contract-unknown", values={"v": "1"})

    def test_is_an_authenticator(self, authenticator: Authenticator) -> None:
        """The provider matches the protocol and has a name."""
        assert isinstance(authenticator, Authenticator)
        assert authenticator.name

    async def test_unrecognised_credentials_pass_to_the_next_link(
        self, authenticator: Authenticator, foreign_credentials: Credentials
    ) -> None:
        """Credentials of a foreign kind give None, not an error."""
        assert await authenticator.authenticate(foreign_credentials) is None

    def test_credential_values_stay_out_of_repr(self) -> None:
        """Credentials never show their secret values in repr (logs, tracebacks)."""
        creds = Credentials(scheme="password", values={"password": "hunter2-secret"})
        assert "hunter2-secret" not in repr(creds)
