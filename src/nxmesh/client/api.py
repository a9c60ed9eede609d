"""`Client`: the master's REST API over httpx, with the login kept fresh.

A client is built from a `Profile` (URL + credentials). Every request carries
``Authorization: Bearer`` — the profile's API token, or its access token. Access tokens
live minutes: when one is about to expire, or a request is answered 401, the client
rotates the refresh token once (``POST /auth/refresh``) and saves the new pair to the
`CredentialStore` *before* using it, under the store's lock, so a concurrent ``nxmesh``
process adopts the rotated pair instead of presenting the spent token (which would end
the session for both). Errors become `nxmesh.client.errors` exceptions.

Secrets never reach logs or exception messages: tokens travel in headers only, and
messages are built from the master's problem documents, which never echo them.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote, urlsplit

import httpx

from nxmesh import __version__
from nxmesh.client.credentials import CredentialStore, Profile
from nxmesh.client.errors import (
    EXIT_AUTH,
    ApiError,
    ClientError,
    UnreachableError,
    from_problem,
)
from nxmesh.client.models import (
    AgentInfo,
    AgentRollout,
    AgentStatusInfo,
    ApiTokenCreated,
    BootstrapTokenCreated,
    BootstrapTokenInfo,
    ChangeResult,
    DryRun,
    Me,
    RolloutInfo,
    UserInfo,
    VersionDiff,
    VersionInfo,
    parse,
    parse_list,
)

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_URL", "Client", "NotLoggedInError", "normalize_url"]

DEFAULT_URL: Final = "http://127.0.0.1:8470"
DEFAULT_TIMEOUT: Final = 30.0
REFRESH_MARGIN: Final = 30.0
"""Refresh an access token this many seconds before it expires (clock skew, slow calls)."""
API: Final = "/api/v1"


class NotLoggedInError(ClientError):
    """No usable login: no profile, or its session ended."""

    exit_code = EXIT_AUTH


def normalize_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash; a bare ``host:port``
    gets ``http://``. Anything else is a `ClientError` naming the URL."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"master URL {url!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ClientError(
            f"master URL {parts.scheme}://{parts.hostname} must not carry credentials, "
            "a query or a fragment"
        )
    return url.rstrip("/")


def _seg(value: str) -> str:
    """One path segment, percent-encoded (ids and names are validated by the master)."""
    return quote(value, safe="")


def _profile_from_tokens(url: str, data: Mapping[str, Any], ca_file: str | None) -> Profile:
    return Profile(
        url=url,
        ca_file=ca_file,
        username=str(data.get("subject") or "") or None,
        access_token=str(data["access_token"]),
        access_expires_at=float(data.get("expires_at") or time.time() + 60),
        refresh_token=str(data["refresh_token"]),
        refresh_expires_at=float(data["refresh_expires_at"])
        if data.get("refresh_expires_at") is not None
        else None,
    )


def _tls_verify(ca_file: str | None) -> ssl.SSLContext | bool:
    """System CAs, or only the CA in `ca_file` (a private master CA)."""
    if not ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot use CA file {ca_file}: {exc}") from None


class Client:
    """A synchronous client of one master's ``/api/v1``.

    :param profile: URL and credentials; its ``url`` is used as the base URL.
    :param store: where rotated session tokens are saved (None: kept in memory only).
    :param profile_name: the name `profile` is stored under in `store`.
    :param verify: TLS verification: default the profile's ``ca_file``, else the system's
        CAs (``False`` only for tests).
    :param transport: an httpx transport (tests).
    """

    def __init__(
        self,
        profile: Profile,
        *,
        store: CredentialStore | None = None,
        profile_name: str = "default",
        timeout: float = DEFAULT_TIMEOUT,
        verify: ssl.SSLContext | bool | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = normalize_url(profile.url)
        self.profile = profile
        self.store = store
        self.profile_name = profile_name
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            verify=_tls_verify(profile.ca_file) if verify is None else verify,
            transport=transport,
            headers={"User-Agent": f"nxmesh-cli/{__version__}"},
            follow_redirects=False,
        )

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def from_store(
        cls, store: CredentialStore, profile_name: str = "default", **kwargs: Any
    ) -> Client:
        """A client for the stored profile `profile_name`; `NotLoggedInError` if none."""
        profile = store.get(profile_name)
        if profile is None:
            hint = "" if profile_name == "default" else f" --profile {profile_name}"
            raise NotLoggedInError(
                f"not logged in (no profile {profile_name!r} in {store.path}); "
                f"run: nxmesh login{hint}"
            )
        return cls(profile, store=store, profile_name=profile_name, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> httpx.Response:
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # None, not {}: httpx replaces a URL's own query with any params given (next links).
        clean = None if params is None else {k: v for k, v in params.items() if v is not None}
        try:
            return self._http.request(method, path, json=json, params=clean, headers=headers)
        except httpx.TimeoutException:
            raise UnreachableError(f"the master at {self.url} did not answer in time") from None
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise UnreachableError(f"cannot reach the master at {self.url}: {reason}") from None

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body: object = response.json()
        except ValueError:
            body = {"detail": response.text[:200].strip()}
        retry: float | None = None
        if "retry-after" in response.headers:
            try:
                retry = float(response.headers["retry-after"])
            except ValueError:
                retry = None
        raise from_problem(response.status_code, body, retry_after=retry)

    @staticmethod
    def _body(response: httpx.Response) -> Any:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                response.status_code, "the master answered with something that is not JSON"
            ) from None

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> Any:
        """Call ``/api/v1{path}`` and return the decoded JSON (None for 204).

        Authenticated calls refresh an expiring session first and once more on a 401.
        """
        response = self._exchange(method, f"{API}{path}", json=json, params=params, auth=auth)
        return self._body(response)

    def request_pages(self, path: str, *, params: Mapping[str, Any] | None = None) -> list[Any]:
        """GET a paginated list (``/api/v1{path}``) whole: the items of every page,
        following the ``Link: <…>; rel="next"`` header until a page has none."""
        items: list[Any] = []
        url: str | None = f"{API}{path}"
        seen: set[str] = set()
        while url is not None:
            response = self._exchange("GET", url, params=params)
            page = self._body(response)
            if not isinstance(page, list):
                raise ApiError(response.status_code, f"expected a list from {path}")
            items.extend(page)
            params = None  # the next URL carries them
            url = response.links.get("next", {}).get("url")
            if url is not None:
                # Only our own server's paths: the token is never sent elsewhere.
                if not url.startswith("/") or url.startswith("//") or url in seen:
                    raise ApiError(response.status_code, f"bad next-page link {url!r}")
                seen.add(url)
        return items

    def _exchange(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> httpx.Response:
        if not auth:
            response = self._send(method, url, json=json, params=params)
            self._raise_for(response)
            return response
        response = self._send(method, url, json=json, params=params, token=self._token())
        if response.status_code == 401 and self.profile.kind == "session":
            used = self.profile.access_token
            self._refresh(spent_access=used)
            response = self._send(method, url, json=json, params=params, token=self._token())
        self._raise_for(response)
        return response

    def _token(self) -> str:
        p = self.profile
        if p.kind == "api_token":
            assert p.api_token is not None
            return p.api_token
        if p.kind == "none":
            raise NotLoggedInError("not logged in; run: nxmesh login")
        expires = p.access_expires_at or 0.0
        if p.access_token is None or expires - REFRESH_MARGIN <= time.time():
            self._refresh(spent_access=p.access_token)
        assert self.profile.access_token is not None
        return self.profile.access_token

    def _refresh(self, *, spent_access: str | None) -> None:
        """Rotate the refresh token, unless another process already did."""
        if self.store is None:
            self._rotate()
            return
        with self.store.locked():
            stored = self.store.get(self.profile_name)
            if (
                stored is not None
                and stored.access_token is not None
                and stored.access_token != spent_access
                and (stored.access_expires_at or 0.0) - REFRESH_MARGIN > time.time()
            ):
                self.profile = stored  # rotated by a concurrent nxmesh process
                return
            if stored is not None and stored.refresh_token:
                self.profile = stored
            self._rotate()
            self.store.put(self.profile_name, self.profile)

    def _rotate(self) -> None:
        refresh = self.profile.refresh_token
        if not refresh:
            raise NotLoggedInError("the login session has no refresh token; run: nxmesh login")
        response = self._send("POST", f"{API}/auth/refresh", json={"refresh_token": refresh})
        if response.status_code in (401, 422):
            raise NotLoggedInError("the login session expired or was revoked; run: nxmesh login")
        self._raise_for(response)
        self.profile = _profile_from_tokens(
            self.profile.url, self._body(response), self.profile.ca_file
        )

    # -- auth ---------------------------------------------------------------------------

    def login(self, username: str, password: str) -> Profile:
        """Log in with a password; the client uses the new session (returned to store)."""
        data = self.request(
            "POST",
            "/auth/login",
            json={"username": username, "password": password},
            auth=False,
        )
        self.profile = _profile_from_tokens(self.url, data, self.profile.ca_file)
        return self.profile

    def logout(self) -> None:
        """End the login session on the master (idempotent; API tokens are left alone)."""
        if self.profile.refresh_token:
            self.request(
                "POST",
                "/auth/logout",
                json={"refresh_token": self.profile.refresh_token},
                auth=False,
            )

    def me(self) -> Me:
        return parse(Me, self.request("GET", "/auth/me"))

    def change_password(self, current: str, new: str) -> None:
        """Change the caller's own password (ends every session, this one included)."""
        self.request(
            "POST", "/auth/password", json={"current_password": current, "new_password": new}
        )

    def create_api_token(
        self, name: str, scopes: list[str], *, expires_in: float | None = None
    ) -> ApiTokenCreated:
        body: dict[str, Any] = {"name": name, "scopes": scopes}
        if expires_in is not None:
            body["expires_in"] = expires_in
        return parse(ApiTokenCreated, self.request("POST", "/auth/tokens", json=body))

    # -- health -------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200 (storage answers); never raises for 503."""
        try:
            response = self._http.get("/readyz", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- desired state and versions -----------------------------------------------------

    def get_state(self, workspace: str) -> dict[str, Any]:
        state: dict[str, Any] = self.request("GET", f"/workspaces/{_seg(workspace)}/state")
        return state

    def dry_run(self, workspace: str, state: Mapping[str, Any]) -> DryRun:
        """Validate `state` and diff it against the latest version; nothing is stored."""
        data = self.request(
            "PUT",
            f"/workspaces/{_seg(workspace)}/state",
            json=dict(state),
            params={"dry_run": "true"},
        )
        return parse(DryRun, data)

    def put_state(
        self,
        workspace: str,
        state: Mapping[str, Any],
        *,
        message: str | None = None,
        expected_version: int | None = None,
    ) -> ChangeResult:
        """Store `state` as the next version (409 when `expected_version` is outdated)."""
        data = self.request(
            "PUT",
            f"/workspaces/{_seg(workspace)}/state",
            json=dict(state),
            params={"message": message, "expected_version": expected_version},
        )
        return parse(ChangeResult, data)

    def list_versions(
        self, workspace: str, *, limit: int = 100, before: int | None = None
    ) -> list[VersionInfo]:
        data = self.request(
            "GET",
            f"/workspaces/{_seg(workspace)}/versions",
            params={"limit": limit, "before": before},
        )
        return parse_list(VersionInfo, data)

    def latest_version(self, workspace: str) -> VersionInfo | None:
        versions = self.list_versions(workspace, limit=1)
        return versions[0] if versions else None

    def get_version(self, workspace: str, number: int) -> VersionInfo:
        return parse(
            VersionInfo, self.request("GET", f"/workspaces/{_seg(workspace)}/versions/{number}")
        )

    def diff(self, workspace: str, number: int, *, against: int | None = None) -> VersionDiff:
        data = self.request(
            "GET",
            f"/workspaces/{_seg(workspace)}/versions/{number}/diff",
            params={"against": against},
        )
        return parse(VersionDiff, data)

    def rollout(self, workspace: str, number: int) -> RolloutInfo:
        """Where version `number` stands on every agent it targets (one request)."""
        data = self.request("GET", f"/workspaces/{_seg(workspace)}/versions/{number}/rollout")
        return parse(RolloutInfo, data)

    def rollback(self, workspace: str, number: int, *, message: str | None = None) -> ChangeResult:
        data = self.request(
            "POST",
            f"/workspaces/{_seg(workspace)}/versions/{number}/rollback",
            params={"message": message},
        )
        return parse(ChangeResult, data)

    # -- agents -------------------------------------------------------------------------

    def list_agents(self, workspace: str | None = None) -> list[AgentInfo]:
        return parse_list(AgentInfo, self.request_pages("/agents", params={"workspace": workspace}))

    def get_agent(self, agent_id: str) -> AgentInfo:
        return parse(AgentInfo, self.request("GET", f"/agents/{_seg(agent_id)}"))

    def agent_statuses(self, agent_id: str) -> list[AgentStatusInfo]:
        return parse_list(AgentStatusInfo, self.request("GET", f"/agents/{_seg(agent_id)}/status"))

    def agent_why(self, agent_id: str, version: int) -> AgentRollout:
        data = self.request("GET", f"/agents/{_seg(agent_id)}/why", params={"version": version})
        return parse(AgentRollout, data)

    def revoke_agent(self, agent_id: str) -> AgentInfo:
        return parse(AgentInfo, self.request("POST", f"/agents/{_seg(agent_id)}/revoke"))

    # -- bootstrap tokens ---------------------------------------------------------------

    def create_bootstrap_token(
        self, workspace: str, *, labels: Mapping[str, str] | None = None, ttl: float = 3600.0
    ) -> BootstrapTokenCreated:
        data = self.request(
            "POST",
            f"/workspaces/{_seg(workspace)}/bootstrap-tokens",
            json={"labels": dict(labels or {}), "ttl": ttl},
        )
        return parse(BootstrapTokenCreated, data)

    def list_bootstrap_tokens(self, workspace: str) -> list[BootstrapTokenInfo]:
        data = self.request("GET", f"/workspaces/{_seg(workspace)}/bootstrap-tokens")
        return parse_list(BootstrapTokenInfo, data)

    def revoke_bootstrap_token(self, workspace: str, token_id: str) -> None:
        self.request("DELETE", f"/workspaces/{_seg(workspace)}/bootstrap-tokens/{_seg(token_id)}")

    # -- users --------------------------------------------------------------------------

    def list_users(self) -> list[UserInfo]:
        return parse_list(UserInfo, self.request("GET", "/users"))

    def get_user(self, username: str) -> UserInfo:
        return parse(UserInfo, self.request("GET", f"/users/{_seg(username)}"))

    def create_user(self, username: str, password: str, roles: list[str]) -> UserInfo:
        data = self.request(
            "POST", "/users", json={"username": username, "password": password, "roles": roles}
        )
        return parse(UserInfo, data)

    def update_user(
        self,
        username: str,
        *,
        roles: list[str] | None = None,
        disabled: bool | None = None,
        password: str | None = None,
    ) -> UserInfo:
        body = {
            k: v
            for k, v in {"roles": roles, "disabled": disabled, "password": password}.items()
            if v is not None
        }
        return parse(UserInfo, self.request("PATCH", f"/users/{_seg(username)}", json=body))

    def delete_user(self, username: str) -> None:
        self.request("DELETE", f"/users/{_seg(username)}")
