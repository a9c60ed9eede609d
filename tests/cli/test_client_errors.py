"""How the client turns an API problem document into an error: exit codes and wording."""

from __future__ import annotations

from nxmesh.client.errors import from_problem


def test_a_429_says_when_to_retry_once() -> None:
    """The lockout detail already names the wait: it is not repeated from Retry-After."""
    locked = from_problem(
        429, {"detail": "too many failed logins; try again in 2 s"}, retry_after=2.0
    )
    assert str(locked).count(" 2 s") == 1
    throttled = from_problem(429, {"detail": "slow down"}, retry_after=5.0)
    assert "slow down (retry in 5 s)" in str(throttled)
