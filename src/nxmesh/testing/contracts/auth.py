"""Behaviour every authenticator provides."""

from __future__ import annotations

import pytest

from nxmesh.core.errors import NxMeshError
from nxmesh.core.interfaces import Authenticator, Credentials, Principal


class AuthenticatorContract:
    """Provide ``authenticator``; ``valid_credentials`` it accepts for the subject
    ``expected_subject``; ``wrong_credentials``, of its kind but wrong (a bad password,
    a forged or tampered token); and optionally ``foreign_credentials`` (credentials of a
    kind the authenticator does not handle, so the chain moves on)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def authenticator(self) -> Authenticator:
        raise NotImplementedError("subclasses provide authenticator")

    @pytest.fixture
    def valid_credentials(self) -> Credentials:
        raise NotImplementedError("subclasses provide valid_credentials")

    @pytest.fixture
    def expected_subject(self) -> str:
        raise NotImplementedError("subclasses provide expected_subject")

    @pytest.fixture
    def wrong_credentials(self) -> Credentials:
        raise NotImplementedError("subclasses provide wrong_credentials")

    @pytest.fixture
    def foreign_credentials(self) -> Credentials:
        return Credentials(scheme="x-nxmesh-contract-unknown", values={"v": "1"})

    def test_is_an_authenticator(self, authenticator: Authenticator) -> None:
        """The provider matches the protocol and has a name."""
        assert isinstance(authenticator, Authenticator)
        assert authenticator.name

    async def test_valid_credentials_give_their_principal(
        self, authenticator: Authenticator, valid_credentials: Credentials, expected_subject: str
    ) -> None:
        """Accepted credentials give a principal for their subject, attributed to this
        link, with roles as a tuple of names."""
        principal = await authenticator.authenticate(valid_credentials)
        assert isinstance(principal, Principal)
        assert principal.subject == expected_subject
        assert principal.authenticator == authenticator.name
        assert isinstance(principal.roles, tuple)
        assert all(isinstance(role, str) and role for role in principal.roles)

    async def test_wrong_credentials_of_its_kind_are_an_error(
        self, authenticator: Authenticator, wrong_credentials: Credentials
    ) -> None:
        """Wrong credentials of this link's kind raise `NxMeshError` (a refusal the API
        turns into 401): never a principal, and never None, which would let a later link
        of the chain try them."""
        with pytest.raises(NxMeshError):
            await authenticator.authenticate(wrong_credentials)

    async def test_the_refusal_does_not_repeat_the_secret(
        self, authenticator: Authenticator, wrong_credentials: Credentials
    ) -> None:
        """The error message (logged, and shown to the client) quotes no credential value
        long enough to be a secret."""
        with pytest.raises(NxMeshError) as caught:
            await authenticator.authenticate(wrong_credentials)
        said = f"{caught.value} {caught.value!r}"
        for key, value in wrong_credentials.values.items():
            if key != "username" and len(value) >= 8:
                assert value not in said, f"the error repeats credential value {key!r}"

    async def test_unrecognised_credentials_pass_to_the_next_link(
        self, authenticator: Authenticator, foreign_credentials: Credentials
    ) -> None:
        """Credentials of a foreign kind give None, not an error."""
        assert await authenticator.authenticate(foreign_credentials) is None

    def test_credential_values_stay_out_of_repr(self) -> None:
        """Credentials never show their secret values in repr (logs, tracebacks)."""
        creds = Credentials(scheme="password", values={"password": "hunter2-secret"})
        assert "hunter2-secret" not in repr(creds)
