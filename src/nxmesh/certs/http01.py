"""HTTP-01 through the agents' own nginx: no extra port, no extra daemon.

The CA fetches ``http://<domain>/.well-known/acme-challenge/<token>`` from whatever
answers for the domain on port 80 — the fleet's nginx. So the master does not answer
challenges itself; it *publishes* them:

1. `Http01Solver.present` puts the order's challenges on the `ChallengeBoard` and calls
   the publish callback, which rolls the affected agents out again (and returns once
   they applied);
2. each agent's bundle then carries one file per challenge, ``acme-challenge/<token>``
   holding the key authorization (`challenge_files`), next to ``nginx.conf`` in the live
   tree;
3. the renderer puts a ``location ^~ /.well-known/acme-challenge/`` in the plain-HTTP
   server of every ACME site (before its HTTPS redirect) that serves that directory
   (``acme_challenge.conf.j2``);
4. after validation, `Http01Solver.cleanup` removes them and publishes again.

`wait_until_served` polls one nginx until it serves every token, for callers that want
to check before telling the CA to validate.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import ClassVar

import anyio
import structlog

from nxmesh.certs.acme_client import PendingChallenge
from nxmesh.certs.errors import CertificateError
from nxmesh.core.model import DesiredState
from nxmesh.plugins.render_nginx.renderer import ACME_CHALLENGE_DIR

__all__ = [
    "CHALLENGE_DIR",
    "CHALLENGE_PATH",
    "ChallengeBoard",
    "Http01Solver",
    "PublishChallenges",
    "challenge_files",
    "wait_until_served",
]

CHALLENGE_DIR = ACME_CHALLENGE_DIR
"""Bundle directory holding one file per pending HTTP-01 token."""

CHALLENGE_PATH = "/.well-known/acme-challenge/"
"""URL path prefix the CA fetches tokens from (RFC 8555, section 8.3)."""

# Tokens are base64url without padding (RFC 8555 §8.1: at least 128 bits of entropy);
# anything else must never become a file name.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22,256}", re.ASCII)
_KEY_AUTHORIZATION = re.compile(r"[A-Za-z0-9_-]{22,256}\.[A-Za-z0-9_-]{43}", re.ASCII)

PublishChallenges = Callable[[frozenset[str]], Awaitable[None]]
"""Roll out the bundles of every agent serving one of the given domains; return when done."""

log = structlog.get_logger("nxmesh.certs.http01")


def _check(token: str, key_authorization: str) -> None:
    if _TOKEN.fullmatch(token) is None:
        raise CertificateError(f"refusing HTTP-01 token {token[:40]!r}: not base64url")
    if (
        _KEY_AUTHORIZATION.fullmatch(key_authorization) is None
        or key_authorization.partition(".")[0] != token
    ):
        raise CertificateError(f"refusing the key authorization for token {token!r}: malformed")


def challenge_files(challenges: Mapping[str, str]) -> dict[str, bytes]:
    """Bundle extra files for pending tokens: ``acme-challenge/<token>`` → key authorization.

    :param challenges: token → key authorization.
    :raises CertificateError: a token or key authorization that is not what ACME sends.
    """
    files: dict[str, bytes] = {}
    for token, key_authorization in sorted(challenges.items()):
        _check(token, key_authorization)
        files[f"{CHALLENGE_DIR}/{token}"] = key_authorization.encode("ascii")
    return files


def _served_names(state: DesiredState) -> set[str]:
    return {name for site in state.sites for name in site.server_names}


class ChallengeBoard:
    """The HTTP-01 challenges in flight on this master, by domain.

    The master's distribution reads it for every bundle it builds (`for_state`), so an
    agent serves exactly the tokens of the domains its sites answer for.
    """

    def __init__(self) -> None:
        self._by_domain: dict[str, dict[str, str]] = {}

    def add(self, challenges: Iterable[PendingChallenge]) -> frozenset[str]:
        """Publish `challenges` (HTTP-01 only); returns the domains they concern."""
        domains = set()
        for challenge in challenges:
            _check(challenge.token, challenge.key_authorization)
            self._by_domain.setdefault(challenge.domain, {})[challenge.token] = (
                challenge.key_authorization
            )
            domains.add(challenge.domain)
        return frozenset(domains)

    def remove(self, challenges: Iterable[PendingChallenge]) -> frozenset[str]:
        """Withdraw `challenges`; returns the domains they concerned."""
        domains = set()
        for challenge in challenges:
            tokens = self._by_domain.get(challenge.domain, {})
            tokens.pop(challenge.token, None)
            if not tokens:
                self._by_domain.pop(challenge.domain, None)
            domains.add(challenge.domain)
        return frozenset(domains)

    def domains(self) -> frozenset[str]:
        """Domains with at least one pending token."""
        return frozenset(self._by_domain)

    def for_domains(self, domains: Iterable[str]) -> dict[str, str]:
        """token → key authorization of every challenge for one of `domains`."""
        wanted = set(domains)
        return {
            token: auth
            for domain, tokens in self._by_domain.items()
            if domain in wanted
            for token, auth in tokens.items()
        }

    def for_state(self, state: DesiredState) -> dict[str, str]:
        """token → key authorization for the domains `state`'s sites serve."""
        return self.for_domains(_served_names(state))

    def __len__(self) -> int:
        return sum(len(tokens) for tokens in self._by_domain.values())


class Http01Solver:
    """Solves HTTP-01 by publishing tokens to the agents through their bundles.

    :param board: where pending tokens are kept for the distribution to read.
    :param publish: rolls out the agents serving the given domains and returns once they
        applied (the CA validates right after `present` returns).
    """

    challenge_type: ClassVar[str] = "http-01"

    def __init__(self, board: ChallengeBoard, publish: PublishChallenges) -> None:
        self.board = board
        self.publish = publish

    async def present(self, challenges: Sequence[PendingChallenge]) -> None:
        domains = self.board.add(challenges)
        log.info("http-01 challenges published", domains=sorted(domains))
        await self.publish(domains)

    async def cleanup(self, challenges: Sequence[PendingChallenge]) -> None:
        domains = self.board.remove(challenges)
        await self.publish(domains)


async def wait_until_served(
    challenges: Sequence[PendingChallenge],
    host: str,
    port: int,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - the deadline is the point of the helper
    interval: float = 0.1,
) -> None:
    """Poll ``http://host:port`` until it serves every challenge's key authorization.

    Requests carry the challenge's domain as ``Host`` header, as the CA's would.

    :raises CertificateError: not served within `timeout`; names the first token missing.
    """
    from nxmesh.agent.http import http_get

    missing = list(challenges)
    with anyio.move_on_after(timeout):
        while missing:
            challenge = missing[0]
            try:
                response = await http_get(
                    host,
                    port,
                    CHALLENGE_PATH + challenge.token,
                    host_header=challenge.domain.removeprefix("*."),
                )
            except (OSError, TimeoutError):
                response = None
            if (
                response is not None
                and response.status == 200
                and response.text.strip() == challenge.key_authorization
            ):
                missing.pop(0)
                continue
            await anyio.sleep(interval)
    if missing:
        raise CertificateError(
            f"{host}:{port} does not serve the HTTP-01 token for {missing[0].domain} "
            f"within {timeout:.0f} s"
        )
